"""Freeze a guest's filesystems through its QEMU guest agent while torpor suspends it.

A suspended guest's disks are only as consistent as its filesystems were when
it stopped.  Before torpor asks the guest to suspend, this plugin asks the
guest's agent (qemu-ga) for ``guest-fsfreeze-freeze``: the guest kernel
flushes each filesystem and blocks every writer.  Once the guest is back it
asks for ``guest-fsfreeze-thaw``.  What it relies on from torpor:

* :func:`~torpor.hookspecs.torpor_veto_suspend` -- the freeze, before anything
  is asked of the guest; a reason returned refuses the suspend
  (:class:`~torpor.errors.Vetoed`) when the agent refuses the freeze (it is
  frozen already, it lacks the command) or, with ``require_agent``, when the
  guest has no agent or it does not answer;
* :func:`~torpor.hookspecs.torpor_after_resume` -- the thaw, after every resume
  (a plain resume, each checkpoint, a restore or a migration's arrival in a
  new domain, ``torpor recover``), in this process or another: the freeze is
  the guest's own state, so the plugin asks the agent (``guest-fsfreeze-status``)
  rather than remembering;
* :func:`~torpor.hookspecs.torpor_operation_failed` -- the thaw on every
  failure path: a suspend that failed or timed out (and was rolled back), the
  veto of a plugin asked after this one, an interrupted operation.

What qemu-ga does (qga/commands-posix.c, qga/main.c, QEMU 7.2): once frozen it
disables every command but ping, info, sync and ``guest-fsfreeze-status`` /
``-thaw``, so a second freeze and ``guest-suspend-ram`` -- the HVM plugin's way
into ACPI S3 -- are refused.  So this plugin never freezes a guest that is to
sleep in S3 (the guest's kernel syncs its filesystems and freezes its tasks
before it sleeps); with ``avoid_s3`` it keeps the guests it can freeze out of
S3 instead, asking for libxl's hard suspend.

Configuration: construct :class:`FsFreeze` and register it
(``get_plugin_manager(plugins=[FsFreeze(...)], block=["fsfreeze"])``), or set
the environment for the instance the ``torpor`` entry point loads, which is
off unless ``TORPOR_FSFREEZE`` is set (see :meth:`FsFreeze.from_environment`).

Only torpor's public API is used: :data:`torpor.hookimpl`, :mod:`torpor.context`,
:mod:`torpor.errors`, :mod:`torpor.model` and :class:`torpor.qmp.GuestAgent`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from torpor import hookimpl
from torpor.context import OperationContext
from torpor.errors import QmpCommandError, TorporError, UsageError
from torpor.model import Result, SuspendMethod

__all__ = ["ENV_AVOID_S3", "ENV_ENABLE", "ENV_REQUIRE_AGENT", "FsFreeze", "plugin"]

log = logging.getLogger("torpor.fsfreeze")

#: Turns the entry point's instance on (``1``, ``on``...); off when unset or empty.
ENV_ENABLE = "TORPOR_FSFREEZE"
#: ``0`` / ``off``: suspend a guest without a (reachable) agent unfrozen instead of vetoing.
ENV_REQUIRE_AGENT = "TORPOR_FSFREEZE_REQUIRE_AGENT"
#: ``1`` / ``on``: keep guests it can freeze out of ACPI S3 (libxl's hard suspend).
ENV_AVOID_S3 = "TORPOR_FSFREEZE_AVOID_S3"

_TRUE = {"1", "on", "yes", "true"}
_FALSE = {"0", "off", "no", "false"}

#: ``ctx.data`` key: what this plugin did to the guest in this operation --
#: ``"sent"`` (a freeze was sent, its answer unknown), or the number frozen.
KEY = "fsfreeze"


class FsFreeze:
    """The plugin: freeze before a suspend (or veto it), thaw after the resume or a failure.

    :param enabled: ``False``: do nothing at all (the entry point's instance
        unless ``TORPOR_FSFREEZE`` is set).
    :param require_agent: veto the suspend of a guest without a guest agent,
        or whose agent does not answer; ``False``: suspend it unfrozen.  A
        guest whose agent *refuses* the freeze is always vetoed.
    :param avoid_s3: keep guests with an agent out of ACPI S3 -- where libxl
        would hard-suspend them (an HVM guest without PV drivers), return that
        choice before the HVM plugin can choose S3 -- so that their filesystems
        are frozen while they are suspended.  ``False``: a guest that sleeps in
        S3 is not frozen.
    :param timeout: seconds for each agent exchange (a freeze flushes the
        guest's dirty data first); default: the operation's device-model
        deadline (``Timeouts.device_model``).
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        require_agent: bool = True,
        avoid_s3: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.enabled = enabled
        self.require_agent = require_agent
        self.avoid_s3 = avoid_s3
        self.timeout = timeout

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> FsFreeze:
        """The entry point's instance: :data:`ENV_ENABLE`, :data:`ENV_REQUIRE_AGENT`,
        :data:`ENV_AVOID_S3` (``1/on/yes/true``, ``0/off/no/false``).

        Off unless ``TORPOR_FSFREEZE`` is set: installed, the plugin would
        otherwise refuse every suspend of a guest without an agent on the host.
        """

        def flag(name: str, default: bool) -> bool:
            value = environ.get(name, "").strip().lower()
            if not value:
                return default
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            raise UsageError(f"{name}={environ[name]!r}: expected 1/on/yes/true or 0/off/no/false")

        return cls(
            enabled=flag(ENV_ENABLE, False),
            require_agent=flag(ENV_REQUIRE_AGENT, True),
            avoid_s3=flag(ENV_AVOID_S3, False),
        )

    def __repr__(self) -> str:
        return (
            f"FsFreeze(enabled={self.enabled}, require_agent={self.require_agent}, "
            f"avoid_s3={self.avoid_s3})"
        )

    # -- hooks -------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def torpor_choose_suspend_method(
        self, ctx: OperationContext, default: SuspendMethod
    ) -> SuspendMethod | None:
        """With ``avoid_s3``: keep libxl's hard suspend for a guest with an agent."""
        if not (self.enabled and self.avoid_s3) or ctx.facts.get("s3"):
            return None
        if default == SuspendMethod.HARD_SHUTDOWN and ctx.host.agent_path(ctx.domid):
            return default  # asked first (tryfirst): the HVM plugin's S3 is not asked
        return None

    @hookimpl
    async def torpor_veto_suspend(self, ctx: OperationContext) -> str | None:
        """Freeze the guest's filesystems; a reason if that cannot be done."""
        if not self.enabled:
            return None
        if ctx.method == SuspendMethod.ACPI_S3 or ctx.facts.get("s3"):
            # It will sleep (or sleeps) in S3: qemu-ga refuses guest-suspend-ram
            # once frozen, and a sleeping guest's agent does not answer.
            log.info("domain %d: sleeps in ACPI S3; not frozen", ctx.domid)
            return None
        path = ctx.host.agent_path(ctx.domid)
        if path is None:
            if self.require_agent:
                return "the guest has no guest agent to freeze its filesystems with"
            log.info("domain %d: no guest agent; suspended unfrozen", ctx.domid)
            return None
        timeout = self._timeout(ctx)
        try:
            from torpor.qmp import GuestAgent  # QMP loads when a guest is frozen

            async with GuestAgent(domid=ctx.domid) as agent:
                await agent.connect(path, timeout=timeout)
                await agent.sync(timeout=timeout)
                ctx.data[KEY] = "sent"  # from here on a failure path must thaw
                frozen = await agent.execute("guest-fsfreeze-freeze", timeout=timeout)
        except QmpCommandError as e:
            # Refused (frozen already, by someone else; no such command...): nothing
            # of ours to thaw, and no suspend on unfrozen filesystems.
            ctx.data.pop(KEY, None)
            return f"the guest agent refused guest-fsfreeze-freeze: {e.error_class}: {e.desc}"
        except TorporError as e:  # no answer: connect failed, a timeout, the channel died
            if self.require_agent:
                return f"the guest agent did not freeze the filesystems: {e.message}"
            log.warning("domain %d: %s; suspending unfrozen", ctx.domid, e)
            return None
        ctx.data[KEY] = frozen
        log.info("domain %d: %s filesystem(s) frozen", ctx.domid, frozen)
        return None

    @hookimpl
    async def torpor_after_resume(self, ctx: OperationContext, result: Result) -> None:
        """The guest is back (in this domain or a new one): thaw what is frozen."""
        if self.enabled:
            await self._thaw(ctx, always=False)

    @hookimpl
    async def torpor_operation_failed(self, ctx: OperationContext, error: TorporError) -> None:
        """A suspend that froze (or may have frozen) the guest failed: thaw it."""
        if not self.enabled or KEY not in ctx.data:
            return
        state = getattr(error, "state", None)
        if state != "running":
            # Not running (the rollback failed): its agent cannot answer now.
            # `torpor recover` resumes it, and then torpor_after_resume thaws it.
            log.warning(
                "domain %d: left %s with its filesystems frozen; they are thawed when "
                "torpor resumes it (torpor recover %d)",
                ctx.domid,
                state,
                ctx.domid,
            )
            return
        await self._thaw(ctx, always=True)

    # -- internals -----------------------------------------------------------------

    def _timeout(self, ctx: OperationContext) -> float:
        return self.timeout if self.timeout is not None else ctx.timeouts.device_model

    async def _thaw(self, ctx: OperationContext, *, always: bool) -> None:
        """``guest-fsfreeze-thaw`` -- if this operation froze it (``always``) or
        the agent says it is frozen.  Failures are logged: a notification
        cannot fail an operation that is over."""
        path = ctx.host.agent_path(ctx.domid)
        if path is None:
            return
        timeout = self._timeout(ctx)
        try:
            from torpor.qmp import GuestAgent  # QMP loads when a guest is frozen

            async with GuestAgent(domid=ctx.domid) as agent:
                await agent.connect(path, timeout=timeout)
                await agent.sync(timeout=timeout)
                if not always and KEY not in ctx.data:
                    status: Any = await agent.execute("guest-fsfreeze-status", timeout=timeout)
                    if status != "frozen":
                        return
                thawed = await agent.execute("guest-fsfreeze-thaw", timeout=timeout)
        except TorporError as e:
            log.error("domain %d: guest-fsfreeze-thaw failed: %s", ctx.domid, e)
            return
        ctx.data.pop(KEY, None)
        log.info("domain %d: %s filesystem(s) thawed", ctx.domid, thawed)


#: The instance the ``torpor`` entry point registers (off unless ``TORPOR_FSFREEZE`` is set).
plugin = FsFreeze.from_environment()

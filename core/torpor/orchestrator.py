"""The orchestrator: suspend, resume, checkpoint, save, restore, migrate, recover.

:class:`Orchestrator` (asyncio) drives the protocol of docs/protocol.md for
one host; :class:`~torpor.facade.Torpor` is the same for synchronous
callers.  The orchestrator owns the order of the steps, every deadline, the
cancel of an unanswered request, the rollback of a failed suspend,
one-operation-per-domain and the result record; guest-type plugins supply
the guest-specific steps through the hooks in :mod:`torpor.hookspecs`.

It is made of the shared :class:`~torpor.engine.Engine` (claims, hooks,
waits, phases, intent records, truth) and one module per operation in
:mod:`torpor.operations`, each reading top to bottom in Xen's order::

    suspend   validate ─ request ─ ack* ─ shutdown ─ device-model-suspend*
                          └─ ack timeout: cancel (transaction) ─ AckTimeout, guest running
    resume    validate ─ device-model-resume* ─ resume(fast) ─ xs-resume ─ guest-resume ─ verify

(* only where it applies.)  The methods below are those operations' faces.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from torpor.context import OperationContext
from torpor.engine import Engine
from torpor.errors import Interrupted, TorporError
from torpor.model import PrecopyPolicy, Result
from torpor.operations import recover as _recover
from torpor.operations import resume as _resume
from torpor.operations import suspend as _suspend

if TYPE_CHECKING:
    from torpor.image import SavedDomain
    from torpor.livesave import IncomingImage
    from torpor.operations.hostwide import GuestFilter, HostReport, OnGuest
    from torpor.xlmigrate import Channel

__all__ = ["Orchestrator"]


class Orchestrator(Engine):
    """Suspend and resume domains of one host (asyncio API).

    Bound to the event loop that first uses it (another loop gets
    :class:`~torpor.errors.WrongEventLoop`).

    :param host: the host to act on.
    :param plugin_manager: from :func:`torpor.plugins.get_plugin_manager` (default: a new one).
    :param timeouts: deadlines (libxl-like defaults; see :class:`~torpor.model.Timeouts`).
    :param concurrency: at most this many domains in flight in a bulk operation.
    :param record_intent: keep an intent record in the domain's lock file while an operation runs.
    """

    # -- suspend and resume ------------------------------------------------------------

    async def suspend(
        self,
        domid: int,
        *,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> Result:
        """Suspend a domain: it ends shut down with reason suspend (or asleep in S3).

        :mod:`torpor.operations.suspend` (libxl's ``domain_suspend_callback_common``).
        ``ack_timeout`` / ``suspend_timeout`` override the :class:`~torpor.model.Timeouts`
        of this call.  Raises an :class:`~torpor.errors.OperationError` subclass
        saying what failed and the state the domain was observed in (``err.state``).
        """
        self._check_loop()
        return await _suspend.suspend(
            self, domid, ack_timeout=ack_timeout, suspend_timeout=suspend_timeout
        )

    async def resume(self, domid: int, *, cooperative: bool = True, force: bool = False) -> Result:
        """Resume a suspended domain (or wake one asleep in S3).

        :mod:`torpor.operations.resume` (``libxl__domain_resume``).
        ``cooperative=True`` (fast): the guest's suspend hypercall returns 1 and
        it reuses everything.  ``cooperative=False`` in the same domain crashes
        today's Linux guests; it is refused unless the guest type says it
        survives it, or ``force=True`` (then the outcome is reported as seen).
        """
        self._check_loop()
        return await _resume.resume(self, domid, cooperative=cooperative, force=force)

    async def checkpoint(
        self,
        domid: int,
        callback: Callable[[Result], Any] | None = None,
        *,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> Result:
        """Suspend, run ``callback(suspend_result)`` while suspended, resume cooperatively.

        :mod:`torpor.operations.checkpoint`.  The guest is resumed even if the
        callback fails; then the callback's error is raised (an OperationError
        in phase ``callback``).
        """
        self._check_loop()
        from torpor.operations import checkpoint as _checkpoint  # loads when used

        return await _checkpoint.checkpoint(
            self, domid, callback, ack_timeout=ack_timeout, suspend_timeout=suspend_timeout
        )

    async def checkpoints(
        self,
        domid: int,
        count: int,
        *,
        interval: float = 0.0,
        callback: Callable[[Result], Any] | None = None,
        on_result: Callable[[Result], None] | None = None,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> list[Result]:
        """``count`` checkpoints in one session, as Remus runs them.

        The domain is claimed, classified and its intent recorded once, and a
        suspend event channel stays bound for the session.  ``interval``
        seconds pass between checkpoints; ``on_result`` sees each result as it
        comes.  The first failure ends the session with the guest resumed.
        """
        self._check_loop()
        from torpor.operations import checkpoint as _checkpoint

        return await _checkpoint.checkpoints(
            self,
            domid,
            count,
            interval=interval,
            callback=callback,
            on_result=on_result,
            ack_timeout=ack_timeout,
            suspend_timeout=suspend_timeout,
        )

    # -- save, restore, migrate --------------------------------------------------------

    async def save(self, domid: int, path: str | os.PathLike[str]) -> Result:
        """Suspend a domain, write its state to ``path``, then destroy it.

        :mod:`torpor.operations.save`.  The domain is destroyed only once the
        file is complete and verified (read back, every checksum checked).  A
        failure before that resumes the guest cooperatively where it was.
        """
        self._check_loop()
        from torpor.operations import save

        return await save.save(self, domid, path)

    async def restore(
        self,
        source: str | os.PathLike[str] | SavedDomain | IncomingImage,
        *,
        expect_kind: str | None = None,
        name: str | None = None,
    ) -> Result:
        """Build a new domain from a save image and start it (non-cooperatively).

        :mod:`torpor.operations.restore`.  The image is verified before anything
        is built; a name another domain holds is refused
        (:class:`~torpor.errors.NameInUse`); ``name`` restores a copy under
        another name (and a fresh UUID).  If the guest does not come up, the
        new domain is destroyed; the image is untouched.
        """
        self._check_loop()
        from torpor.operations import restore

        return await restore.restore(self, source, expect_kind=expect_kind, name=name)

    async def domain_named(self, name: str) -> int | None:
        """The domid of the domain called ``name`` on this host (``None``: none is)."""
        self._check_loop()
        from torpor.operations import restore

        return await restore.domain_named(self, name)

    async def migrate(
        self,
        domid: int,
        destination: Orchestrator,
        *,
        live: bool | None = None,
        precopy: PrecopyPolicy | None = None,
    ) -> Result:
        """Move a domain to another host: stream it, restore it there, destroy it here.

        :mod:`torpor.operations.migrate`.  The source is destroyed only after
        the destination guest runs; any earlier failure resumes the source
        cooperatively (a live migration's source may never have stopped) and
        destroys a half-built destination domain.

        :param live: ``None``: live where the guest's dirty pages can be
            tracked, else non-live (the result says why); ``True``: live or
            :class:`~torpor.errors.LiveUnavailable`; ``False``: non-live.
        :param precopy: the precopy policy (default libxl's: 5 rounds, stop
            under 50 dirty pages).
        """
        self._check_loop()
        from torpor.operations import migrate

        return await migrate.migrate(self, domid, destination, live=live, precopy=precopy)

    async def migrate_xl(
        self,
        domid: int,
        host: str,
        *,
        ssh_command: str = "ssh",
        live: bool | None = None,
        precopy: PrecopyPolicy | None = None,
        receive_flags: str = "",
    ) -> Result:
        """Send a domain to ``xl migrate-receive`` (or ``torpor migrate-receive``) on
        ``host`` over xl's migration protocol, through ``sh -c "exec SSH HOST xl
        migrate-receive"`` (:mod:`torpor.operations.migrate_xl`).

        The source is destroyed once the receiver reports the guest started;
        before permission to go is given, any failure leaves it running here.
        ``live``, ``precopy``: as :meth:`migrate`.
        """
        self._check_loop()
        from torpor.operations import migrate_xl

        return await migrate_xl.migrate_xl(
            self,
            domid,
            host,
            ssh_command=ssh_command,
            live=live,
            precopy=precopy,
            receive_flags=receive_flags,
        )

    async def migrate_receive(
        self, channel: Channel, *, pause_after: bool = False, go_timeout: float | None = None
    ) -> Result:
        """Receive one domain over xl's migration protocol on ``channel`` (the
        receiving end of ``xl migrate``; :mod:`torpor.operations.receive`)."""
        self._check_loop()
        from torpor.operations import receive

        return await receive.migrate_receive(
            self, channel, pause_after=pause_after, go_timeout=go_timeout
        )

    # -- many domains --------------------------------------------------------------------

    async def suspend_many(
        self,
        domids: Iterable[int],
        *,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> list[Result | TorporError]:
        """Suspend many domains at once (bounded concurrency); one result or error each."""
        self._check_loop()
        return await self._bulk(
            domids,
            lambda d: self.suspend(d, ack_timeout=ack_timeout, suspend_timeout=suspend_timeout),
        )

    async def resume_many(
        self, domids: Iterable[int], *, cooperative: bool = True, force: bool = False
    ) -> list[Result | TorporError]:
        """Resume many domains at once (bounded concurrency); one result or error each."""
        self._check_loop()
        return await self._bulk(
            domids, lambda d: self.resume(d, cooperative=cooperative, force=force)
        )

    async def _bulk(
        self, domids: Iterable[int], op: Callable[[int], Coroutine[Any, Any, Result]]
    ) -> list[Result | TorporError]:
        sem = asyncio.Semaphore(self.concurrency)

        async def one(domid: int) -> Result | TorporError:
            async with sem:
                try:
                    return await op(domid)
                except TorporError as e:
                    return e

        return list(await asyncio.gather(*(one(d) for d in domids)))

    # -- the whole host: xendomains' stop and start -----------------------------------

    async def save_all(
        self,
        directory: str | os.PathLike[str],
        *,
        select: GuestFilter | None = None,
        concurrency: int | None = None,
        max_rate: float | None = None,
        shutdown_fallback: bool = False,
        shutdown_timeout: float = 300.0,
        on_guest: OnGuest | None = None,
    ) -> HostReport:
        """Save every running guest (or those ``select`` picks) into ``directory``.

        :mod:`torpor.operations.hostwide`: :meth:`save` for each, at most
        ``concurrency`` at a time (default
        :data:`~torpor.operations.hostwide.DEFAULT_CONCURRENCY`), no faster than
        ``max_rate`` bytes/s on average; ``directory/manifest.json`` is rewritten
        atomically as each guest completes.  A guest that cannot be saved is
        left running (the save resumed it) or, with ``shutdown_fallback``, asked
        to power off and waited for (``shutdown_timeout``).  ``on_guest(outcome,
        progress)`` sees each guest as it completes.  Never raises for one
        guest: the :class:`~torpor.operations.hostwide.HostReport` has each.
        """
        self._check_loop()
        from torpor.operations import hostwide

        return await hostwide.save_all(
            self,
            directory,
            select=select,
            concurrency=concurrency,
            max_rate=max_rate,
            shutdown_fallback=shutdown_fallback,
            shutdown_timeout=shutdown_timeout,
            on_guest=on_guest,
        )

    async def restore_all(
        self,
        directory: str | os.PathLike[str],
        *,
        select: GuestFilter | None = None,
        concurrency: int | None = None,
        on_guest: OnGuest | None = None,
    ) -> HostReport:
        """Restore what :meth:`save_all` saved in ``directory``, in the saved order.

        Each image is checked against the manifest (size, SHA-256) and skipped
        if it fails; a guest whose name a domain has is refused
        (:class:`~torpor.errors.NameInUse`); an image is removed only once its
        guest runs.  Guests the manifest names but never saved are reported.
        """
        self._check_loop()
        from torpor.operations import hostwide

        return await hostwide.restore_all(
            self, directory, select=select, concurrency=concurrency, on_guest=on_guest
        )

    # -- status and recovery -------------------------------------------------------------

    async def status(self, domid: int) -> dict[str, Any]:
        """The truth about a domain, from observation, and any torpor intent record.

        ``state`` is what the hypervisor says (``running``, ``paused``,
        ``suspended``, ``S3``, ``crashed``...); ``request_pending`` whether a
        ``control/shutdown`` suspend request is outstanding; ``intent`` what a
        torpor process was doing (``intent_alive``: whether it still runs).
        """
        self._check_loop()
        return await _recover.status(self, domid)

    async def recover(self, domid: int) -> Result:
        """Bring a domain a dead (or interrupted) torpor left behind back to running.

        :mod:`torpor.operations.recover`: a pending request withdrawn, a suspend
        under way given ``settle`` seconds to finish, a suspended domain resumed
        cooperatively, one in S3 woken; the result's ``actions`` list what was
        done, and only that.  A crashed domain cannot be recovered (ResumeFailed).
        """
        self._check_loop()
        return await _recover.recover(self, domid)

    async def list_domains(self) -> list[dict[str, Any]]:
        """Every guest domain with its guest type (or why none claims it) and state."""
        self._check_loop()
        return await _recover.list_domains(self)

    async def _roll_back_interrupted(self, ctx: OperationContext) -> Interrupted:
        """The engine's rollback of a cancelled operation (recover's heart)."""
        return await _recover.roll_back_interrupted(self, ctx)

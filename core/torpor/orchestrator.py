"""The orchestrator: one state machine for suspend, resume, checkpoint and bulk.

:class:`Orchestrator` (asyncio) drives the protocol of docs/protocol.md
for one host; :class:`Torpor` is the same for synchronous callers (it runs an
orchestrator on a private event-loop thread).  The orchestrator owns the
order of the steps, every deadline, the cancel of an unanswered request, the
rollback of a failed suspend, one-operation-per-domain, and the result
record; guest-type plugins supply the guest-specific steps through the hooks
in :mod:`torpor.hookspecs`.

Suspend::

    validate ─ request ─ ack* ─ shutdown ─ device-model-suspend*
                          └─ ack timeout: cancel (transaction) ─ AckTimeout, guest running

Resume::

    validate ─ device-model-resume* ─ resume(fast) ─ xs-resume ─ guest-resume ─ verify

(* only where it applies.)  Waiting is event-driven: one ``@releaseDomain``
watch and one event-channel reader per orchestrator serve every operation
(:class:`DomainMonitor`), plus the xenstore watches and device-model events of
the operation at hand.  No thread per domain, no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import pluggy

from torpor.context import OperationContext
from torpor.errors import (
    AckTimeout,
    AlreadySuspended,
    BackendUnavailable,
    DomainBusy,
    DomainVanished,
    HypervisorError,
    ImageError,
    Interrupted,
    InvalidState,
    MigrationFailed,
    NoSuchDomain,
    NotSuspended,
    OperationError,
    ResumeFailed,
    SuspendTimeout,
    Timeout,
    TorporError,
    UnexpectedShutdown,
    UnsafeResume,
    UnsupportedGuest,
    UsageError,
    WrongEventLoop,
)
from torpor.host import Host, validate_domid
from torpor.intent import IntentLog, pid_alive
from torpor.model import (
    HVM_PARAM_ACPI_S_STATE,
    DomainInfo,
    GuestType,
    Phase,
    PhaseTiming,
    Result,
    ShutdownReason,
    SuspendMethod,
    Timeouts,
    Verdict,
)
from torpor.plugins import get_plugin_manager
from torpor.protocol import default_suspend_method, release_suspend_event_channel

if TYPE_CHECKING:  # save/restore/migration modules load when used, not at start-up
    from torpor.builder import DomainBuilder, FileSaver
    from torpor.image import PartialFile, SavedDomain

__all__ = ["DomainMonitor", "Orchestrator", "Torpor"]

log = logging.getLogger("torpor")
T = TypeVar("T")


class DomainMonitor:
    """The orchestrator's eyes: ``@releaseDomain`` and the suspend event channels.

    One xenstore watch on ``@releaseDomain`` (xenstored fires it when a domain
    shuts down or dies) and one reader on the hypervisor's event-channel
    descriptor, shared by every operation.  Listeners are woken by domid or by
    local port; they then re-read what they care about.  A burst of events is
    coalesced into one refresh per loop iteration, like a pending VIRQ.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self._domain_listeners: dict[int, set[Callable[[], None]]] = {}
        self._port_listeners: dict[int, set[Callable[[], None]]] = {}
        self._watch: Any = None
        self._evtchn_fd: int | None = None
        self._refresh_pending = False
        self._last: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        if self._watch is None:
            self._loop = asyncio.get_running_loop()
            self._watch = await self.host.xenstore.aio.watch("@releaseDomain", self._on_release)

    async def close(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            with contextlib.suppress(TorporError):
                await self.host.xenstore.aio.unwatch(watch)
        if self._evtchn_fd is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._evtchn_fd)
            self._evtchn_fd = None

    def listen_domain(self, domid: int, wake: Callable[[], None]) -> Callable[[], None]:
        # Forget what we last saw of it: a resume changes a domain without any
        # @releaseDomain, so the next event must wake a new listener whatever
        # the flags then say (a spurious wake costs one re-read).
        self._last.pop(domid, None)
        self._domain_listeners.setdefault(domid, set()).add(wake)
        return lambda: self._domain_listeners.get(domid, set()).discard(wake)

    def listen_port(self, port: int, wake: Callable[[], None]) -> Callable[[], None]:
        if self._evtchn_fd is None:
            loop = asyncio.get_running_loop()
            self._evtchn_fd = self.host.hypervisor.evtchn_fileno()
            loop.add_reader(self._evtchn_fd, self._on_evtchn)
        self._port_listeners.setdefault(port, set()).add(wake)
        return lambda: self._port_listeners.get(port, set()).discard(wake)

    def _on_release(self, _path: str, _token: str) -> None:
        if not self._refresh_pending:
            self._refresh_pending = True
            asyncio.get_running_loop().call_soon(self._refresh)

    def _refresh(self) -> None:
        self._refresh_pending = False
        watched = [d for d, ls in self._domain_listeners.items() if ls]
        if not watched:
            return
        hv = self.host.hypervisor
        flags: dict[int, int] = {}
        try:
            if len(watched) <= 8:
                for d in watched:
                    try:
                        flags[d] = hv.domain_info(d).flags
                    except HypervisorError as e:
                        if e.errno != errno.ESRCH:
                            raise
            else:
                flags = {i.domid: i.flags for i in hv.domain_info_list()}
        except TorporError:
            flags = {}  # the hypervisor failed: wake everyone, they'll see it
            changed = set(watched)
        else:
            changed = {d for d in watched if flags.get(d, -1) != self._last.get(d)}
        self._last.update({d: flags.get(d, -1) for d in watched})
        for d in changed:
            for wake in list(self._domain_listeners.get(d, ())):
                wake()

    def _on_evtchn(self) -> None:
        hv = self.host.hypervisor
        try:
            while (port := hv.evtchn_pending()) is not None:
                with contextlib.suppress(TorporError):
                    hv.evtchn_unmask(port)
                for wake in list(self._port_listeners.get(port, ())):
                    wake()
        except TorporError as e:
            log.warning("event channel read failed: %s", e)
            for ls in self._port_listeners.values():
                for wake in list(ls):
                    wake()


@attrs.frozen
class _Sources:
    """What may change a verdict: xenstore paths, an event-channel port, the device model."""

    xs_paths: tuple[str, ...] = ()
    port: int | None = None
    device_model: bool = False


class Orchestrator:
    """Suspend and resume domains of one host (asyncio API).

    :param host: the host to act on.
    :param plugin_manager: from :func:`torpor.plugins.get_plugin_manager` (default: a new one).
    :param timeouts: deadlines (libxl-like defaults; see :class:`~torpor.model.Timeouts`).
    :param concurrency: at most this many domains in flight in a bulk operation.
    """

    def __init__(
        self,
        host: Host,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        timeouts: Timeouts | None = None,
        concurrency: int = 256,
        record_intent: bool = True,
    ) -> None:
        self.host = host
        self.pm = plugin_manager or get_plugin_manager()
        _refuse_wrappers(self.pm)
        self.timeouts = timeouts or Timeouts()
        self.concurrency = concurrency
        self.monitor = DomainMonitor(host)
        self._busy: dict[int, str] = {}
        self._lock_fds: dict[int, int] = {}
        self._lock_named: set[int] = set()
        self._lock_dir_ready = False
        #: Keep an intent record in xenstore while an operation runs (torpor.intent).
        self.record_intent = record_intent
        self._intent = IntentLog(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the task running each domain's operation (what :meth:`interrupt` cancels)
        self._tasks: dict[int, asyncio.Task[Any]] = {}
        self._contexts: dict[int, OperationContext] = {}
        self._interrupted: str | None = None

    def _check_loop(self) -> None:
        """Bind to the first loop that uses us; refuse any other at once.

        The ``@releaseDomain`` watch, the event-channel reader and every wait
        live on that loop: from another one they would never fire (a suspend
        would time out while the guest sat suspended).
        """
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise WrongEventLoop(
                "this Orchestrator is bound to the event loop that first used it "
                f"({self._loop!r}); it cannot be used from {loop!r}: make one "
                "Orchestrator per loop, or use the Torpor facade from any thread"
            )

    def interrupt(self, reason: str = "interrupted") -> None:
        """Stop every operation in flight and refuse new ones (call on the loop's thread).

        Each operation in flight is cancelled and rolled back as a failure
        would be: a request the guest has not taken is withdrawn in a
        transaction, a guest that already suspended is resumed cooperatively,
        a half-done resume is finished.  Each then raises
        :class:`~torpor.errors.Interrupted` naming ``reason`` and the state the
        domain was observed in.  Operations started afterwards raise
        Interrupted at once, before touching anything.  Idempotent: a second
        call does not cancel the rollbacks the first one started.
        """
        if self._interrupted is not None:
            return
        self._interrupted = reason
        for task in list(self._tasks.values()):
            task.cancel(f"torpor: {reason}")

    @property
    def interrupted(self) -> str | None:
        """Why :meth:`interrupt` was called, or ``None``."""
        return self._interrupted

    def in_flight(self) -> list[tuple[int, str, str]]:
        """``(domid, operation, phase)`` for every operation now holding a domain.

        Plain reads of two dicts: safe from another thread or a signal handler.
        """
        out = []
        for domid, operation in list(self._busy.items()):
            ctx = self._contexts.get(domid)
            out.append((domid, operation, str(ctx.phase) if ctx is not None else "validate"))
        return out

    async def close(self) -> None:
        """Interrupt what is in flight (see :meth:`interrupt`), then release everything.

        From another loop than the bound one: refused with WrongEventLoop
        while that loop runs; once it is closed, what needs no loop (the lock
        files) is released and the rest was already gone with the loop.
        """
        try:
            self._check_loop()
        except WrongEventLoop:
            if self._loop is not None and not self._loop.is_closed():
                raise
            self._close_locks()
            return
        if self._tasks:
            self.interrupt("closed")
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._intent.drain()
        await self.monitor.close()
        self._close_locks()

    def _close_locks(self) -> None:
        for fd in self._lock_fds.values():
            os.close(fd)
        self._lock_fds.clear()

    # -- hooks -----------------------------------------------------------------

    async def _call_impl(self, name: str, impl: Any, kwargs: dict[str, Any]) -> Any:
        """One hook implementation; a plugin's bug becomes an OperationError, not a traceback."""
        try:
            res = impl.function(*[kwargs[a] for a in impl.argnames])
            if inspect.isawaitable(res):
                res = await res
        except TorporError:
            raise
        except Exception as e:
            ctx = kwargs.get("ctx")
            raise OperationError(
                f"plugin {impl.plugin_name!r} failed in {name}: {e!r}",
                domid=getattr(ctx, "domid", None),
                phase=getattr(ctx, "phase", None),
                cause=e,
            ) from e
        return res

    async def _first(self, name: str, **kwargs: Any) -> Any:
        """Call a ``firstresult`` hook, awaiting coroutine implementations."""
        caller = getattr(self.pm.hook, name)
        for impl in reversed(caller.get_hookimpls()):
            res = await self._call_impl(name, impl, kwargs)
            if res is not None:
                return res
        return None

    async def _all(self, name: str, **kwargs: Any) -> list[Any]:
        """Call a hook on every implementation (last registered first)."""
        caller = getattr(self.pm.hook, name)
        return [
            await self._call_impl(name, impl, kwargs) for impl in reversed(caller.get_hookimpls())
        ]

    async def _notify(self, name: str, **kwargs: Any) -> None:
        """A lifecycle notification: an embedder's failing listener is logged, not fatal."""
        if not self._listened(name):
            return
        try:
            await self._all(name, **kwargs)
        except Exception:
            log.exception("torpor hook %s raised; carrying on with the operation", name)

    def _phase(
        self, ctx: OperationContext, phase: Phase, timings: list[PhaseTiming]
    ) -> _PhaseScope:
        """``async with self._phase(...)``: time a phase, name it on errors, notify."""
        return _PhaseScope(self, ctx, phase, timings)

    def _listened(self, name: str) -> bool:
        """Whether any plugin implements notification hook ``name`` (skip the call if not)."""
        caller: pluggy.HookCaller = getattr(self.pm.hook, name)
        return bool(caller.get_hookimpls())

    # -- one operation per domain -------------------------------------------------

    @contextlib.asynccontextmanager
    async def _claim(self, domid: int, operation: str) -> AsyncIterator[None]:
        """In-process and cross-process exclusion (a lock file per domain).

        Also where an operation is known to :meth:`interrupt`: its task is
        recorded here, and a cancellation that :meth:`interrupt` caused comes
        out as :class:`~torpor.errors.Interrupted` (the rollback is done
        further in, by :meth:`_reporting`, which knows how far it got).
        """
        self._check_loop()
        if self._interrupted is not None:
            raise Interrupted(
                f"not started: torpor was interrupted ({self._interrupted})",
                reason=self._interrupted,
                clean=True,
                domid=domid,
                phase=Phase.VALIDATE,
                state=_observed_state(self.host.hypervisor, domid),
            )
        held = self._busy.get(domid)
        if held is not None:
            raise DomainBusy(
                f"a {held} of domain {domid} is already in progress",
                domid=domid,
                phase=Phase.VALIDATE,
                state=_observed_state(self.host.hypervisor, domid),
            )
        fd = self._lock_fd(domid)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise DomainBusy(
                f"domain {domid} is busy: {holder} holds "
                f"{os.path.join(self.host.lock_dir, f'domain-{domid}.lock')}",
                domid=domid,
                phase=Phase.VALIDATE,
                state=_observed_state(self.host.hypervisor, domid),
            ) from None
        if domid not in self._lock_named:
            # Who holds it, for another process's DomainBusy message.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"torpor pid {os.getpid()}\n".encode(), 0)
            self._lock_named.add(domid)
        self._busy[domid] = operation
        task = asyncio.current_task()
        if task is not None:
            self._tasks[domid] = task
        try:
            yield
        except asyncio.CancelledError:
            if self._interrupted is None or task is None:
                raise  # the caller's own cancellation: it gets CancelledError
            task.uncancel()
            raise Interrupted(
                f"{operation} interrupted ({self._interrupted}) before the guest was touched",
                reason=self._interrupted,
                clean=True,
                domid=domid,
                phase=Phase.VALIDATE,
                state=_observed_state(self.host.hypervisor, domid),
            ) from None
        finally:
            self._busy.pop(domid, None)
            self._tasks.pop(domid, None)
            self._contexts.pop(domid, None)
            self._intent.end(domid)
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock_fd(self, domid: int) -> int:
        """The domain's lock file, opened once per orchestrator (flock() per operation)."""
        fd = self._lock_fds.get(domid)
        if fd is None:
            if not self._lock_dir_ready:
                os.makedirs(self.host.lock_dir, mode=0o700, exist_ok=True)
                self._lock_dir_ready = True
            path = os.path.join(self.host.lock_dir, f"domain-{domid}.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._lock_fds[domid] = fd
        return fd

    @contextlib.asynccontextmanager
    async def _reporting(self, ctx: OperationContext) -> AsyncIterator[None]:
        """An operation's body: any failure becomes an OperationError naming the
        state the domain is *observed* in afterwards, and is notified once; a
        cancellation is rolled back (:meth:`_roll_back_interrupted`); the
        context is closed either way."""
        try:
            yield
        except TorporError as e:
            err = self._as_operation_error(e, ctx)
            # Truth over claims: whatever the raiser believed, say what is there now.
            err.state = await self._observe(ctx)
            await self._notify("torpor_operation_failed", ctx=ctx, error=err)
            if err is e:
                raise
            raise err from e
        except asyncio.CancelledError:
            interrupted = await self._roll_back_interrupted(ctx)
            await self._notify("torpor_operation_failed", ctx=ctx, error=interrupted)
            task = asyncio.current_task()
            if self._interrupted is None or task is None:
                log.warning("%s", interrupted)
                raise  # the caller cancelled its task: it gets CancelledError, as asyncio expects
            task.uncancel()
            raise interrupted from None
        finally:
            await ctx.close()

    def _as_operation_error(self, e: TorporError, ctx: OperationContext) -> OperationError:
        """Every failure of an operation is an OperationError (its state is set by the caller).

        A lost xenstore connection or a failing hypervisor call mid-operation
        arrives as its own error; the caller gets it wrapped, with the
        original as ``cause``.
        """
        _locate(e, ctx)
        if isinstance(e, OperationError):
            return e
        return OperationError(
            f"{ctx.operation} failed in phase {ctx.phase}: {e.message}",
            domid=ctx.domid,
            phase=ctx.phase,
            cause=e,
        )

    async def _observe(self, ctx: OperationContext) -> str:
        """The domain's state as seen now: the hypervisor's flags, ACPI S3, and,
        for a guest with a device model, QEMU's run state when it is not the
        one that goes with the domain's (``running, device model paused``).

        ``gone`` when the hypervisor no longer knows the domain, ``unknown``
        when it cannot be asked.  Never what torpor meant to do.
        """
        hv = self.host.hypervisor
        try:
            info = hv.domain_info(ctx.domid)
        except HypervisorError as e:
            return "gone" if e.errno == errno.ESRCH else "unknown"
        except TorporError:
            return "unknown"
        state = "S3" if self._in_s3(info) and not info.shutdown else info.state_word()
        gt = ctx.guest_type
        if gt is None or not gt.device_model or state not in ("running", "S3"):
            return state
        expected = "suspended" if state == "S3" else "running"
        try:
            dm = await ctx.device_model()
            run_state = await dm.query_status(timeout=min(ctx.timeouts.device_model, 5.0))
        except TorporError:
            run_state = "gone"
        return state if run_state == expected else f"{state}, device model {run_state}"

    async def _roll_back_interrupted(self, ctx: OperationContext) -> Interrupted:
        """An operation was cancelled: undo what it had done, say what is left.

        What it had done is in ``ctx.facts`` (``requested``: the guest was
        asked; ``resuming``: a resume had begun acting).  Nothing asked,
        nothing undone.  Otherwise :meth:`_bring_back`, within the settle
        deadline for a suspend already under way.  A guest not back running
        keeps its intent record, marked, for ``torpor recover``.
        """
        reason = self._interrupted or "cancelled"
        at = ctx.phase
        actions: list[str] = []
        problem: TorporError | None = None
        touched = bool(ctx.facts.get("requested") or ctx.facts.get("resuming"))
        if touched:
            try:
                actions = await self._bring_back(
                    ctx, asked=bool(ctx.facts.get("requested")), timings=[]
                )
            except TorporError as e:
                problem = e
        state = await self._observe(ctx)
        clean = problem is None and (state == "running" or not touched)
        if actions:
            done = "; ".join(actions)
        else:
            done = "nothing was left to undo" if touched else "nothing had been done to the guest"
        where = "between checkpoints" if ctx.facts.get("pacing") else f"in phase {at}"
        message = f"{ctx.operation} interrupted ({reason}) {where}: {done}"
        if problem is not None:
            message += f"; bringing it back failed: {problem.message}"
        message += f"; guest left {state}"
        if not clean:
            message += f"; run `torpor recover {ctx.domid}`"
            self._intent.keep(ctx.domid, interrupted=reason, phase=str(at), left=state)
        return Interrupted(
            message,
            reason=reason,
            actions=tuple(actions),
            clean=clean,
            domid=ctx.domid,
            phase=at,
            state=state,
            cause=problem,
        )

    async def _bring_back(
        self, ctx: OperationContext, *, asked: bool, timings: list[PhaseTiming]
    ) -> list[str]:
        """Whatever was done to the guest, bring it back to running; what was done, in words.

        The rollback of an interrupted operation and the heart of
        :meth:`recover` (libxl: the cancel in domain_suspend_common_wait_guest,
        then libxl__domain_resume):

        1. a ``control/shutdown`` request still pending is withdrawn, in a
           transaction (a last-moment ack wins: the guest is then on its way);
        2. a guest that was asked and may be suspending is given ``settle``
           seconds to finish -- resuming one half-way in is not possible;
        3. a suspended guest is resumed cooperatively (device model first,
           ``xc_domain_resume(fast=1)``, XS_RESUME, verify), one in S3 woken;
        4. one running after a resume that did not reach XS_RESUME gets it
           (xenstored re-arms ``@releaseDomain`` only then).

        A guest shut down for another reason (crashed...) cannot be brought
        back: ResumeFailed.
        """
        actions: list[str] = []
        path = f"{ctx.dompath}/control/shutdown"
        self._refresh(ctx)
        if not ctx.domain.shutdown and await ctx.xenstore.read_or(path, "") == "suspend":
            async with self._phase(ctx, Phase.CANCEL, timings):
                if await self._cancel_request(ctx, path):
                    asked = True  # taken at the last moment: it is on its way
                else:
                    actions.append("withdrew the pending suspend request")
                    asked = False
        if asked and not ctx.domain.shutdown and not ctx.facts.get("s3"):
            ctx.facts["settling"] = True  # progress: waiting for a suspend under way
            async with self._phase(ctx, Phase.SHUTDOWN, timings):
                with contextlib.suppress(Timeout):
                    await self._wait(
                        ctx,
                        lambda: self._first("torpor_check_suspended", ctx=ctx),
                        timeout=ctx.timeouts.settle,
                        sources=_Sources(device_model=ctx.method == SuspendMethod.ACPI_S3),
                        what="a suspend already under way",
                    )
            ctx.facts.pop("settling", None)
        self._refresh(ctx)
        info = ctx.domain
        if info.shutdown and not info.suspended:
            raise ResumeFailed(
                f"domain {ctx.domid} is {info.state_word()}; torpor cannot bring it back",
                state=info.state_word(),
            )
        if info.suspended or ctx.facts.get("s3"):
            ctx.cooperative = True
            result = await self._resume(ctx)
            timings.extend(result.timings)
            actions.append("resumed it cooperatively" if info.suspended else "woke it from S3")
        elif ctx.facts.get("resumed") and not ctx.facts.get("xs_resumed"):
            async with self._phase(ctx, Phase.XS_RESUME, timings):
                await ctx.xenstore.resume(ctx.domid)
                ctx.facts["xs_resumed"] = True
            actions.append(
                "sent XS_RESUME, which re-arms xenstored's @releaseDomain (the domain had "
                "been resumed by an operation that may not have sent it)"
            )
        return actions

    # -- context -------------------------------------------------------------------

    def _domain_info(self, domid: int, phase: Phase) -> DomainInfo:
        try:
            return self.host.hypervisor.domain_info(domid)
        except HypervisorError as e:
            if e.errno == errno.ESRCH:
                raise NoSuchDomain(
                    f"domain {domid} does not exist",
                    domid=domid,
                    phase=phase,
                    cause=e,
                    state="gone",
                ) from e
            raise

    async def classify(self, info: DomainInfo) -> GuestType:
        """The plugins' verdict on what guest type a domain is (UnsupportedGuest if none)."""
        self._check_loop()
        gt = await self._first("torpor_classify_domain", domain=info, host=self.host)
        if gt is None:
            raise UnsupportedGuest(
                f"no torpor plugin claims domain {info.domid} (hvm={info.hvm}, "
                f"emulation flags {info.emulation_flags:#x}); installed: "
                + ", ".join(n for n, _ in self.pm.list_name_plugin()),
                domid=info.domid,
                phase=Phase.VALIDATE,
                state=info.state_word(),  # just read; nothing was done to it
            )
        assert isinstance(gt, GuestType)
        return gt

    async def _context(self, operation: str, domid: int) -> OperationContext:
        info = self._domain_info(domid, Phase.VALIDATE)
        ctx = OperationContext(
            operation=operation, domid=domid, host=self.host, timeouts=self.timeouts, domain=info
        )
        if domid in self._busy:
            self._contexts[domid] = ctx
        ctx.guest_type = await self.classify(info)
        ctx.facts["s3"] = self._in_s3(info)
        return ctx

    def _in_s3(self, info: DomainInfo) -> bool:
        if not info.hvm:
            return False
        try:
            return self.host.hypervisor.get_hvm_param(info.domid, HVM_PARAM_ACPI_S_STATE) != 0
        except HypervisorError:
            return False

    def _refresh(self, ctx: OperationContext) -> None:
        try:
            ctx.domain = self.host.hypervisor.domain_info(ctx.domid)
        except HypervisorError as e:
            if e.errno == errno.ESRCH:
                raise DomainVanished(
                    f"domain {ctx.domid} was destroyed during the {ctx.operation}",
                    domid=ctx.domid,
                    phase=ctx.phase,
                    cause=e,
                    state="gone",
                ) from e
            raise
        ctx.facts["s3"] = self._in_s3(ctx.domain)

    # -- waiting ---------------------------------------------------------------------

    async def _wait(
        self,
        ctx: OperationContext,
        judge: Callable[[], Awaitable[Verdict | None]],
        *,
        timeout: float,
        sources: _Sources,
        what: str,
        fresh: bool = False,
    ) -> Verdict:
        """Re-ask ``judge`` on every relevant event until done or failed; Timeout after.

        ``fresh``: ``ctx.domain`` was just read; the first judgement uses it.
        """
        loop = asyncio.get_running_loop()
        wake = _Waker()
        undo: list[Callable[[], None]] = []
        watches = []
        await self.monitor.start()
        undo.append(self.monitor.listen_domain(ctx.domid, wake.set))
        if sources.port is not None:
            undo.append(self.monitor.listen_port(sources.port, wake.set))
        ctx.set_waker(wake.set)
        xs = self.host.xenstore.aio
        try:
            for path in sources.xs_paths:
                watches.append(await xs.watch(path, lambda _p, _t: wake.set()))
            if sources.device_model:
                try:
                    await ctx.device_model()
                except TorporError:
                    self._refresh(ctx)  # gone with its domain: DomainVanished
                    raise
            deadline = loop.time() + timeout
            refresh = not fresh
            while True:
                wake.clear()
                if refresh:
                    self._refresh(ctx)
                refresh = True
                try:
                    verdict = await judge()
                except TorporError:
                    # A judge that failed because the domain went away (its device
                    # model with it) is reported as the domain going away.
                    self._refresh(ctx)
                    raise
                if verdict is not None and (verdict.done or verdict.failed):
                    return verdict
                remaining = deadline - loop.time()
                if remaining <= 0 or not await wake.wait(remaining):
                    break
            raise Timeout(
                f"{what} did not happen within {timeout:g}s",
                deadline=timeout,
                domid=ctx.domid,
                phase=ctx.phase,
            )
        finally:
            ctx.set_waker(None)
            for u in undo:
                u()
            for w in watches:
                await xs.unwatch(w)

    # -- suspend -----------------------------------------------------------------------

    async def suspend(
        self,
        domid: int,
        *,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> Result:
        """Suspend a domain: it ends shut down with reason suspend (or asleep in S3).

        Raises an :class:`~torpor.errors.OperationError` subclass saying what
        failed and what state the domain was left in (``err.state``).
        """
        self._check_loop()
        domid = validate_domid(domid)
        timeouts = attrs.evolve(
            self.timeouts,
            ack=self.timeouts.ack if ack_timeout is None else ack_timeout,
            suspend=self.timeouts.suspend if suspend_timeout is None else suspend_timeout,
        )
        async with self._claim(domid, "suspend"):
            ctx = await self._context("suspend", domid)
            ctx.timeouts = timeouts
            async with self._reporting(ctx):
                return await self._suspend(ctx)

    async def _suspend(self, ctx: OperationContext) -> Result:
        timings: list[PhaseTiming] = []
        gt = ctx.guest_type
        assert gt is not None
        async with self._phase(ctx, Phase.VALIDATE, timings):
            info = ctx.domain
            if info.dying:
                raise InvalidState(f"domain {ctx.domid} is dying", state="dying")
            if info.suspended:
                raise AlreadySuspended(
                    f"domain {ctx.domid} is already suspended", state="suspended"
                )
            if info.shutdown:
                what = ShutdownReason.describe(info.shutdown_reason or 0)
                raise InvalidState(
                    f"domain {ctx.domid} is shut down ({what}); cannot suspend",
                    state=info.state_word(),
                )
            shutdown_path = f"{ctx.dompath}/control/shutdown"
            ack_wake = _Waker()
            early_watch: asyncio.Task[Any] | None = None
            if gt.xenstore_handshake and not ctx.facts["s3"]:
                # Likely the xenstore handshake: register its watch now, in flight
                # together with the event-channel read (one round trip, not two).
                early_watch = asyncio.ensure_future(
                    ctx.xenstore.watch(shutdown_path, lambda _p, _t: ack_wake.set())
                )
            try:
                if (
                    gt.event_channel
                    and not ctx.facts["s3"]
                    and "suspend_local_port" not in ctx.facts  # bound for the session
                ):
                    port = await ctx.xenstore.read_or(
                        f"{ctx.dompath}/device/suspend/event-channel", ""
                    )
                    # Guest-written: ASCII digits only ("²".isdigit() is True, int() refuses it).
                    if (
                        port.isascii()
                        and port.isdigit()
                        and len(port) <= 6
                        and 0 < int(port) < 1 << 17
                    ):
                        ctx.facts["suspend_event_channel"] = int(port)
                default = default_suspend_method(ctx)
                chosen = await self._first("torpor_choose_suspend_method", ctx=ctx, default=default)
                ctx.method = SuspendMethod(chosen or default)
            except BaseException:
                if early_watch is not None:
                    await _drop_watch(ctx, early_watch)
                raise
        await self._notify("torpor_before_suspend", ctx=ctx)
        method = ctx.method
        acked = False
        ack_watch = None
        try:
            async with self._phase(ctx, Phase.REQUEST, timings):
                if early_watch is not None and method != SuspendMethod.XENSTORE:
                    await _drop_watch(ctx, early_watch)
                    early_watch = None
                if method == SuspendMethod.XENSTORE:
                    # Watch before writing: an ack can't slip between the two.
                    if early_watch is not None:
                        ack_watch, early_watch = await early_watch, None
                    else:
                        ack_watch = await ctx.xenstore.watch(
                            shutdown_path, lambda _p, _t: ack_wake.set()
                        )
                if self.record_intent and ctx.domid not in self._intent._records:
                    await self._intent.begin(
                        ctx.domid, ctx.operation, method=str(method), requested=True
                    )
                ctx.facts["requested"] = True  # from here on, a rollback has work to do
                done = await self._first("torpor_request_suspend", ctx=ctx, method=method)
                if not done:
                    raise OperationError(
                        f"no plugin can request a suspend by {method} for guest type {gt.name}",
                        state="running",
                    )
            if method == SuspendMethod.XENSTORE:
                async with self._phase(ctx, Phase.ACK, timings) as ack_phase:
                    acked = await self._wait_ack(ctx, shutdown_path, ack_wake)
                    if not acked:  # the phase failed, though the cancel may yet find an ack
                        ack_phase.error = Timeout(
                            f"the guest did not acknowledge the suspend request within "
                            f"{ctx.timeouts.ack:g}s",
                            deadline=ctx.timeouts.ack,
                            domid=ctx.domid,
                            phase=Phase.ACK,
                        )
                await ctx.xenstore.unwatch(ack_watch)  # type: ignore[arg-type]
                ack_watch = None
                if not acked:
                    async with self._phase(ctx, Phase.CANCEL, timings):
                        acked = await self._cancel_request(ctx, shutdown_path)
                    if not acked:
                        self._refresh(ctx)
                        raise AckTimeout(
                            f"guest did not acknowledge the suspend request within "
                            f"{ctx.timeouts.ack:g}s; request withdrawn, guest left "
                            f"{ctx.domain.state_word()}",
                            phase=Phase.ACK,
                            state=ctx.domain.state_word(),
                        )
            async with self._phase(ctx, Phase.SHUTDOWN, timings):
                verdict = await self._wait_suspended(ctx, acked)
        finally:
            if ack_watch is not None:  # the request or the ack wait failed
                with contextlib.suppress(TorporError):
                    await ctx.xenstore.unwatch(ack_watch)
            if method == SuspendMethod.EVENT_CHANNEL and not ctx.facts.get("session"):
                with contextlib.suppress(TorporError):
                    release_suspend_event_channel(ctx)
        asleep = verdict.state == "S3" and not ctx.domain.shutdown
        ctx.facts["s3"] = bool(ctx.facts.get("s3") or asleep)
        if gt.device_model and not asleep:
            try:
                async with self._phase(ctx, Phase.DEVICE_MODEL_SUSPEND, timings):
                    await self._all("torpor_device_model_suspend", ctx=ctx)
            except TorporError as e:
                await self._rollback(ctx, e)
        result = Result(
            domid=ctx.domid,
            operation=ctx.operation,
            guest_type=gt.name,
            outcome="asleep" if asleep else "suspended",
            state="S3" if asleep else "suspended",
            method=method,
            timings=tuple(timings),
        )
        await self._notify("torpor_after_suspend", ctx=ctx, result=result)
        return result

    async def _wait_ack(self, ctx: OperationContext, path: str, wake: _Waker) -> bool:
        """The guest acks by leaving anything but ``suspend`` (or removing the node).

        Read, then wait for a watch event, then read again: a watch event
        carries no value, and an ack can race any bookkeeping of which event
        came when, so each wake-up is judged by reading the node.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ctx.timeouts.ack
        while True:
            wake.clear()
            value = await ctx.xenstore.read_or(path, None)
            if value != "suspend":
                return True
            remaining = deadline - loop.time()
            if remaining <= 0 or not await wake.wait(remaining):
                return False

    async def _cancel_request(self, ctx: OperationContext, path: str) -> bool:
        """Withdraw an unanswered request in a transaction; True if the guest acked after all.

        libxl: re-read in a transaction; an ack at the last moment wins; else
        write "" and commit, retrying on EAGAIN.
        """
        xs = ctx.xenstore

        async def body(tx: Any) -> bool:
            value = await xs.read_or(path, None, tx=tx)
            if value != "suspend":
                return True
            await xs.write(path, "", tx=tx)
            return False

        acked: bool = await xs.run_transaction(body)
        ctx.facts["cancelled"] = not acked
        return acked

    async def _wait_suspended(self, ctx: OperationContext, acked: bool) -> Verdict:
        method = ctx.method
        gt = ctx.guest_type
        assert gt is not None
        sources = _Sources(
            port=ctx.facts.get("suspend_local_port")
            if method == SuspendMethod.EVENT_CHANNEL
            else None,
            device_model=method == SuspendMethod.ACPI_S3,
        )
        try:
            verdict = await self._wait(
                ctx,
                lambda: self._first("torpor_check_suspended", ctx=ctx),
                timeout=ctx.timeouts.suspend,
                sources=sources,
                what=f"domain {ctx.domid} suspending",
            )
        except Timeout as e:
            state = ctx.domain.state_word()
            if method == SuspendMethod.XENSTORE and acked:
                raise SuspendTimeout(
                    f"guest acknowledged the suspend request but did not suspend within "
                    f"{ctx.timeouts.suspend:g}s: it probably failed to freeze its tasks; "
                    f"guest left {state}",
                    state=state,
                    cause=e,
                ) from e
            raise SuspendTimeout(
                f"domain did not suspend within {ctx.timeouts.suspend:g}s after the {method} "
                f"request; guest left {state}",
                state=state,
                cause=e,
            ) from e
        if verdict.failed:
            if verdict.reason is not None:
                raise UnexpectedShutdown(
                    f"domain shut down with reason {ShutdownReason.describe(verdict.reason)} "
                    f"instead of suspending: {verdict.detail}",
                    reason=verdict.reason,
                    state=verdict.state,
                )
            raise OperationError(
                f"suspend failed: {verdict.detail}", state=verdict.state, cause=verdict.cause
            )
        return verdict

    async def _rollback(self, ctx: OperationContext, error: TorporError) -> None:
        """A suspend failed after the guest suspended: resume it cooperatively, then raise.

        libxl__domain_resume's order: the device model first, then
        ``xc_domain_resume(fast=1)``, then XS_RESUME.  Each step is tried even
        if the one before failed, every failure is named in the error, and the
        state the error carries is the one observed afterwards.
        """
        log.warning("domain %d: %s; resuming it cooperatively", ctx.domid, error)
        failures: list[str] = []
        if ctx.guest_type is not None and ctx.guest_type.device_model:
            try:
                await self._all("torpor_device_model_resume", ctx=ctx)
            except TorporError as e:
                failures.append(f"the device model did not resume: {e.message}")
        try:
            self.host.hypervisor.resume(ctx.domid, fast=True)
        except TorporError as e:
            failures.append(f"xc_domain_resume(fast=1) failed: {e.message}")
        else:
            try:
                await ctx.xenstore.resume(ctx.domid)
            except TorporError as e:
                failures.append(f"XS_RESUME failed: {e.message}")
        state = await self._observe(ctx)
        raise OperationError(
            f"{ctx.operation} failed in phase {ctx.phase}: {error.message}; "
            + ("; ".join(failures) if failures else "guest resumed cooperatively")
            + f"; guest left {state}",
            state=state,
            cause=error,
            phase=ctx.phase,
        ) from error

    # -- resume ------------------------------------------------------------------------

    async def resume(self, domid: int, *, cooperative: bool = True, force: bool = False) -> Result:
        """Resume a suspended domain (or wake one asleep in S3).

        ``cooperative=True`` (fast): the guest's suspend hypercall returns 1 and
        it reuses everything.  ``cooperative=False`` in the same domain crashes
        today's Linux guests; it is refused unless the guest type says it
        survives it, or ``force=True`` (then the outcome is reported as seen).
        """
        self._check_loop()
        domid = validate_domid(domid)
        async with self._claim(domid, "resume"):
            ctx = await self._context("resume", domid)
            ctx.cooperative = cooperative
            ctx.force = force
            async with self._reporting(ctx):
                return await self._resume(ctx)

    async def _resume(self, ctx: OperationContext) -> Result:
        timings: list[PhaseTiming] = []
        gt = ctx.guest_type
        assert gt is not None
        cooperative = bool(ctx.cooperative)
        async with self._phase(ctx, Phase.VALIDATE, timings):
            info = ctx.domain
            shut = info.suspended
            s3 = bool(ctx.facts.get("s3"))
            if info.dying:
                raise InvalidState(f"domain {ctx.domid} is dying", state="dying")
            if info.shutdown and not shut:
                what = ShutdownReason.describe(info.shutdown_reason or 0)
                raise InvalidState(
                    f"domain {ctx.domid} is shut down with reason {what}, not suspended; "
                    "it cannot be resumed",
                    state=info.state_word(),
                )
            if not shut and not s3:
                raise NotSuspended(
                    f"domain {ctx.domid} is not suspended ({info.state_word()}); nothing done",
                    state=info.state_word(),
                )
            unsafe = not gt.survives_inplace_noncooperative and not ctx.force
            if shut and not cooperative and ctx.in_place and unsafe:
                raise UnsafeResume(
                    f"refusing a non-cooperative resume of domain {ctx.domid} in the same "
                    f"domain: {gt.name} guests re-register their vcpu_info on it, which the "
                    "hypervisor refuses (EINVAL) in a domain that already registered, and "
                    "Linux panics (seen on real Xen). Resume cooperatively, restore into a "
                    "new domain, or force it.",
                    state="suspended",
                )
        await self._notify("torpor_before_resume", ctx=ctx)
        if self.record_intent and ctx.domid not in self._intent._records:
            await self._intent.begin(ctx.domid, ctx.operation, cooperative=cooperative)
        ctx.facts["resuming"] = True  # from here on, an interrupted resume is finished
        if shut:
            if gt.device_model:
                async with self._phase(ctx, Phase.DEVICE_MODEL_RESUME, timings):
                    await self._all("torpor_device_model_resume", ctx=ctx)
            async with self._phase(ctx, Phase.RESUME, timings):
                try:
                    self.host.hypervisor.resume(ctx.domid, fast=cooperative)
                    ctx.facts["resumed"] = True
                except HypervisorError as e:
                    self._refresh(ctx)
                    raise ResumeFailed(
                        f"xc_domain_resume(fast={int(cooperative)}) failed: {e}",
                        state=ctx.domain.state_word(),
                        cause=e,
                    ) from e
            async with self._phase(ctx, Phase.XS_RESUME, timings):
                # Every time: xenstored re-arms @releaseDomain only on XS_RESUME.
                await ctx.xenstore.resume(ctx.domid)
                ctx.facts["xs_resumed"] = True
        async with self._phase(ctx, Phase.GUEST_RESUME, timings):
            if shut:  # resumed: the hooks see the domain as it is now
                self._refresh(ctx)
            await self._all("torpor_resume_guest", ctx=ctx)
        async with self._phase(ctx, Phase.VERIFY, timings):
            await self._verify_resumed(ctx, shut=shut, s3=s3)
        ctx.facts.pop("requested", None)  # resumed: nothing of the suspend is left to undo
        ctx.facts.pop("resuming", None)
        result = Result(
            domid=ctx.domid,
            operation=ctx.operation,
            guest_type=gt.name,
            outcome="resumed",
            state=ctx.domain.state_word(),
            cooperative=cooperative if shut else None,
            timings=tuple(timings),
            details=(("woke_from_s3", True),) if s3 else (),
        )
        await self._notify("torpor_after_resume", ctx=ctx, result=result)
        return result

    async def _verify_resumed(self, ctx: OperationContext, *, shut: bool, s3: bool) -> None:
        gt = ctx.guest_type
        assert gt is not None
        sources = _Sources(
            xs_paths=() if ctx.cooperative else (f"{ctx.dompath}/device",),
            device_model=gt.device_model and s3,
        )
        timeout = ctx.timeouts.wake if s3 and not shut else ctx.timeouts.resume

        def judge() -> Awaitable[Verdict | None]:
            return self._first("torpor_check_resumed", ctx=ctx)

        try:
            verdict = await self._wait(
                ctx,
                judge,
                timeout=timeout,
                sources=sources,
                what=f"domain {ctx.domid} running again",
                fresh=shut,
            )
        except Timeout as e:
            raise ResumeFailed(
                f"the guest did not come back within {timeout:g}s",
                state=ctx.domain.state_word(),
                cause=e,
            ) from e
        forced = (
            shut and not ctx.cooperative and ctx.in_place and not gt.survives_inplace_noncooperative
        )
        if verdict.failed:
            if forced:
                raise ResumeFailed(
                    f"forced in-place non-cooperative resume: the guest {verdict.state} "
                    f"({verdict.detail}) -- as Linux guests do when they re-register vcpu_info "
                    "in the same domain",
                    state=verdict.state,
                )
            raise ResumeFailed(f"resume failed: {verdict.detail}", state=verdict.state)
        if forced:
            # Forced: watch a while for the crash or reboot a Linux guest goes into.
            async def crashed() -> Verdict | None:
                v = await judge()
                return v if v is not None and v.failed else Verdict.pending()

            try:
                verdict = await self._wait(
                    ctx,
                    crashed,
                    timeout=ctx.timeouts.settle,
                    sources=sources,
                    what="a crash after the forced resume",
                )
            except Timeout:
                return  # it survived the settle window
            raise ResumeFailed(
                f"forced in-place non-cooperative resume: the guest {verdict.state} "
                f"({verdict.detail}) -- as Linux guests do when they re-register vcpu_info "
                "in the same domain",
                state=verdict.state,
            )

    # -- checkpoint --------------------------------------------------------------------

    async def checkpoint(
        self,
        domid: int,
        callback: Callable[[Result], Any] | None = None,
        *,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> Result:
        """Suspend, run ``callback(suspend_result)`` while suspended, resume cooperatively.

        The guest is resumed even if the callback fails; then the callback's
        error is raised (as an OperationError in phase ``callback``).
        """
        results = await self.checkpoints(
            domid, 1, callback=callback, ack_timeout=ack_timeout, suspend_timeout=suspend_timeout
        )
        return results[0]

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

        The domain is claimed once, classified once, its intent recorded once,
        and a suspend event channel, if the guest has one, stays bound and
        subscribed for the whole session.  ``interval`` seconds pass between
        checkpoints (the caller's pacing); ``on_result`` sees each result as
        it comes.  The first failure ends the session with the guest resumed.
        """
        self._check_loop()
        domid = validate_domid(domid)
        if count < 1:
            raise UsageError("a checkpoint session needs at least one checkpoint")
        timeouts = attrs.evolve(
            self.timeouts,
            ack=self.timeouts.ack if ack_timeout is None else ack_timeout,
            suspend=self.timeouts.suspend if suspend_timeout is None else suspend_timeout,
        )
        results: list[Result] = []
        async with self._claim(domid, "checkpoint"):
            ctx = await self._context("checkpoint", domid)
            ctx.timeouts = timeouts
            ctx.facts["session"] = True

            async def release() -> None:  # the session's channel, however it ends
                if "suspend_local_port" in ctx.facts:
                    with contextlib.suppress(TorporError):
                        release_suspend_event_channel(ctx)

            ctx.on_close(release)
            async with self._reporting(ctx):
                for i in range(count):
                    if i:
                        if interval:
                            ctx.facts["pacing"] = True
                            await asyncio.sleep(interval)  # the caller's pacing
                            ctx.facts.pop("pacing")
                        self._refresh(ctx)
                    result = await self._checkpoint_once(ctx, callback)
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
        return results

    async def _checkpoint_once(
        self, ctx: OperationContext, callback: Callable[[Result], Any] | None
    ) -> Result:
        for fact in ("cancelled", "requested", "resuming", "resumed", "xs_resumed"):
            ctx.facts.pop(fact, None)
        ctx.cooperative = None
        suspended = await self._suspend(ctx)
        t0 = time.perf_counter()
        callback_error: BaseException | None = None
        if callback is not None:
            try:
                res = callback(suspended)
                if inspect.isawaitable(res):
                    await res
            except Exception as e:
                callback_error = e
        cb_seconds = time.perf_counter() - t0
        ctx.cooperative = True
        self._refresh(ctx)
        resumed = await self._resume(ctx)
        if callback_error is not None:
            raise OperationError(
                f"checkpoint callback failed: {callback_error!r}; guest resumed",
                domid=ctx.domid,
                phase=Phase.CALLBACK,
                cause=callback_error,
                state=resumed.state,
            )
        return Result(
            domid=ctx.domid,
            operation="checkpoint",
            guest_type=suspended.guest_type,
            outcome="checkpointed",
            state=resumed.state,
            method=suspended.method,
            cooperative=True,
            timings=(
                *suspended.timings,
                PhaseTiming(Phase.CALLBACK, cb_seconds),
                *resumed.timings,
            ),
        )

    # -- save, restore, migrate ----------------------------------------------------

    def _interruption(self, message: str, *, state: str) -> Interrupted | None:
        """A cancellation outside any domain's operation: the Interrupted to raise
        if :meth:`interrupt` caused it (the task's cancel request is consumed),
        or ``None`` for a caller's own cancellation (re-raise CancelledError)."""
        task = asyncio.current_task()
        if self._interrupted is None or task is None:
            return None
        task.uncancel()
        return Interrupted(message, reason=self._interrupted, clean=True, state=state)

    async def _completing(self, fn: Callable[..., T], *args: Any) -> T:
        """The last step of a save or migration whose product exists (the
        verified file, the guest running at the destination): it runs to its
        end even if interrupted, and the operation then completes -- undoing
        it would leave two copies of the guest, or none."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # whoever cancelled: finishing is the only safe end
            return fut.result()

    def _builder(self, host: Host, what: str) -> DomainBuilder:
        if host.builder is None:
            raise BackendUnavailable(f"host {host.name} cannot {what} domains (no domain builder)")
        return host.builder

    async def _save_state(self, ctx: OperationContext) -> SavedDomain:
        """The builder's state plus the device model's saved state."""
        builder = self._builder(self.host, "save")
        saved = await _in_thread(builder.save, ctx.domid)
        dm_state = ctx.facts.get("device_model_state")
        if dm_state:
            # libxl puts QEMU's saved device state in the stream (EMULATOR_CONTEXT),
            # unless the builder already carried the device model's state itself.
            if saved.device_model is None:
                with open(dm_state, "rb") as f:
                    saved = attrs.evolve(saved, device_model=f.read())
            os.unlink(dm_state)
        return attrs.evolve(
            saved, source={**saved.source, "host": self.host.name, "saved_at": time.time()}
        )

    async def save(self, domid: int, path: str | os.PathLike[str]) -> Result:
        """Suspend a domain, write its state to ``path``, then destroy it.

        The domain is destroyed only once the file is complete and verified
        (read back, every checksum checked).  A failure at any point before
        that resumes the guest cooperatively where it was, and says why.
        """
        self._check_loop()
        from torpor.builder import FileSaver
        from torpor.image import PartialFile, read_image, write_partial

        domid = validate_domid(domid)
        target = os.fspath(path)
        builder = self._builder(self.host, "save")  # refuse before touching the guest
        partial = await _in_thread(PartialFile, target)  # so is a place we can't write
        try:
            async with self._claim(domid, "save"):
                ctx = await self._context("save", domid)
                timings: list[PhaseTiming] = []
                async with self._reporting(ctx):
                    if isinstance(builder, FileSaver):
                        return await self._save_file(ctx, builder, partial)
                    suspended = await self._suspend(ctx)
                    timings.extend(suspended.timings)
                    try:
                        async with self._phase(ctx, Phase.SAVE, timings):
                            saved = await self._save_state(ctx)
                            size = await _in_thread(write_partial, saved, partial)
                            # Verified before it takes FILE's place: a file
                            # already there stays until the new one is good.
                            check = await _in_thread(read_image, partial.path)
                            if check.checksum() != saved.checksum():
                                raise ImageError(f"{target} does not read back as written")
                            partial.commit()
                    except TorporError as e:
                        await self._rollback_migration(ctx, e)
                    async with self._phase(ctx, Phase.CLEANUP, timings):
                        await self._completing(builder.destroy, domid)
        finally:
            partial.discard()
        return Result(
            domid=domid,
            operation="save",
            guest_type=ctx.guest_type_name,
            outcome="saved",
            state=_destroyed_state(self.host.hypervisor, domid),
            method=ctx.method,
            timings=tuple(timings),
            details=(
                ("file", target),
                ("bytes", size),
                ("checksum", saved.checksum()),
                ("memory_checksum", saved.memory_checksum()),
            ),
        )

    async def _save_file(
        self, ctx: OperationContext, builder: FileSaver, partial: PartialFile
    ) -> Result:
        """Save through a builder that writes the file itself (real Xen: xl's format).

        ``xc_domain_save`` calls the suspend from inside: the builder runs in a
        worker thread and its ``suspend`` callable runs :meth:`_suspend` on this
        loop, blocking that thread until the domain is shut down for suspend
        (True) or the suspend failed (False; the guest then runs, as the
        suspend left it).  The file is written under a temporary name next to
        ``target``, read back and walked to its end, renamed, and only then is
        the domain destroyed.  Any failure before that removes the partial
        file and, if the guest had suspended, resumes it cooperatively.
        """
        loop = asyncio.get_running_loop()
        domid = ctx.domid
        suspended: list[Result] = []
        suspend_errors: list[BaseException] = []
        waited = [0.0]

        async def suspend_in_save() -> Result:
            try:
                if self._interrupted is not None:  # the save was interrupted: do not start
                    raise Interrupted(
                        f"save interrupted ({self._interrupted}) before the guest was asked",
                        reason=self._interrupted,
                        clean=True,
                    )
                result = await self._suspend(ctx)
                self._refresh(ctx)
                if not ctx.domain.suspended:
                    raise OperationError(
                        f"domain {domid} is {ctx.domain.state_word()}, not shut down for "
                        "suspend; xc_domain_save needs it shut down",
                        state=ctx.domain.state_word(),
                    )
                return result
            finally:
                ctx.phase = Phase.SAVE

        def suspend() -> bool:  # called by xc_domain_save, in its thread
            t = time.perf_counter()
            try:
                suspended.append(asyncio.run_coroutine_threadsafe(suspend_in_save(), loop).result())
                return True
            except BaseException as e:  # reported below, never into C
                suspend_errors.append(e)
                return False
            finally:
                waited[0] = time.perf_counter() - t

        def device_model_state() -> bytes | None:
            dm_state = ctx.facts.get("device_model_state")
            if not dm_state:
                return None
            with open(dm_state, "rb") as f:
                return f.read()

        def drop_device_model_state() -> None:
            # QEMU's saved state is in the file now, or no longer wanted.
            dm_state = ctx.facts.pop("device_model_state", None)
            if dm_state:
                with contextlib.suppress(OSError):
                    os.unlink(dm_state)

        timings: list[PhaseTiming] = []
        save_timings: list[PhaseTiming] = []
        target = partial.target
        try:
            async with self._phase(ctx, Phase.VALIDATE, timings):
                job = await _in_thread(builder.prepare_save, domid)
            async with self._phase(ctx, Phase.SAVE, save_timings):
                fd = partial.take_fd()
                try:
                    await _in_thread(builder.write_save, job, fd, suspend, device_model_state)
                    await _in_thread(os.fsync, fd)
                finally:
                    os.close(fd)
                check = await _in_thread(builder.verify_save, partial.path)
                partial.commit()
        except asyncio.CancelledError:
            partial.discard()
            drop_device_model_state()
            raise
        except (TorporError, OSError) as raw:
            partial.discard()
            drop_device_model_state()
            e = (
                raw
                if isinstance(raw, TorporError)
                else ImageError(f"writing {target}: {raw.strerror or raw}", cause=raw)
            )
            if suspend_errors:
                first = suspend_errors[0]
                if isinstance(first, TorporError):
                    raise first from e
                raise OperationError(
                    f"suspend inside the save failed: {first!r}",
                    state=_observed_state(self.host.hypervisor, domid),
                    cause=first,
                ) from e
            if not suspended:
                _locate(e, ctx)
                raise MigrationFailed(
                    f"save failed before the guest was asked to suspend: {e.message}; "
                    f"nothing written, guest left {_observed_state(self.host.hypervisor, domid)}",
                    state=_observed_state(self.host.hypervisor, domid),
                    cause=e,
                    phase=e.phase,
                    domid=domid,
                ) from e
            ctx.phase = Phase.SAVE
            await self._rollback_migration(ctx, e)
        drop_device_model_state()
        # The suspend ran inside the save phase (xc_domain_save called it).
        save_seconds = sum(t.seconds for t in save_timings) - waited[0]
        async with self._phase(ctx, Phase.CLEANUP, save_timings):
            await self._completing(builder.destroy, domid)
        return Result(
            domid=domid,
            operation="save",
            guest_type=ctx.guest_type_name,
            outcome="saved",
            state=_destroyed_state(self.host.hypervisor, domid),
            method=ctx.method,
            timings=(
                *timings,
                *suspended[0].timings,
                PhaseTiming(Phase.SAVE, max(save_seconds, 0.0)),
                *save_timings[1:],
            ),
            details=(("file", target), *sorted(check.items())),
        )

    async def _rollback_migration(self, ctx: OperationContext, error: TorporError) -> None:
        """Saving failed after the guest suspended: resume it where it was, then raise."""
        try:
            await self._rollback(ctx, error)
        except OperationError as e:
            raise MigrationFailed(
                e.message, state=e.state, cause=error, phase=ctx.phase, domid=ctx.domid
            ) from error

    async def restore(
        self,
        source: str | os.PathLike[str] | SavedDomain,
        *,
        expect_kind: str | None = None,
        name: str | None = None,
    ) -> Result:
        """Build a new domain from a save image and resume it non-cooperatively.

        The image is read and verified before anything is created.  The guest
        takes the full rebuild path (its suspend hypercall returns 0) and its
        frontends reconnect to this host's backends.  If the resume fails the
        new domain is destroyed; the image is untouched.

        A domain's name is unique on a host, as xl keeps it: if a domain
        already has the guest's name (the one the image carries, or ``name``),
        the restore is refused before anything is built --
        :class:`~torpor.errors.NameInUse`, naming that domain.  ``name``
        restores the guest under another name: a copy of the guest, which
        also gets a fresh UUID (two domains sharing one would share
        ``/vm/<uuid>`` in xenstore), as ``xl restore`` of a config file with a
        new name and no UUID does.
        """
        self._check_loop()
        from torpor.builder import FileSaver
        from torpor.host import validate_domain_name
        from torpor.image import read_image

        if name is not None:
            name = validate_domain_name(name)
        if isinstance(source, (str, os.PathLike)):
            from torpor.xl_savefile import sniff

            path = os.fspath(source)
            builder = self._builder(self.host, "restore")
            try:
                fmt = await _in_thread(sniff, path)
            except OSError as e:
                raise ImageError(f"cannot read save file {path}: {e.strerror or e}", cause=e) from e
            if isinstance(builder, FileSaver):
                if fmt != builder.file_format:
                    what = (
                        "torpor's own image, written on a simulated host"
                        if fmt == "torpor"
                        else f"not an {builder.file_format} save file"
                    )
                    raise ImageError(
                        f"{path} is {what}; host {self.host.name} restores "
                        f"{builder.file_format} save files"
                    )
                return await self._restore_file(builder, path, expect_kind, name)
            if fmt == "xl":
                raise ImageError(
                    f"{path} is not a torpor save image but an xl save file (real Xen); "
                    f"host {self.host.name} restores torpor's own images"
                )

        t0 = time.perf_counter()
        saved = (
            source
            if not isinstance(source, (str, os.PathLike))
            else await _in_thread(read_image, source)
        )
        if expect_kind is not None and saved.kind != expect_kind:
            raise ImageError(f"image holds a {saved.kind} guest, not {expect_kind}")
        saved_name = saved.domain.get("name")
        if name is not None and name != saved_name:
            import uuid

            # The builder builds what the image describes: a copy under ``name``.
            saved = attrs.evolve(
                saved, domain={**saved.domain, "name": name, "uuid": str(uuid.uuid4())}
            )
        builder = self._builder(self.host, "restore")
        wanted = saved.domain.get("name")
        async with self._name_free(wanted if isinstance(wanted, str) else None):
            result = await self._build_and_start(
                builder, functools.partial(builder.restore, saved), t0=t0, intact="the image"
            )
        return attrs.evolve(
            result,
            details=(
                *result.details,
                ("name", wanted),
                ("checksum", saved.checksum()),
                ("memory_checksum", saved.memory_checksum()),
            ),
        )

    async def _restore_file(
        self, builder: FileSaver, path: str, expect_kind: str | None, name: str | None = None
    ) -> Result:
        """Restore from a file the builder reads itself (real Xen: an xl save file).

        The file is walked to its end first (nothing is built from a corrupt
        or truncated file) and the name it carries (or ``name``) must be free;
        the builder then builds the domain, paused, under that name, and
        starts it; torpor waits for the guest to run again in its new domain.
        """
        t0 = time.perf_counter()
        info = await _in_thread(builder.verify_save, path)
        if expect_kind is not None and info.get("guest_type") != expect_kind:
            raise ImageError(f"{path} holds a {info.get('guest_type')} guest, not {expect_kind}")
        wanted = name if name is not None else info.get("name")
        async with self._name_free(wanted if isinstance(wanted, str) else None):
            result = await self._build_and_start(
                builder,
                functools.partial(builder.restore_file, path, name=name),
                t0=t0,
                intact=path,
            )
        details = {**info, "name": wanted}
        return attrs.evolve(
            result, details=(*result.details, ("file", path), *sorted(details.items()))
        )

    async def domain_named(self, name: str) -> int | None:
        """The domid of the domain called ``name`` on this host, or ``None``.

        As ``libxl_name_to_domid``: every domain the hypervisor lists (running,
        paused, shut down, dying), named by its xenstore
        ``/local/domain/<domid>/name``; the lowest domid if several are.
        """
        from torpor.errors import XenstoreError

        hv = self.host.hypervisor
        xs = self.host.xenstore.aio
        domids: list[int] = []
        first = 0
        while True:  # xc_domain_getinfolist pages: libxl_list_domain reads them all
            batch = hv.domain_info_list(first, 1024)
            domids += [i.domid for i in batch]
            if len(batch) < 1024:
                break
            first = batch[-1].domid + 1
        names = await asyncio.gather(
            *(xs.read_or(f"/local/domain/{d}/name", None) for d in domids),
            return_exceptions=True,
        )
        for domid, got in zip(domids, names, strict=True):
            if isinstance(got, BaseException):
                if isinstance(got, XenstoreError):
                    continue  # gone meanwhile, or not ours to read: libxl skips it too
                raise got
            if got == name:
                return domid
        return None

    @contextlib.asynccontextmanager
    async def _name_free(self, name: str | None) -> AsyncIterator[None]:
        """Hold ``name`` for a restore: refuse (NameInUse) if a domain has it.

        A lock file per name in :attr:`Host.lock_dir` keeps two restores under
        one name (in this process or another) from both passing the check
        before either has built its domain.  ``None``: the image names no
        guest; the builder decides (libxl refuses a config without a name).
        """
        if name is None:
            yield
            return
        import hashlib

        from torpor.errors import NameInUse

        os.makedirs(self.host.lock_dir, mode=0o700, exist_ok=True)
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        lock = os.path.join(self.host.lock_dir, f"name-{digest}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NameInUse(
                    f"another restore under the name {name!r} is under way ({lock}); "
                    "nothing was built",
                    name=name,
                    holder=None,
                    phase=Phase.VALIDATE,
                ) from None
            holder = await self.domain_named(name)
            if holder is not None:
                raise NameInUse(
                    f"domain {holder} ({_observed_state(self.host.hypervisor, holder)}) is "
                    f"already named {name!r}: a second domain of that name would be a "
                    "second copy of one guest; nothing was built. Restore it under "
                    "another name (name=..., `torpor restore FILE --name NEW`)",
                    name=name,
                    holder=holder,
                    phase=Phase.VALIDATE,
                )
            yield
        finally:
            os.close(fd)

    async def _build_and_start(
        self,
        builder: DomainBuilder | FileSaver,
        build: Callable[[], int],
        *,
        t0: float,
        intact: str,
    ) -> Result:
        """Build the new domain (phase ``restore``, timed from ``t0``), then start it.

        Either the guest runs in its new domain, or no new domain is left:
        one that was built but did not come up is destroyed, and the error
        says the source (``intact``: the image, the file) was not touched.
        """
        building = asyncio.ensure_future(asyncio.to_thread(build))
        try:
            domid = await asyncio.shield(building)
        except TorporError as e:
            raise MigrationFailed(
                f"building the domain failed: {e.message}",
                state="not created",
                phase=Phase.RESTORE,
                cause=e,
            ) from e
        except asyncio.CancelledError:
            await asyncio.wait([building])  # the build cannot be stopped: undo it after
            if not building.cancelled() and building.exception() is None:
                with contextlib.suppress(TorporError):
                    await _in_thread(builder.destroy, building.result())
            interrupted = self._interruption(
                f"restore interrupted ({self._interrupted}) while building the domain; "
                f"what was built is destroyed, {intact} is intact",
                state="not created",
            )
            if interrupted is None:
                raise
            raise interrupted from None
        built = PhaseTiming(Phase.RESTORE, time.perf_counter() - t0)
        try:
            result = await self._start_restored(domid, builder)
        except asyncio.CancelledError:
            with contextlib.suppress(TorporError):
                await _in_thread(builder.destroy, domid)
            raise
        except TorporError as e:
            with contextlib.suppress(TorporError):
                await _in_thread(builder.destroy, domid)
            if isinstance(e, Interrupted):
                raise Interrupted(
                    f"{e.message}; new domain {domid} destroyed, {intact} is intact",
                    reason=e.reason,
                    clean=True,
                    domid=domid,
                    phase=e.phase,
                    state="not restored",
                ) from e
            raise MigrationFailed(
                f"the restored guest did not resume: {e}; new domain {domid} "
                f"destroyed, {intact} is intact",
                state="not restored",
                domid=domid,
                phase=e.phase,
                cause=e,
            ) from e
        return attrs.evolve(
            result, operation="restore", outcome="restored", timings=(built, *result.timings)
        )

    async def _start_restored(self, domid: int, builder: DomainBuilder | FileSaver) -> Result:
        """A domain the builder restored and left paused: start it, see it run.

        The guest wakes in a new domain (its suspend hypercall returns 0): it
        rebuilds and its frontends reconnect, which the plugins' verify
        hooks wait for, as after a non-cooperative resume.
        """
        async with self._claim(domid, "restore"):
            ctx = await self._context("restore", domid)
            ctx.cooperative = False
            ctx.in_place = False
            async with self._reporting(ctx):
                gt = ctx.guest_type
                assert gt is not None
                timings: list[PhaseTiming] = []
                await self._notify("torpor_before_resume", ctx=ctx)
                async with self._phase(ctx, Phase.RESUME, timings):
                    await _in_thread(builder.start, domid)
                    self._refresh(ctx)
                    if ctx.domain.paused:
                        raise ResumeFailed(
                            f"domain {domid} is still paused after the builder started it",
                            state="paused",
                        )
                async with self._phase(ctx, Phase.GUEST_RESUME, timings):
                    await self._all("torpor_resume_guest", ctx=ctx)
                async with self._phase(ctx, Phase.VERIFY, timings):
                    await self._verify_resumed(ctx, shut=True, s3=False)
                result = Result(
                    domid=domid,
                    operation="restore",
                    guest_type=gt.name,
                    outcome="resumed",
                    state=ctx.domain.state_word(),
                    cooperative=False,
                    timings=tuple(timings),
                )
                await self._notify("torpor_after_resume", ctx=ctx, result=result)
                return result

    async def _migration_names(
        self, ctx: OperationContext, destination: Orchestrator
    ) -> tuple[str, str] | None:
        """Before the guest is touched: the guest's name must be free at the destination.

        On another host a domain of that name refuses the migration
        (:class:`~torpor.errors.NameInUse`); the destination's restore checks
        again.  On the same host the name is the source's own until the source
        is destroyed: as ``xl migrate`` to localhost does, the copy is built as
        ``NAME--incoming`` and renamed once the source is gone.  Returns
        ``(NAME, NAME--incoming)`` for that, else ``None``.
        """
        from torpor.errors import NameInUse

        name = await ctx.xenstore.read_or(f"{ctx.dompath}/name", None)
        if not name:
            return None
        same = os.path.realpath(destination.host.xenstore_path) == os.path.realpath(
            self.host.xenstore_path
        )
        wanted = f"{name}--incoming" if same else name
        for asked in (name, wanted) if same else (name,):
            holder = await destination.domain_named(asked)
            if holder is not None and not (same and asked == name and holder == ctx.domid):
                raise NameInUse(
                    f"domain {holder} on {destination.host.name} is already named {asked!r}; "
                    "the guest was not touched",
                    name=asked,
                    holder=holder,
                    state=ctx.domain.state_word(),
                    phase=Phase.VALIDATE,
                )
        return (name, wanted) if same else None

    async def _rename_arrived(self, domid: int, name: str, incoming: str) -> None:
        """A same-host migration's copy takes the guest's name once the source is gone
        (``libxl_domain_rename``: in a transaction, from the name it has)."""
        xs = self.host.xenstore.aio
        path = f"/local/domain/{domid}/name"

        async def body(tx: Any) -> None:
            got = await xs.read_or(path, None, tx=tx)
            if got != incoming:
                raise MigrationFailed(
                    f"the guest runs in domain {domid}, but it is named {got!r}, not "
                    f"{incoming!r}: not renamed to {name!r}",
                    state="running",
                    domid=domid,
                    phase=Phase.CLEANUP,
                )
            await xs.write(path, name, tx=tx)

        holder = await self.domain_named(name)
        if holder not in (None, domid):
            raise MigrationFailed(
                f"the guest runs in domain {domid} as {incoming!r}: domain {holder} took the "
                f"name {name!r} meanwhile",
                state="running",
                domid=domid,
                phase=Phase.CLEANUP,
            )
        await xs.run_transaction(body)

    async def migrate(self, domid: int, destination: Orchestrator) -> Result:
        """Move a domain to another host: suspend, stream, restore there, destroy here.

        The source is destroyed only after the destination guest runs; if
        anything fails before that, the source is resumed cooperatively and
        any half-built destination domain destroyed.  Nothing is lost either way.
        """
        self._check_loop()
        domid = validate_domid(domid)
        timings: list[PhaseTiming] = []
        from torpor.builder import FileSaver

        source_builder = self._builder(self.host, "migrate")  # refuse before touching the guest
        dest_builder = self._builder(destination.host, "restore")
        if isinstance(source_builder, FileSaver) or isinstance(dest_builder, FileSaver):
            raise BackendUnavailable(
                "migration to or from real Xen is not implemented: save with `torpor save` "
                "and restore the xl save file with `torpor restore` or `xl restore`",
                domid=domid,
            )
        async with self._claim(domid, "migrate"):
            ctx = await self._context("migrate", domid)
            async with self._reporting(ctx):
                renaming = await self._migration_names(ctx, destination)
                suspended = await self._suspend(ctx)
                timings.extend(suspended.timings)
                try:
                    async with self._phase(ctx, Phase.SAVE, timings):
                        saved = await self._save_state(ctx)
                        if renaming is not None:  # same host: restored as NAME--incoming
                            saved = attrs.evolve(
                                saved, domain={**saved.domain, "name": renaming[1]}
                            )
                    async with self._phase(ctx, Phase.TRANSFER, timings):
                        # The image format is the wire format: verified on arrival.
                        saved = await _in_thread(_through_image, saved)
                    # The destination times its own phases (restore, resume,
                    # guest-resume, verify); the result counts each once.
                    ctx.phase = Phase.RESTORE
                    arrived = await _arrival(destination.restore(saved, expect_kind=saved.kind))
                    timings.extend(arrived.timings)
                except TorporError as e:
                    await self._rollback_migration(ctx, e)
                async with self._phase(ctx, Phase.CLEANUP, timings):
                    await self._completing(self._builder(self.host, "migrate").destroy, domid)
                    if renaming is not None:
                        await self._rename_arrived(arrived.domid, *renaming)
        return Result(
            domid=arrived.domid,
            operation="migrate",
            guest_type=ctx.guest_type_name,
            outcome="migrated",
            state=arrived.state,
            method=ctx.method,
            cooperative=False,
            timings=tuple(timings),
            details=(
                ("source_domid", domid),
                ("source", self.host.name),
                ("destination", destination.host.name),
                ("checksum", saved.checksum()),
                ("memory_checksum", saved.memory_checksum()),
            ),
        )

    # -- bulk --------------------------------------------------------------------------

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

    async def suspend_many(self, domids: Iterable[int], **kw: Any) -> list[Result | TorporError]:
        """Suspend many domains at once (bounded concurrency); one result or error each."""
        self._check_loop()
        return await self._bulk(domids, lambda d: self.suspend(d, **kw))

    async def resume_many(self, domids: Iterable[int], **kw: Any) -> list[Result | TorporError]:
        """Resume many domains at once (bounded concurrency); one result or error each."""
        self._check_loop()
        return await self._bulk(domids, lambda d: self.resume(d, **kw))

    # -- status and recovery -------------------------------------------------------

    async def status(self, domid: int) -> dict[str, Any]:
        """The truth about a domain, from observation, and any torpor intent record.

        ``state`` is what the hypervisor says (``running``, ``paused``,
        ``suspended``, ``S3``, ``crashed``...); ``request_pending`` whether a
        ``control/shutdown`` suspend request is outstanding; ``intent`` what a
        torpor process was doing (``intent_alive``: whether it still runs).
        """
        self._check_loop()
        domid = validate_domid(domid)
        info = self._domain_info(domid, Phase.VALIDATE)
        try:
            guest_type: str = (await self.classify(info)).name
        except UnsupportedGuest:
            guest_type = "?"
        s3 = self._in_s3(info) and not info.shutdown
        xs = self.host.xenstore.aio
        request = await xs.read_or(f"/local/domain/{domid}/control/shutdown", "")
        intent = await self._intent.read(domid)
        alive = None
        if intent is not None and isinstance(intent.get("pid"), int):
            alive = intent.get("host") == socket.gethostname() and pid_alive(intent["pid"])
        return {
            "domid": domid,
            "guest_type": guest_type,
            "state": "S3" if s3 else info.state_word(),
            "shutdown_reason": info.shutdown_reason,
            "request_pending": request == "suspend",
            "intent": intent,
            "intent_alive": alive,
            "busy": domid in self._busy,
        }

    async def recover(self, domid: int) -> Result:
        """Bring a domain a dead (or interrupted) torpor left behind back to running.

        :meth:`_bring_back` does the work: a pending suspend request is
        withdrawn (in a transaction); a guest that was asked is given
        ``settle`` seconds to finish suspending; a suspended domain is resumed
        cooperatively (device model first), one in S3 woken.  What only a
        torpor that died mid-way leaves behind is undone too: a suspend event
        channel subscription, a resume that never sent XS_RESUME, a device
        model left stopped under a running domain.  The intent record is
        removed.  A crashed domain cannot be recovered (ResumeFailed).  The
        result's ``actions`` list what was done -- and only that.
        """
        self._check_loop()
        domid = validate_domid(domid)
        timings: list[PhaseTiming] = []
        actions: list[str] = []
        intent = await self._intent.read(domid)
        if intent is not None and intent.get("host") == socket.gethostname():
            pid = intent.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
                raise DomainBusy(
                    f"torpor pid {pid} is still working on domain {domid} "
                    f"({intent.get('op')}); not recovering under it",
                    domid=domid,
                    phase=Phase.VALIDATE,
                    state=_observed_state(self.host.hypervisor, domid),
                )
        async with self._claim(domid, "recover"):
            ctx = await self._context("recover", domid)
            ctx.cooperative = True
            if intent is not None:
                # Ours replaces the dead one's, and goes when recover ends.
                await self._intent.begin(domid, "recover")
            async with self._reporting(ctx):
                if intent is not None:
                    if intent.get("method") == str(SuspendMethod.EVENT_CHANNEL):
                        with contextlib.suppress(TorporError):
                            ctx.hypervisor.evtchn_subscribe(domid, 0)
                        actions.append("dropped the suspend event channel subscription")
                    # It may have resumed the domain and died before XS_RESUME.
                    ctx.facts["resumed"] = True
                actions += await self._bring_back(
                    ctx, asked=bool(intent and intent.get("requested")), timings=timings
                )
                if ctx.guest_type is not None and ctx.guest_type.device_model:
                    state = await self._observe(ctx)
                    if state.startswith("running, device model"):
                        async with self._phase(ctx, Phase.DEVICE_MODEL_RESUME, timings):
                            await self._all("torpor_device_model_resume", ctx=ctx)
                        actions.append("let the stopped device model run again")
                state = await self._observe(ctx)
        return Result(
            domid=domid,
            operation="recover",
            guest_type=ctx.guest_type_name,
            outcome="recovered",
            state=state,
            cooperative=True,
            timings=tuple(timings),
            details=(("actions", actions or ["nothing to do: it was running"]), ("intent", intent)),
        )

    # -- inspection --------------------------------------------------------------------

    async def list_domains(self) -> list[dict[str, Any]]:
        """Every guest domain with its guest type (or why none claims it) and state."""
        self._check_loop()
        out = []
        for info in self.host.hypervisor.domain_info_list():
            if info.domid == 0:
                continue
            try:
                gt: str = (await self.classify(info)).name
            except UnsupportedGuest:
                gt = "?"
            name = await self.host.xenstore.aio.read_or(f"/local/domain/{info.domid}/name", "")
            state = "S3" if self._in_s3(info) and not info.shutdown else info.state_word()
            out.append({"domid": info.domid, "name": name, "guest_type": gt, "state": state})
        return out


class _Waker:
    """An event for one waiting coroutine: set by watch / monitor callbacks in the loop.

    Cheaper than ``asyncio.wait_for(event.wait(), t)``, which makes a task per wait.
    """

    __slots__ = ("flag", "fut", "loop")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.flag = False
        self.fut: asyncio.Future[bool] | None = None

    def set(self) -> None:
        self.flag = True
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(True)

    def clear(self) -> None:
        self.flag = False

    async def wait(self, timeout: float) -> bool:
        """True once set, False when ``timeout`` passes first."""
        if self.flag:
            return True
        fut = self.fut = self.loop.create_future()
        handle = self.loop.call_later(timeout, _expire, fut)
        try:
            return bool(await fut)
        finally:
            handle.cancel()
            self.fut = None


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class _PhaseScope:
    """One phase: notifications around it, its timing, its name on errors."""

    __slots__ = ("ctx", "error", "orch", "phase", "t0", "timings")

    def __init__(
        self,
        orch: Orchestrator,
        ctx: OperationContext,
        phase: Phase,
        timings: list[PhaseTiming],
    ) -> None:
        self.orch = orch
        self.ctx = ctx
        self.phase = phase
        self.timings = timings
        self.t0 = 0.0
        #: set by the phase's body when it fails without raising (an ack that timed out)
        self.error: TorporError | None = None

    async def __aenter__(self) -> _PhaseScope:
        self.ctx.phase = self.phase
        await self.orch._notify("torpor_phase_started", ctx=self.ctx, phase=self.phase)
        self.t0 = time.perf_counter()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        seconds = time.perf_counter() - self.t0
        error = exc if isinstance(exc, TorporError) else self.error
        if isinstance(exc, asyncio.CancelledError):
            reason = self.orch.interrupted or "cancelled"
            error = Interrupted(
                f"interrupted ({reason})", reason=reason, domid=self.ctx.domid, phase=self.phase
            )
        if error is not None:
            if error.phase is None:
                error.phase = self.phase
            if error.domid is None:
                error.domid = self.ctx.domid
        self.timings.append(PhaseTiming(self.phase, seconds))
        await self.orch._notify(
            "torpor_phase_finished",
            ctx=self.ctx,
            phase=self.phase,
            seconds=seconds,
            error=error,
        )


async def _arrival(restore: Awaitable[Result]) -> Result:
    """The destination's restore decides a migration's fate.

    Cancelled while it runs, the restore is cancelled too (the destination
    then destroys what it built, and the source is resumed here).  If it
    had finished anyway, the guest runs at the destination: the migration
    must complete (destroying the source), or two copies would run.
    """
    task = asyncio.ensure_future(restore)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None:
            raise
        me = asyncio.current_task()
        if me is not None:
            me.uncancel()
        return task.result()


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread``, except that a cancellation waits for the thread.

    A thread cannot be stopped; whatever it touches (a domain being saved,
    built or destroyed) must be settled before a rollback looks at it.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


def _through_image(saved: SavedDomain) -> SavedDomain:
    """Encode and decode: what crosses to the destination is exactly the image format."""
    import io

    from torpor.image import decode, encode

    return decode(io.BytesIO(b"".join(encode(saved))))


async def _drop_watch(ctx: OperationContext, pending: asyncio.Future[Any]) -> None:
    """Undo a speculatively registered watch (errors included: nothing to undo then)."""
    try:
        watch = await pending
    except TorporError:
        return
    with contextlib.suppress(TorporError):
        await ctx.xenstore.unwatch(watch)


def _destroyed_state(hv: Any, domid: int) -> str:
    """After the builder destroyed a domain: ``destroyed`` if the hypervisor no
    longer knows it, else what it says (``dying`` while Xen tears it down)."""
    state = _observed_state(hv, domid)
    return "destroyed" if state == "gone" else state


def _observed_state(hv: Any, domid: int) -> str:
    try:
        return str(hv.domain_info(domid).state_word())
    except HypervisorError as e:
        return "gone" if e.errno == errno.ESRCH else "unknown"
    except TorporError:
        return "unknown"


def _locate(e: TorporError, ctx: OperationContext) -> None:
    """Make sure an error names its domain and phase."""
    if e.domid is None:
        e.domid = ctx.domid
    if e.phase is None:
        e.phase = ctx.phase


def _refuse_wrappers(pm: pluggy.PluginManager) -> None:
    for caller in pm.hook.__dict__.values():
        if not isinstance(caller, pluggy.HookCaller) or not caller.name.startswith("torpor_"):
            continue
        for impl in caller.get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                raise TorporError(
                    f"plugin {impl.plugin_name!r}: torpor hooks take no wrappers "
                    f"({caller.name}); use the lifecycle hooks instead"
                )


class _RemoteOrchestrator:
    """The destination of a migration when it runs on another Torpor's loop."""

    def __init__(
        self,
        host: Host,
        restore: Callable[..., Awaitable[Result]],
        domain_named: Callable[[str], Awaitable[int | None]],
    ) -> None:
        self.host = host
        self.restore = restore
        self.domain_named = domain_named


async def _cancel_leftovers(timeout: float = 2.0) -> None:
    """Cancel the tasks still running on this loop (what a plugin left: the reader of a
    QMP connection it never closed...) and let them end, as ``asyncio.run`` does.

    A task left pending on a closed loop is finalized by the garbage collector at some
    later moment, in whatever code happens to allocate then; its clean-up fails ("Event
    loop is closed") and Python reports that through ``sys.unraisablehook``.  Under
    pytest on Python 3.11 before 3.11.8 that report, made in the middle of pytest's own
    ``ast.parse``, crashed the session (INTERNALERROR ``SystemError: AST constructor
    recursion depth mismatch``; CPython gh-106905).
    """
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    if not left:
        return
    log.warning(
        "closing torpor: cancelling %d task(s) left running (a plugin's?): %s",
        len(left),
        ", ".join(sorted({getattr(t.get_coro(), "__qualname__", t.get_name()) for t in left})),
    )
    for t in left:
        t.cancel()
    await asyncio.wait(left, timeout=timeout)


class Torpor:
    """The synchronous face of :class:`Orchestrator`, for toolstacks without asyncio.

    Runs an orchestrator on a private event-loop thread; every method blocks
    until its operation ends and returns the same results and raises the same
    errors.  Thread-safe: operations on different domains may be started from
    different threads and run concurrently.

    :param host: the host (closed by :meth:`close` if ``own_host``).
    """

    def __init__(
        self,
        host: Host,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        timeouts: Timeouts | None = None,
        concurrency: int = 256,
        own_host: bool = False,
        record_intent: bool = True,
    ) -> None:
        self.host = host
        self._own_host = own_host
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="torpor", daemon=True)
        self._thread.start()
        self.orchestrator = Orchestrator(
            host,
            plugin_manager=plugin_manager,
            timeouts=timeouts,
            concurrency=concurrency,
            record_intent=record_intent,
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            # Ctrl-C in a program that installed no handler of its own: roll
            # back what is in flight (as interrupt() does), then let it go on.
            self.interrupt("SIGINT")
            with contextlib.suppress(Exception):
                fut.result()
            raise

    def interrupt(self, reason: str = "interrupted") -> None:
        """Stop every operation in flight and refuse new ones; safe from any thread
        and from a signal handler (see :meth:`Orchestrator.interrupt`).

        Returns at once; each operation's caller then gets
        :class:`~torpor.errors.Interrupted` once its rollback is done.
        """
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self.loop.call_soon_threadsafe(self.orchestrator.interrupt, reason)

    def in_flight(self) -> list[tuple[int, str, str]]:
        """``(domid, operation, phase)`` of every operation now holding a domain."""
        return self.orchestrator.in_flight()

    def suspend(self, domid: int, **kw: Any) -> Result:
        return self._run(self.orchestrator.suspend(domid, **kw))

    def resume(self, domid: int, **kw: Any) -> Result:
        return self._run(self.orchestrator.resume(domid, **kw))

    def checkpoint(
        self, domid: int, callback: Callable[[Result], Any] | None = None, **kw: Any
    ) -> Result:
        return self._run(self.orchestrator.checkpoint(domid, callback, **kw))

    def checkpoints(self, domid: int, count: int, **kw: Any) -> list[Result]:
        return self._run(self.orchestrator.checkpoints(domid, count, **kw))

    def suspend_many(self, domids: Sequence[int], **kw: Any) -> list[Result | TorporError]:
        return self._run(self.orchestrator.suspend_many(domids, **kw))

    def save(self, domid: int, path: str | os.PathLike[str]) -> Result:
        return self._run(self.orchestrator.save(domid, path))

    def restore(
        self, source: str | os.PathLike[str] | SavedDomain, *, name: str | None = None
    ) -> Result:
        return self._run(self.orchestrator.restore(source, name=name))

    def migrate(self, domid: int, destination: Torpor) -> Result:
        """Migrate to the host ``destination`` drives (its loop restores there)."""

        async def restore_there(saved: SavedDomain, *, expect_kind: str | None = None) -> Result:
            fut = asyncio.run_coroutine_threadsafe(
                destination.orchestrator.restore(saved, expect_kind=expect_kind), destination.loop
            )
            return await asyncio.wrap_future(fut)

        async def named_there(name: str) -> int | None:
            fut = asyncio.run_coroutine_threadsafe(
                destination.orchestrator.domain_named(name), destination.loop
            )
            return await asyncio.wrap_future(fut)

        proxy = _RemoteOrchestrator(destination.orchestrator.host, restore_there, named_there)
        return self._run(self.orchestrator.migrate(domid, proxy))  # type: ignore[arg-type]

    def resume_many(self, domids: Sequence[int], **kw: Any) -> list[Result | TorporError]:
        return self._run(self.orchestrator.resume_many(domids, **kw))

    def list_domains(self) -> list[dict[str, Any]]:
        return self._run(self.orchestrator.list_domains())

    def status(self, domid: int) -> dict[str, Any]:
        return self._run(self.orchestrator.status(domid))

    def recover(self, domid: int) -> Result:
        return self._run(self.orchestrator.recover(domid))

    def close(self) -> None:
        """Interrupt what is in flight (it is rolled back), then release everything."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(self.orchestrator.close())
            with contextlib.suppress(Exception):
                self._run(_cancel_leftovers())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
        if self._own_host:
            self.host.close()

    def __enter__(self) -> Torpor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

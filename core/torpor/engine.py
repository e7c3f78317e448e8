"""The engine every operation shares: small enough to read in ten minutes.

:class:`Engine` is what :class:`~torpor.orchestrator.Orchestrator` is made
of; the operations (:mod:`torpor.operations`) use it.  It owns, for one host
and one event loop:

* **the claim** (:meth:`Engine._claim`) -- one operation per domain, in this
  process and across processes (a lock file per domain), and the task that
  :meth:`Engine.interrupt` cancels;
* **hook dispatch** (:meth:`Engine._first`, :meth:`Engine._all`,
  :meth:`Engine._notify`) -- awaiting coroutine implementations, a plugin's
  bug made an OperationError naming it;
* **phases** (:meth:`Engine._phase`) -- timed, named on errors, notified;
* **the event-driven wait** (:meth:`Engine._wait`) -- re-ask a plugin's
  judgement on every relevant event (``@releaseDomain`` and the suspend event
  channels through one :class:`~torpor.monitor.DomainMonitor`, watched
  xenstore nodes, device-model events) until done, failed or the deadline;
  no thread per domain, no polling;
* **truth** (:meth:`Engine._observe`, :meth:`Engine._reporting`) -- every
  failure becomes an OperationError naming the state the domain is observed
  in afterwards; a cancelled operation is rolled back (the orchestrator's
  ``_roll_back_interrupted``: :func:`torpor.operations.recover.roll_back_interrupted`);
* **intent records** (:mod:`torpor.intent`) and **the context** each
  operation's hooks see (:meth:`Engine._context`).

Names with a leading underscore are the package's own: the operations call
them; toolstacks use the orchestrator's public methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import pluggy

from torpor.context import OperationContext
from torpor.errors import (
    DomainBusy,
    DomainVanished,
    HypervisorError,
    Interrupted,
    NoSuchDomain,
    OperationError,
    Timeout,
    TorporError,
    UnsupportedGuest,
    WrongEventLoop,
)
from torpor.host import Host
from torpor.intent import IntentLog, read_record
from torpor.model import (
    HVM_PARAM_ACPI_S_STATE,
    DomainInfo,
    GuestType,
    Phase,
    PhaseTiming,
    Timeouts,
    Verdict,
)
from torpor.monitor import DomainMonitor, Waker
from torpor.phase import PhaseScope
from torpor.plugins import get_plugin_manager, refuse_wrappers

if TYPE_CHECKING:
    pass

__all__ = ["Engine", "PhaseScope", "Sources", "locate", "observed_state"]

log = logging.getLogger("torpor")
T = TypeVar("T")


@attrs.frozen
class Sources:
    """What may change a verdict: xenstore paths, an event-channel port, the device model."""

    xs_paths: tuple[str, ...] = ()
    port: int | None = None
    device_model: bool = False


class Engine:
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
        refuse_wrappers(self.pm)
        self.timeouts = timeouts or Timeouts()
        self.concurrency = concurrency
        self.monitor = DomainMonitor(host)
        self._busy: dict[int, str] = {}
        self._lock_fds: dict[int, int] = {}
        self._lock_named: set[int] = set()
        self._lock_dir_ready = False
        self._impl_lists: dict[str, list[Any]] = {}
        #: domid -> ((domid, uuid, classifiers), GuestType) of PV domains (classify)
        self._classified: dict[int, tuple[tuple[Any, ...], GuestType]] = {}
        #: Keep an intent record while an operation runs (torpor.intent).
        self.record_intent = record_intent
        self._intent = IntentLog(host.lock_dir, self._lock_fd)
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
            if res is not None and inspect.isawaitable(res):
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

    def _impls(self, name: str) -> list[Any]:
        """Hook ``name``'s implementations, in pluggy's order (called last-first).

        pluggy's ``get_hookimpls()`` copies its list on every call; the list
        itself (``HookCaller._hookimpls``) is edited in place as plugins come
        and go (pluggy 1.x: ``insert``, ``[:] =``), so the engine keeps a
        reference to it per hook: exact, and no lookup per dispatch.
        """
        impls = self._impl_lists.get(name)
        if impls is None:
            caller = getattr(self.pm.hook, name)
            live = getattr(caller, "_hookimpls", None)
            if not isinstance(live, list):  # another pluggy: ask every time
                return list(caller.get_hookimpls())
            impls = self._impl_lists[name] = live
        return impls

    async def _first(self, name: str, **kwargs: Any) -> Any:
        """Call a ``firstresult`` hook, awaiting coroutine implementations."""
        for impl in self._impls(name)[::-1]:
            res = await self._call_impl(name, impl, kwargs)
            if res is not None:
                return res
        return None

    async def _all(self, name: str, **kwargs: Any) -> list[Any]:
        """Call a hook on every implementation (last registered first)."""
        return [await self._call_impl(name, impl, kwargs) for impl in self._impls(name)[::-1]]

    async def _notify(self, name: str, **kwargs: Any) -> None:
        """A lifecycle notification: an embedder's failing listener is logged, not fatal."""
        if not self._impls(name):
            return
        try:
            await self._all(name, **kwargs)
        except Exception:
            log.exception("torpor hook %s raised; carrying on with the operation", name)

    def _phase(self, ctx: OperationContext, phase: Phase, timings: list[PhaseTiming]) -> PhaseScope:
        """``async with self._phase(...)``: time a phase, name it on errors, notify."""
        return PhaseScope(self, ctx, phase, timings)

    def _listened(self, name: str) -> bool:
        """Whether any plugin implements notification hook ``name`` (skip the call if not)."""
        return bool(self._impls(name))

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
                state=observed_state(self.host.hypervisor, domid),
            )
        held = self._busy.get(domid)
        if held is not None:
            raise DomainBusy(
                f"a {held} of domain {domid} is already in progress",
                domid=domid,
                phase=Phase.VALIDATE,
                state=observed_state(self.host.hypervisor, domid),
            )
        fd = self._lock_fd(domid)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            rec = read_record(self.host.lock_dir, domid) or {}
            pid = rec.get("pid")
            holder = f"torpor pid {pid}" if isinstance(pid, int) else "another process"
            if isinstance(rec.get("op"), str):
                holder += f" ({rec['op']})"
            raise DomainBusy(
                f"domain {domid} is busy: {holder} holds "
                f"{os.path.join(self.host.lock_dir, f'domain-{domid}.lock')}",
                domid=domid,
                phase=Phase.VALIDATE,
                state=observed_state(self.host.hypervisor, domid),
            ) from None
        if domid not in self._lock_named and not self.record_intent:
            # Who holds it, for another process's DomainBusy message (an
            # intent record names it otherwise).
            self._intent.idle(domid)
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
                state=observed_state(self.host.hypervisor, domid),
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
        locate(e, ctx)
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
        """Undo what a cancelled operation did; the Interrupted saying what is left
        (the orchestrator's: :func:`torpor.operations.recover.roll_back_interrupted`)."""
        raise NotImplementedError

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
        """The plugins' verdict on what guest type a domain is (UnsupportedGuest if none).

        A PV domain's verdict is remembered for as long as its identity holds
        (the same domid and UUID, the same classifiers registered): whether a
        domain is PV is fixed when it is built (``XEN_DOMCTL_CDF_hvm`` unset),
        so asking the plugins again gives the same answer.  An HVM domain is
        asked every time -- a guest that loads its PV drivers turns from HVM
        into PVHVM, one that reboots without them back.
        """
        self._check_loop()
        impls = self._impls("torpor_classify_domain")
        key = (info.domid, info.uuid, tuple(map(id, impls)))
        cached = self._classified.get(info.domid)
        if cached is not None and cached[0] == key:
            return cached[1]
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
        if not info.hvm and info.uuid.strip("0-"):  # a PV domain with an identity
            self._classified[info.domid] = (key, gt)
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
        ctx.facts["found"] = "S3" if ctx.facts["s3"] and not info.shutdown else info.state_word()
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
        sources: Sources,
        what: str,
        fresh: bool = False,
    ) -> Verdict:
        """Re-ask ``judge`` on every relevant event until done or failed; Timeout after.

        ``fresh``: ``ctx.domain`` was just read; the first judgement uses it.
        """
        loop = asyncio.get_running_loop()
        wake = Waker()
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
                xs.unwatch_nowait(w)


def observed_state(hv: Any, domid: int) -> str:
    try:
        return str(hv.domain_info(domid).state_word())
    except HypervisorError as e:
        return "gone" if e.errno == errno.ESRCH else "unknown"
    except TorporError:
        return "unknown"


def locate(e: TorporError, ctx: OperationContext) -> None:
    """Make sure an error names its domain and phase."""
    if e.domid is None:
        e.domid = ctx.domid
    if e.phase is None:
        e.phase = ctx.phase

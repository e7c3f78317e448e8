"""Suspend: ask a guest to suspend and see it shut down with reason suspend.

libxl: ``domain_suspend_callback_common`` and what it calls
(tools/libs/light/libxl_dom_suspend.c), in the same order:

1. validate -- classify the domain, refuse what cannot be suspended, choose
   the method as libxl does (the suspend event channel, else a hard
   ``shutdown(suspend)`` for a guest without PV drivers or already in S3, else
   the xenstore handshake; a plugin may choose ACPI S3), then the plugins'
   veto (``torpor_veto_suspend``) -- nothing has been asked of the guest yet;
2. request -- write ``control/shutdown`` = ``suspend`` (watched first), notify
   the event channel, or shut the domain down;
3. ack (xenstore handshake only) -- ``domain_suspend_common_wait_guest``; on
   the deadline the request is withdrawn in a transaction (a last-moment ack
   wins) and the suspend fails with the guest running (libxl reports that
   cancel as a success in ``libxl_domain_suspend_only``; torpor does not);
4. shutdown -- wait (on ``@releaseDomain`` or the subscribed event channel)
   for the domain to be shut down with reason suspend; any other reason is a
   failure, an acked guest that never suspends a SuspendTimeout;
5. device model -- QMP ``stop`` + ``xen-save-devices-state``
   (``libxl__qmp_suspend_save``); if that fails, the guest is resumed
   cooperatively (:func:`rollback`) and the suspend reported failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from torpor.context import OperationContext
from torpor.engine import Sources
from torpor.errors import (
    AckTimeout,
    AlreadySuspended,
    DomainVanished,
    InvalidState,
    NoSuchDomain,
    OperationError,
    ResumeFailed,
    SuspendTimeout,
    Timeout,
    TorporError,
    UnexpectedShutdown,
    Vetoed,
)
from torpor.host import validate_domid
from torpor.model import (
    GuestType,
    Phase,
    PhaseTiming,
    Result,
    ShutdownReason,
    SuspendMethod,
    Verdict,
)
from torpor.monitor import Waker
from torpor.protocol import default_suspend_method, release_suspend_event_channel

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator

log = logging.getLogger("torpor")
T = TypeVar("T")


async def suspend(
    orch: Orchestrator,
    domid: int,
    *,
    ack_timeout: float | None = None,
    suspend_timeout: float | None = None,
) -> Result:
    """Suspend a domain: it ends shut down with reason suspend (or asleep in S3).

    Raises an :class:`~torpor.errors.OperationError` subclass saying what
    failed and what state the domain was left in (``err.state``).
    """
    orch._check_loop()
    domid = validate_domid(domid)
    timeouts = attrs.evolve(
        orch.timeouts,
        ack=orch.timeouts.ack if ack_timeout is None else ack_timeout,
        suspend=orch.timeouts.suspend if suspend_timeout is None else suspend_timeout,
    )
    async with orch._claim(domid, "suspend"):
        ctx = await orch._context("suspend", domid)
        ctx.timeouts = timeouts
        async with orch._reporting(ctx):
            return await suspend_domain(orch, ctx)


async def suspend_domain(orch: Orchestrator, ctx: OperationContext) -> Result:
    timings: list[PhaseTiming] = []
    gt = ctx.guest_type
    assert gt is not None
    async with orch._phase(ctx, Phase.VALIDATE, timings):
        info = ctx.domain
        if info.dying:
            raise InvalidState(f"domain {ctx.domid} is dying", state="dying")
        if info.suspended:
            raise AlreadySuspended(f"domain {ctx.domid} is already suspended", state="suspended")
        if info.shutdown:
            what = ShutdownReason.describe(info.shutdown_reason or 0)
            raise InvalidState(
                f"domain {ctx.domid} is shut down ({what}); cannot suspend",
                state=info.state_word(),
            )
        shutdown_path = f"{ctx.dompath}/control/shutdown"
        ack_wake = Waker()
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
                and "suspend_event_channel_read" not in ctx.facts  # absent, once a session
            ):
                port = await ctx.xenstore.read_or(f"{ctx.dompath}/device/suspend/event-channel", "")
                if ctx.facts.get("session"):
                    # As libxl sets up the suspend event channel once per save
                    # (libxl__domain_suspend_init), not once per Remus checkpoint.
                    ctx.facts["suspend_event_channel_read"] = True
                # Guest-written: ASCII digits only ("²".isdigit() is True, int() refuses it).
                if port.isascii() and port.isdigit() and len(port) <= 6 and 0 < int(port) < 1 << 17:
                    ctx.facts["suspend_event_channel"] = int(port)
            default = default_suspend_method(ctx)
            chosen = await orch._first("torpor_choose_suspend_method", ctx=ctx, default=default)
            ctx.method = SuspendMethod(chosen or default)
            _refuse_undeclared_method(gt, ctx.method)
            await _veto(orch, ctx)  # last: nothing has been asked of the guest yet
        except BaseException:
            if early_watch is not None:
                await _drop_watch(ctx, early_watch)
            raise
    await orch._notify("torpor_before_suspend", ctx=ctx)
    method = ctx.method
    acked = False
    ack_watch = None
    try:
        async with orch._phase(ctx, Phase.REQUEST, timings):
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
            if orch.record_intent and ctx.domid not in orch._intent._records:
                await orch._intent.begin(
                    ctx.domid, ctx.operation, method=str(method), requested=True
                )
            elif orch.record_intent:  # a migration that began its record earlier
                orch._intent.update(ctx.domid, method=str(method), requested=True)
            ctx.facts["requested"] = True  # from here on, a rollback has work to do
            done = await orch._first("torpor_request_suspend", ctx=ctx, method=method)
            if not done:
                raise OperationError(
                    f"no plugin can request a suspend by {method} for guest type {gt.name}",
                    state="running",
                )
        if method == SuspendMethod.XENSTORE:
            async with orch._phase(ctx, Phase.ACK, timings) as ack_phase:
                acked = await _wait_ack(orch, ctx, shutdown_path, ack_wake)
                if not acked:  # the phase failed, though the cancel may yet find an ack
                    ack_phase.error = Timeout(
                        f"the guest did not acknowledge the suspend request within "
                        f"{ctx.timeouts.ack:g}s",
                        deadline=ctx.timeouts.ack,
                        domid=ctx.domid,
                        phase=Phase.ACK,
                    )
            ctx.xenstore.unwatch_nowait(ack_watch)  # type: ignore[arg-type]
            ack_watch = None
            if not acked:
                async with orch._phase(ctx, Phase.CANCEL, timings):
                    acked = await cancel_request(orch, ctx, shutdown_path)
                if not acked:
                    orch._refresh(ctx)
                    raise AckTimeout(
                        f"guest did not acknowledge the suspend request within "
                        f"{ctx.timeouts.ack:g}s; request withdrawn, guest left "
                        f"{ctx.domain.state_word()}",
                        phase=Phase.ACK,
                        state=ctx.domain.state_word(),
                    )
        async with orch._phase(ctx, Phase.SHUTDOWN, timings):
            verdict = await _wait_suspended(orch, ctx, acked)
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
            async with orch._phase(ctx, Phase.DEVICE_MODEL_SUSPEND, timings):
                await orch._first("torpor_device_model_suspend", ctx=ctx)
        except TorporError as e:
            await rollback(orch, ctx, e)
    result = Result(
        domid=ctx.domid,
        operation=ctx.operation,
        guest_type=gt.name,
        outcome="asleep" if asleep else "suspended",
        state="S3" if asleep else "suspended",
        method=method,
        timings=tuple(timings),
    )
    await orch._notify("torpor_after_suspend", ctx=ctx, result=result)
    return result


async def _veto(orch: Orchestrator, ctx: OperationContext) -> None:
    """``torpor_veto_suspend``: the first plugin to give a reason (or raise a
    TorporError) refuses the suspend with Vetoed; any other exception is the
    plugin's bug, an OperationError as in every hook (:meth:`_call_impl`)."""
    name = "torpor_veto_suspend"
    kwargs = {"ctx": ctx}
    for impl in orch._impls(name)[::-1]:
        cause: TorporError | None = None
        try:
            reason = impl.function(*[kwargs[a] for a in impl.argnames])
            if inspect.isawaitable(reason):
                reason = await reason
        except Vetoed:
            raise
        except TorporError as e:
            reason, cause = e.message, e
        except Exception as e:
            raise OperationError(
                f"plugin {impl.plugin_name!r} failed in {name}: {e!r}",
                state=ctx.domain.state_word(),
                cause=e,
            ) from e
        if reason is None:
            continue
        if not isinstance(reason, str):
            raise OperationError(
                f"plugin {impl.plugin_name!r} returned {reason!r} from {name}; "
                "expected a reason (str) or None",
                state=ctx.domain.state_word(),
            )
        raise Vetoed(
            f"plugin {impl.plugin_name!r} vetoed the {ctx.operation}: "
            f"{reason or 'no reason given'}; the guest was not asked",
            plugin=impl.plugin_name,
            reason=reason,
            state=ctx.domain.state_word(),
            cause=cause,
        )


async def _wait_ack(orch: Orchestrator, ctx: OperationContext, path: str, wake: Waker) -> bool:
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


async def cancel_request(orch: Orchestrator, ctx: OperationContext, path: str) -> bool:
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


async def _wait_suspended(orch: Orchestrator, ctx: OperationContext, acked: bool) -> Verdict:
    method = ctx.method
    gt = ctx.guest_type
    assert gt is not None
    sources = Sources(
        port=ctx.facts.get("suspend_local_port") if method == SuspendMethod.EVENT_CHANNEL else None,
        device_model=method == SuspendMethod.ACPI_S3,
    )
    try:
        verdict = await orch._wait(
            ctx,
            lambda: orch._first("torpor_check_suspended", ctx=ctx),
            timeout=ctx.timeouts.suspend,
            sources=sources,
            what=f"domain {ctx.domid} suspending",
        )
    except Timeout as e:
        state = ctx.domain.state_word()
        if method == SuspendMethod.ACPI_S3:
            # qemu-ga's request cannot be withdrawn: a sleep that came at the
            # last moment is woken, and the error says what it did.
            done, state = await _settle_s3_request(orch, ctx, wait=0.0)
            raise SuspendTimeout(
                f"domain did not go to sleep within {ctx.timeouts.suspend:g}s after the "
                f"{method} request; {done}; guest left {state}",
                state=state,
                cause=e,
            ) from e
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
    except (DomainVanished, NoSuchDomain):
        raise
    except TorporError as e:
        if method != SuspendMethod.ACPI_S3:
            raise
        # The wait broke (xenstore or the hypervisor failed), not the guest:
        # it still has the request and goes to sleep when it is ready.
        done, state = await _settle_s3_request(orch, ctx, wait=ctx.timeouts.suspend)
        raise OperationError(
            f"{ctx.operation} failed in phase {ctx.phase}: {e.message}; the S3 request "
            f"cannot be withdrawn: {done}; guest left {state}",
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


async def _settle_s3_request(
    orch: Orchestrator, ctx: OperationContext, *, wait: float
) -> tuple[str, str]:
    """The wait for an ACPI S3 sleep failed, but the guest keeps its request.

    qemu-ga's ``guest-suspend-ram`` has no cancel: a guest that got it goes to
    sleep when its kernel is ready, after torpor has given up.  So before
    reporting, wait up to ``wait`` seconds for the sleep on the device model
    alone (its ``SUSPEND`` event, and ``HVM_PARAM_ACPI_S_STATE``: no xenstore,
    which may be what failed), wake a guest that slept (``torpor_resume_guest``:
    ``system_wakeup``) and wait for it to run, so the state the error reports is
    the one the guest stays in.  A refusal from the agent settles it too.
    Returns what happened and the state observed afterwards.
    """
    done = "the guest did not go to sleep"
    try:
        asleep = await _wait_on_device_model(
            orch, ctx, lambda: orch._first("torpor_check_suspended", ctx=ctx), wait
        )
        if asleep is not None and asleep.done:
            await orch._all("torpor_resume_guest", ctx=ctx)
            await _wait_on_device_model(
                orch,
                ctx,
                lambda: orch._first("torpor_check_resumed", ctx=ctx),
                ctx.timeouts.resume,
            )
            done = "it went to sleep after all and was woken"
    except TorporError as e:
        done = f"settling the request failed: {e.message}"
    return done, await orch._observe(ctx)


async def _wait_on_device_model(
    orch: Orchestrator,
    ctx: OperationContext,
    judge: Callable[[], Awaitable[Verdict | None]],
    timeout: float,
) -> Verdict | None:
    """``judge`` re-asked on each device-model event (or plugin wake-up) until
    done or failed; the last verdict when ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wake = Waker()
    dm = await ctx.device_model()
    unsubscribe = dm.subscribe(lambda _ev: wake.set())
    ctx.set_waker(wake.set)
    try:
        while True:
            wake.clear()
            orch._refresh(ctx)
            verdict = await judge()
            if verdict is not None and (verdict.done or verdict.failed):
                return verdict
            remaining = deadline - loop.time()
            if remaining <= 0 or not await wake.wait(remaining):
                return verdict
    finally:
        ctx.set_waker(None)
        unsubscribe()


async def rollback(orch: Orchestrator, ctx: OperationContext, error: TorporError) -> None:
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
            await orch._first("torpor_device_model_resume", ctx=ctx)
        except TorporError as e:
            failures.append(f"the device model did not resume: {e.message}")
    gt = ctx.guest_type
    fast = gt is None or gt.cooperative_resume
    try:
        if not fast and not (gt is not None and gt.survives_inplace_noncooperative):
            raise ResumeFailed(
                f"guest type {gt.name if gt else '?'} can be resumed neither "
                "cooperatively nor non-cooperatively in place"
            )
        orch.host.hypervisor.resume(ctx.domid, fast=fast)
    except TorporError as e:
        failures.append(f"xc_domain_resume(fast={int(fast)}) failed: {e.message}")
    else:
        try:
            await ctx.xenstore.resume(ctx.domid)
        except TorporError as e:
            failures.append(f"XS_RESUME failed: {e.message}")
    state = await orch._observe(ctx)
    raise OperationError(
        f"{ctx.operation} failed in phase {ctx.phase}: {error.message}; "
        + ("; ".join(failures) if failures else "guest resumed cooperatively")
        + f"; guest left {state}",
        state=state,
        cause=error,
        phase=ctx.phase,
    ) from error


#: The capability a guest type must declare for each method a plugin may choose.
_METHOD_NEEDS = {
    SuspendMethod.XENSTORE: "xenstore_handshake",
    SuspendMethod.EVENT_CHANNEL: "event_channel",
    SuspendMethod.ACPI_S3: "acpi_s3",
}


def _refuse_undeclared_method(gt: GuestType, method: SuspendMethod) -> None:
    """A method the guest type says it cannot take is refused before the guest is asked."""
    needs = _METHOD_NEEDS.get(method)
    if needs is not None and not getattr(gt, needs):
        raise OperationError(
            f"the {method} method was chosen for a {gt.name} guest, whose guest type "
            f"(plugin {gt.plugin!r}) declares {needs}=False; nothing was asked of the guest",
            phase=Phase.VALIDATE,
        )


async def _drop_watch(ctx: OperationContext, pending: asyncio.Future[Any]) -> None:
    """Undo a speculatively registered watch (errors included: nothing to undo then)."""
    try:
        watch = await pending
    except TorporError:
        return
    with contextlib.suppress(TorporError):
        await ctx.xenstore.unwatch(watch)

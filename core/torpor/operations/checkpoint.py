"""Checkpoint: suspend, the caller's work while suspended, cooperative resume.

What Remus and ``xl save -c`` do per checkpoint (libxl:
``libxl__domain_suspend`` then ``libxl__domain_resume(..., suspend_cancel=1)``),
run as one session: the domain is claimed, classified and its suspend event
channel bound once for many checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from torpor.context import OperationContext
from torpor.errors import (
    OperationError,
    TorporError,
    UnsafeResume,
    UsageError,
)
from torpor.host import validate_domid
from torpor.model import (
    Phase,
    PhaseTiming,
    Result,
)
from torpor.operations.resume import resume_domain
from torpor.operations.suspend import suspend_domain
from torpor.protocol import release_suspend_event_channel

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator

log = logging.getLogger("torpor")
T = TypeVar("T")


async def checkpoint(
    orch: Orchestrator,
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
    results = await checkpoints(
        orch, domid, 1, callback=callback, ack_timeout=ack_timeout, suspend_timeout=suspend_timeout
    )
    return results[0]


async def checkpoints(
    orch: Orchestrator,
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
    orch._check_loop()
    domid = validate_domid(domid)
    if count < 1:
        raise UsageError("a checkpoint session needs at least one checkpoint")
    timeouts = attrs.evolve(
        orch.timeouts,
        ack=orch.timeouts.ack if ack_timeout is None else ack_timeout,
        suspend=orch.timeouts.suspend if suspend_timeout is None else suspend_timeout,
    )
    results: list[Result] = []
    async with orch._claim(domid, "checkpoint"):
        ctx = await orch._context("checkpoint", domid)
        ctx.timeouts = timeouts
        ctx.facts["session"] = True
        gt = ctx.guest_type
        assert gt is not None
        if not gt.cooperative_resume and not gt.survives_inplace_noncooperative:
            raise UnsafeResume(
                f"domain {domid} cannot be checkpointed: its guest type {gt.name} "
                "declares cooperative_resume=False and survives no non-cooperative "
                "resume in the same domain; nothing was done",
                domid=domid,
                phase=Phase.VALIDATE,
                state=ctx.domain.state_word(),
            )

        async def release() -> None:  # the session's channel, however it ends
            if "suspend_local_port" in ctx.facts:
                with contextlib.suppress(TorporError):
                    release_suspend_event_channel(ctx)

        ctx.on_close(release)
        async with orch._reporting(ctx):
            for i in range(count):
                if i:
                    if interval:
                        ctx.facts["pacing"] = True
                        await asyncio.sleep(interval)  # the caller's pacing
                        ctx.facts.pop("pacing")
                    orch._refresh(ctx)
                result = await _once(orch, ctx, callback)
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results


async def _once(
    orch: Orchestrator, ctx: OperationContext, callback: Callable[[Result], Any] | None
) -> Result:
    for fact in ("cancelled", "requested", "resuming", "resumed", "xs_resumed"):
        ctx.facts.pop(fact, None)
    ctx.cooperative = None
    suspended = await suspend_domain(orch, ctx)
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
    orch._refresh(ctx)
    resumed = await resume_domain(orch, ctx)
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
        cooperative=resumed.cooperative,
        timings=(
            *suspended.timings,
            PhaseTiming(Phase.CALLBACK, cb_seconds),
            *resumed.timings,
        ),
    )

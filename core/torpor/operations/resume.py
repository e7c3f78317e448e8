"""Resume: a suspended domain runs again (or one asleep in S3 wakes).

libxl: ``libxl__domain_resume`` (libxl_dom_suspend.c), which calls
``xc_domain_resume`` (tools/libs/guest/xg_resume.c), in its order:

1. validate -- refuse a domain that is not suspended, and an in-place
   non-cooperative resume a guest would not survive (Linux panics on it);
2. device model first -- QMP ``cont`` (resuming it after the domain made HVM
   resume fail silently: libxl commit f33b4fc4ef);
3. ``xc_domain_resume(domid, fast)`` -- fast: the guest's suspend hypercall
   returns 1 (cooperative); slow: it returns 0 and the guest rebuilds;
4. XS_RESUME -- every time: xenstored re-arms ``@releaseDomain`` only then;
5. guest-resume -- guest-type work (the HVM plugin's ``system_wakeup``);
6. verify -- the guest runs (and, after a resume in a new domain, its
   frontends reconnected), judged by the plugins on each event.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from torpor.context import OperationContext
from torpor.engine import Sources
from torpor.errors import (
    HypervisorError,
    InvalidState,
    NotSuspended,
    ResumeFailed,
    Timeout,
    UnsafeResume,
)
from torpor.host import validate_domid
from torpor.model import (
    Phase,
    PhaseTiming,
    Result,
    ShutdownReason,
    Verdict,
)

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator

log = logging.getLogger("torpor")
T = TypeVar("T")


async def resume(
    orch: Orchestrator, domid: int, *, cooperative: bool = True, force: bool = False
) -> Result:
    """Resume a suspended domain (or wake one asleep in S3).

    ``cooperative=True`` (fast): the guest's suspend hypercall returns 1 and
    it reuses everything.  ``cooperative=False`` in the same domain crashes
    today's Linux guests; it is refused unless the guest type says it
    survives it, or ``force=True`` (then the outcome is reported as seen).
    """
    orch._check_loop()
    domid = validate_domid(domid)
    async with orch._claim(domid, "resume"):
        ctx = await orch._context("resume", domid)
        ctx.cooperative = cooperative
        ctx.force = force
        async with orch._reporting(ctx):
            return await resume_domain(orch, ctx)


async def resume_domain(orch: Orchestrator, ctx: OperationContext) -> Result:
    timings: list[PhaseTiming] = []
    gt = ctx.guest_type
    assert gt is not None
    cooperative = bool(ctx.cooperative)
    async with orch._phase(ctx, Phase.VALIDATE, timings):
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
        if shut and cooperative and not gt.cooperative_resume:
            # Its suspend hypercall cannot return 1: never a fast resume.
            if ctx.in_place and unsafe:
                raise UnsafeResume(
                    f"domain {ctx.domid} cannot be resumed in place: its guest type "
                    f"{gt.name} declares cooperative_resume=False (its suspend hypercall "
                    "cannot return 1) and survives no non-cooperative resume in the same "
                    "domain. Restore it into a new domain, or force it.",
                    state="suspended",
                )
            cooperative = False
            ctx.cooperative = False
        if shut and not cooperative and ctx.in_place and unsafe:
            raise UnsafeResume(
                f"refusing a non-cooperative resume of domain {ctx.domid} in the same "
                f"domain: {gt.name} guests re-register their vcpu_info on it, which the "
                "hypervisor refuses (EINVAL) in a domain that already registered, and "
                "Linux panics (seen on real Xen). Resume cooperatively, restore into a "
                "new domain, or force it.",
                state="suspended",
            )
    await orch._notify("torpor_before_resume", ctx=ctx)
    if orch.record_intent and ctx.domid not in orch._intent._records:
        await orch._intent.begin(ctx.domid, ctx.operation, cooperative=cooperative)
    ctx.facts["resuming"] = True  # from here on, an interrupted resume is finished
    if shut:
        if gt.device_model:
            async with orch._phase(ctx, Phase.DEVICE_MODEL_RESUME, timings):
                await orch._first("torpor_device_model_resume", ctx=ctx)
        async with orch._phase(ctx, Phase.RESUME, timings):
            try:
                orch.host.hypervisor.resume(ctx.domid, fast=cooperative)
                ctx.facts["resumed"] = True
            except HypervisorError as e:
                orch._refresh(ctx)
                raise ResumeFailed(
                    f"xc_domain_resume(fast={int(cooperative)}) failed: {e}",
                    state=ctx.domain.state_word(),
                    cause=e,
                ) from e
        async with orch._phase(ctx, Phase.XS_RESUME, timings):
            # Every time: xenstored re-arms @releaseDomain only on XS_RESUME.
            await ctx.xenstore.resume(ctx.domid)
            ctx.facts["xs_resumed"] = True
    async with orch._phase(ctx, Phase.GUEST_RESUME, timings):
        if shut:  # resumed: the hooks see the domain as it is now
            orch._refresh(ctx)
        await orch._all("torpor_resume_guest", ctx=ctx)
    async with orch._phase(ctx, Phase.VERIFY, timings):
        await verify_resumed(orch, ctx, shut=shut, s3=s3)
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
    await orch._notify("torpor_after_resume", ctx=ctx, result=result)
    return result


async def verify_resumed(
    orch: Orchestrator, ctx: OperationContext, *, shut: bool, s3: bool
) -> None:
    gt = ctx.guest_type
    assert gt is not None
    sources = Sources(
        xs_paths=() if ctx.cooperative else (f"{ctx.dompath}/device",),
        device_model=gt.device_model and s3,
    )
    timeout = ctx.timeouts.wake if s3 and not shut else ctx.timeouts.resume

    def judge() -> Awaitable[Verdict | None]:
        return orch._first("torpor_check_resumed", ctx=ctx)

    try:
        verdict = await orch._wait(
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
            verdict = await orch._wait(
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

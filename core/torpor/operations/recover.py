"""Status, recover and list: the truth about domains, and bringing one back.

``status`` and ``list`` report what the hypervisor says (never what torpor
meant to do) and any intent record a torpor process left; ``recover`` and
:func:`bring_back` -- which is also the rollback of an interrupted operation
-- undo whatever a suspend, resume or rollback left half-done, in libxl's
order: withdraw a pending request (the cancel of
``domain_suspend_common_wait_guest``), let a suspend under way finish, then
``libxl__domain_resume`` cooperatively.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, TypeVar

from torpor.context import OperationContext
from torpor.engine import Sources, observed_state
from torpor.errors import (
    DomainBusy,
    Interrupted,
    InvalidState,
    ResumeFailed,
    Timeout,
    TorporError,
    UnsupportedGuest,
)
from torpor.host import validate_domid
from torpor.intent import pid_alive
from torpor.model import (
    Phase,
    PhaseTiming,
    Result,
    SuspendMethod,
)
from torpor.operations.resume import resume_domain
from torpor.operations.suspend import cancel_request

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator

log = logging.getLogger("torpor")
T = TypeVar("T")


async def status(orch: Orchestrator, domid: int) -> dict[str, Any]:
    """The truth about a domain, from observation, and any torpor intent record.

    ``state`` is what the hypervisor says (``running``, ``paused``,
    ``suspended``, ``S3``, ``crashed``...); ``request_pending`` whether a
    ``control/shutdown`` suspend request is outstanding; ``intent`` what a
    torpor process was doing (``intent_alive``: whether it still runs).
    """
    orch._check_loop()
    domid = validate_domid(domid)
    info = orch._domain_info(domid, Phase.VALIDATE)
    try:
        guest_type: str = (await orch.classify(info)).name
    except UnsupportedGuest:
        guest_type = "?"
    s3 = orch._in_s3(info) and not info.shutdown
    xs = orch.host.xenstore.aio
    request = await xs.read_or(f"/local/domain/{domid}/control/shutdown", "")
    intent = await orch._intent.read(domid)
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
        "busy": domid in orch._busy,
    }


async def recover(orch: Orchestrator, domid: int) -> Result:
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
    orch._check_loop()
    domid = validate_domid(domid)
    timings: list[PhaseTiming] = []
    actions: list[str] = []
    intent = await orch._intent.read(domid)
    if intent is not None and intent.get("host") == socket.gethostname():
        pid = intent.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
            raise DomainBusy(
                f"torpor pid {pid} is still working on domain {domid} "
                f"({intent.get('op')}); not recovering under it",
                domid=domid,
                phase=Phase.VALIDATE,
                state=observed_state(orch.host.hypervisor, domid),
            )
    handed_over(orch, domid, intent)
    async with orch._claim(domid, "recover"):
        ctx = await orch._context("recover", domid)
        ctx.cooperative = True
        if intent is not None:
            # Ours replaces the dead one's, and goes when recover ends.
            await orch._intent.begin(domid, "recover")
        async with orch._reporting(ctx):
            if intent is not None:
                if intent.get("method") == str(SuspendMethod.EVENT_CHANNEL):
                    with contextlib.suppress(TorporError):
                        ctx.hypervisor.evtchn_subscribe(domid, 0)
                    actions.append("dropped the suspend event channel subscription")
                # It may have resumed the domain and died before XS_RESUME.
                ctx.facts["resumed"] = True
            actions += await bring_back(
                orch, ctx, asked=bool(intent and intent.get("requested")), timings=timings
            )
            actions += await _name_back(orch, domid, intent)
            if ctx.guest_type is not None and ctx.guest_type.device_model:
                state = await orch._observe(ctx)
                if state.startswith("running, device model"):
                    async with orch._phase(ctx, Phase.DEVICE_MODEL_RESUME, timings):
                        await orch._first("torpor_device_model_resume", ctx=ctx)
                    actions.append("let the stopped device model run again")
            state = await orch._observe(ctx)
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


def handed_over(orch: Orchestrator, domid: int, intent: dict[str, Any] | None) -> None:
    """Refuse to resume a migration's source the receiver was given permission to
    start (xl's "Domain state is now undefined"): it may run there already."""
    if intent is None or intent.get("op") != "migrate" or intent.get("migration") != "go":
        return
    to = intent.get("to") or "the destination"
    away = intent.get("away")
    name = intent.get("name")
    raise InvalidState(
        f"domain {domid} was handed over: torpor pid {intent.get('pid')} gave the receiver "
        f"on {to} permission to start the guest and then lost it; resuming it here could "
        f"run a second copy of one guest. Check {to}: if the guest runs there, destroy "
        f"this domain; if not, `torpor resume {domid}`"
        + (f" (and rename it back from {away!r} to {name!r})" if away and name else "")
        + " brings it back here",
        domid=domid,
        phase=Phase.VALIDATE,
        state=observed_state(orch.host.hypervisor, domid),
    )


async def _name_back(orch: Orchestrator, domid: int, intent: dict[str, Any] | None) -> list[str]:
    """A migration renamed its source NAME--migratedaway before it died: the name back."""
    if intent is None or intent.get("op") != "migrate":
        return []
    name, away = intent.get("name"), intent.get("away")
    if not isinstance(name, str) or not isinstance(away, str):
        return []
    from torpor.operations.names import rename_domain

    current = await orch.host.xenstore.aio.read_or(f"/local/domain/{domid}/name", None)
    if current != away:
        return []
    await rename_domain(orch, domid, away, name)
    return [f"renamed it back from {away!r} to {name!r}"]


async def bring_back(
    orch: Orchestrator, ctx: OperationContext, *, asked: bool, timings: list[PhaseTiming]
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
    orch._refresh(ctx)
    if not ctx.domain.shutdown and await ctx.xenstore.read_or(path, "") == "suspend":
        async with orch._phase(ctx, Phase.CANCEL, timings):
            if await cancel_request(orch, ctx, path):
                asked = True  # taken at the last moment: it is on its way
            else:
                actions.append("withdrew the pending suspend request")
                asked = False
    if asked and not ctx.domain.shutdown and not ctx.facts.get("s3"):
        ctx.facts["settling"] = True  # progress: waiting for a suspend under way
        async with orch._phase(ctx, Phase.SHUTDOWN, timings):
            with contextlib.suppress(Timeout):
                await orch._wait(
                    ctx,
                    lambda: orch._first("torpor_check_suspended", ctx=ctx),
                    timeout=ctx.timeouts.settle,
                    sources=Sources(device_model=ctx.method == SuspendMethod.ACPI_S3),
                    what="a suspend already under way",
                )
        ctx.facts.pop("settling", None)
    orch._refresh(ctx)
    info = ctx.domain
    if info.shutdown and not info.suspended:
        raise ResumeFailed(
            f"domain {ctx.domid} is {info.state_word()}; torpor cannot bring it back",
            state=info.state_word(),
        )
    if info.suspended or ctx.facts.get("s3"):
        ctx.cooperative = True
        result = await resume_domain(orch, ctx)
        timings.extend(result.timings)
        actions.append("resumed it cooperatively" if info.suspended else "woke it from S3")
    elif ctx.facts.get("resumed") and not ctx.facts.get("xs_resumed"):
        async with orch._phase(ctx, Phase.XS_RESUME, timings):
            await ctx.xenstore.resume(ctx.domid)
            ctx.facts["xs_resumed"] = True
        actions.append(
            "sent XS_RESUME, which re-arms xenstored's @releaseDomain (the domain had "
            "been resumed by an operation that may not have sent it)"
        )
    return actions


async def list_domains(orch: Orchestrator) -> list[dict[str, Any]]:
    """Every guest domain with its guest type (or why none claims it) and state."""
    orch._check_loop()
    out = []
    for info in orch.host.hypervisor.domain_info_list():
        if info.domid == 0:
            continue
        try:
            gt: str = (await orch.classify(info)).name
        except UnsupportedGuest:
            gt = "?"
        name = await orch.host.xenstore.aio.read_or(f"/local/domain/{info.domid}/name", "")
        state = "S3" if orch._in_s3(info) and not info.shutdown else info.state_word()
        out.append({"domid": info.domid, "name": name, "guest_type": gt, "state": state})
    return out


async def roll_back_interrupted(orch: Orchestrator, ctx: OperationContext) -> Interrupted:
    """An operation was cancelled: undo what it had done, say what is left.

    What it had done is in ``ctx.facts`` (``requested``: the guest was
    asked; ``resuming``: a resume had begun acting).  Nothing asked,
    nothing undone.  Otherwise :func:`bring_back`, within the settle
    deadline for a suspend already under way.  A guest not back running
    keeps its intent record, marked, for ``torpor recover``.
    """
    reason = orch._interrupted or "cancelled"
    at = ctx.phase
    actions: list[str] = []
    problem: TorporError | None = None
    touched = bool(ctx.facts.get("requested") or ctx.facts.get("resuming"))
    if touched:
        try:
            actions = await bring_back(
                orch, ctx, asked=bool(ctx.facts.get("requested")), timings=[]
            )
        except TorporError as e:
            problem = e
    state = await orch._observe(ctx)
    # Back where the operation found it (a paused guest stays paused), or running.
    found = ctx.facts.get("found")
    clean = problem is None and (state in ("running", found) or not touched)
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
        orch._intent.keep(ctx.domid, interrupted=reason, phase=str(at), left=state)
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

"""Xen's generic suspend mechanisms, as a plugin torpor always registers first.

These are the parts of libxl's ``domain_suspend_callback_common``
(tools/libs/light/libxl_dom_suspend.c) that do not depend on the guest type:

* the **xenstore handshake**: write ``suspend`` to ``control/shutdown``; the
  guest acks (the orchestrator waits, and cancels in a transaction on
  timeout);
* the **suspend event channel**: bind the guest's published port, subscribe
  it for suspend (XEN_DOMCTL_subscribe -- Xen then signals it *instead of*
  VIRQ_DOM_EXC), notify it; no ack;
* the **hard shutdown**: ``xc_domain_shutdown(SHUTDOWN_suspend)``, no
  cooperation, for HVM guests without PV drivers or already in S3;

the generic device-model steps for every guest type with ``device_model=True``
(libxl's ``libxl__qmp_suspend_save``: QMP ``stop`` and
``xen-save-devices-state``; ``cont`` before the domain resumes), and the
generic judgements: a suspend is done when the domain is shut down with
reason suspend (any other reason is a failure); a resume is done when the
domain runs again.  Registered first by
:func:`torpor.plugins.get_plugin_manager`, so for every ``firstresult`` hook
a guest-type plugin is asked before these.
"""

from __future__ import annotations

import errno

from torpor.context import OperationContext
from torpor.errors import HypervisorError
from torpor.hookspecs import hookimpl
from torpor.host import Host
from torpor.model import (
    HVM_PARAM_ACPI_S_STATE,
    HVM_PARAM_CALLBACK_IRQ,
    X86_EMU_LAPIC,
    DomainInfo,
    ShutdownReason,
    SuspendMethod,
    Verdict,
)

__all__ = [
    "default_suspend_method",
    "hvm_with_device_model",
    "release_suspend_event_channel",
    "torpor_check_resumed",
    "torpor_check_suspended",
    "torpor_device_model_resume",
    "torpor_device_model_suspend",
    "torpor_request_suspend",
]


def hvm_with_device_model(domain: DomainInfo, host: Host) -> tuple[int, int] | None:
    """For an HVM domain with a device model: ``(callback IRQ, ACPI S state)``.

    ``None`` for a PV domain, a PVH one (only the LAPIC emulated: no device
    model), or one whose params cannot be read.  A callback IRQ means the
    kernel runs PV drivers (PVHVM); an S state means it sleeps (the method table
    of docs/protocol.md: an HVM guest in S3 is handled as plain HVM).
    """
    if not domain.hvm or domain.emulation_flags == X86_EMU_LAPIC:
        return None
    try:
        return (
            host.hypervisor.get_hvm_param(domain.domid, HVM_PARAM_CALLBACK_IRQ),
            host.hypervisor.get_hvm_param(domain.domid, HVM_PARAM_ACPI_S_STATE),
        )
    except HypervisorError:
        return None


def default_suspend_method(ctx: OperationContext) -> SuspendMethod:
    """libxl's choice: event channel, else hard shutdown, else xenstore."""
    gt = ctx.guest_type
    s3 = bool(ctx.facts.get("s3"))
    if ctx.facts.get("suspend_event_channel") and not s3:
        return SuspendMethod.EVENT_CHANNEL
    if s3 or (gt is not None and not gt.xenstore_handshake):
        return SuspendMethod.HARD_SHUTDOWN
    return SuspendMethod.XENSTORE


@hookimpl(trylast=True)
async def torpor_request_suspend(ctx: OperationContext, method: SuspendMethod) -> bool | None:
    if method == SuspendMethod.XENSTORE:
        await ctx.xenstore.write(f"{ctx.dompath}/control/shutdown", "suspend")
        return True
    if method == SuspendMethod.HARD_SHUTDOWN:
        ctx.hypervisor.shutdown(ctx.domid, ShutdownReason.SUSPEND)
        return True
    if method == SuspendMethod.EVENT_CHANNEL:
        if "suspend_local_port" not in ctx.facts:  # a checkpoint session keeps it bound
            bind_suspend_event_channel(ctx)
        ctx.hypervisor.evtchn_notify(ctx.facts["suspend_local_port"])
        return True
    return None


def bind_suspend_event_channel(ctx: OperationContext) -> int:
    """libxl's ``xc_suspend_evtchn_init_exclusive``: lock, bind, subscribe.

    The lock file keeps two toolstacks from fighting over one guest's channel;
    the subscription makes Xen signal the bound port instead of VIRQ_DOM_EXC.
    Xen marks a freshly bound local port pending at once (event_channel.c
    evtchn_bind_interdomain: "conservatively always setting a notification"),
    so the first event seen proves nothing: every event is judged by
    re-reading the domain's state.
    """
    hv = ctx.hypervisor
    port = int(ctx.facts["suspend_event_channel"])
    lock = hv.suspend_evtchn_lock(ctx.domid)
    lock.acquire()
    try:
        local = hv.evtchn_bind_interdomain(ctx.domid, port)
        try:
            hv.evtchn_subscribe(ctx.domid, port)
        except BaseException:
            hv.evtchn_unbind(local)
            raise
    except BaseException:
        lock.release()
        raise
    ctx.facts["suspend_local_port"] = local
    ctx.data["torpor.suspend_evtchn_lock"] = lock
    return local


def release_suspend_event_channel(ctx: OperationContext) -> None:
    """Undo :func:`bind_suspend_event_channel`: unsubscribe, unbind, unlock.

    Unsubscribing gives VIRQ_DOM_EXC back to xenstored, so a later suspend by
    another toolstack is noticed through ``@releaseDomain`` again.
    """
    hv = ctx.hypervisor
    local = ctx.facts.pop("suspend_local_port", None)
    lock = ctx.data.pop("torpor.suspend_evtchn_lock", None)
    try:
        if local is not None:
            try:
                hv.evtchn_subscribe(ctx.domid, 0)
            except HypervisorError as e:
                if e.errno != errno.ESRCH:  # the domain is gone: nothing to undo
                    raise
            hv.evtchn_unbind(local)
    finally:
        if lock is not None:
            lock.release()


@hookimpl(trylast=True)
async def torpor_device_model_suspend(ctx: OperationContext) -> bool | None:
    if ctx.guest_type is None or not ctx.guest_type.device_model:
        return None
    from torpor.devicemodel import suspend_device_model

    await suspend_device_model(ctx)
    return True


@hookimpl(trylast=True)
async def torpor_device_model_resume(ctx: OperationContext) -> bool | None:
    if ctx.guest_type is None or not ctx.guest_type.device_model:
        return None
    from torpor.devicemodel import resume_device_model

    await resume_device_model(ctx)
    return True


@hookimpl(trylast=True)
def torpor_check_suspended(ctx: OperationContext) -> Verdict | None:
    info = ctx.domain
    if info.dying:
        return Verdict.fail("dying", "the domain is being destroyed")
    reason = info.shutdown_reason
    if reason is None:
        return Verdict.pending("running", "not shut down yet")
    if reason == ShutdownReason.SUSPEND:
        return Verdict.ok("suspended")
    what = ShutdownReason.describe(reason)
    return Verdict.fail(
        ShutdownReason.state_word(reason),
        f"the domain shut down with reason {what} ({reason})",
        reason,
    )


@hookimpl(trylast=True)
def torpor_check_resumed(ctx: OperationContext) -> Verdict | None:
    info = ctx.domain
    if info.dying:
        return Verdict.fail("dying", "the domain is being destroyed")
    reason = info.shutdown_reason
    if reason is not None:
        what = ShutdownReason.describe(reason)
        if reason == ShutdownReason.SUSPEND:
            return Verdict.pending("suspended", "still shut down for suspend")
        return Verdict.fail(
            ShutdownReason.state_word(reason),
            f"the guest shut down with reason {what} ({reason}) after the resume",
            reason,
        )
    if ctx.facts.get("s3"):
        return Verdict.pending("S3", "still asleep in ACPI S3")
    return Verdict.ok("paused" if info.paused else "running")

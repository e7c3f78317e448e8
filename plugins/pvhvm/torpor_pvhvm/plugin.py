"""PVHVM guests: HVM guests whose kernel runs PV drivers.

What is PVHVM-specific:

* recognition -- an HVM guest (not PVH: more than the LAPIC emulated) whose
  ``HVM_PARAM_CALLBACK_IRQ`` is set (the kernel registered its event-channel
  callback: it has PV drivers) and which is not asleep in S3
  (``HVM_PARAM_ACPI_S_STATE`` 0; an S3 guest is the HVM plugin's);
* capabilities -- the xenstore handshake; a QEMU device model; cooperative
  resume (the toolstack sets eax = 1 because the callback IRQ is set); no
  in-place non-cooperative resume: Linux's ``xen_hvm_post_suspend``
  re-registers vcpu_info, fails with EINVAL and the guest reboots;
* the device model -- QMP ``stop`` + ``xen-save-devices-state`` once
  suspended, ``cont`` before the domain resumes;
* verification -- after a resume in a new domain, frontends reconnected.
"""

from __future__ import annotations

from torpor import hookimpl
from torpor.context import OperationContext
from torpor.devicemodel import resume_device_model, suspend_device_model
from torpor.errors import HypervisorError
from torpor.frontends import frontends_verdict
from torpor.host import Host
from torpor.model import (
    HVM_PARAM_ACPI_S_STATE,
    HVM_PARAM_CALLBACK_IRQ,
    X86_EMU_LAPIC,
    DomainInfo,
    GuestType,
    Verdict,
)

__all__ = ["GUEST_TYPE"]

GUEST_TYPE = GuestType(
    name="pvhvm",
    plugin="pvhvm",
    xenstore_handshake=True,
    event_channel=False,
    device_model=True,
    acpi_s3=False,
    cooperative_resume=True,
    survives_inplace_noncooperative=False,
)


@hookimpl
def torpor_classify_domain(domain: DomainInfo, host: Host) -> GuestType | None:
    if not domain.hvm or domain.emulation_flags == X86_EMU_LAPIC:
        return None
    try:
        callback = host.hypervisor.get_hvm_param(domain.domid, HVM_PARAM_CALLBACK_IRQ)
        asleep = host.hypervisor.get_hvm_param(domain.domid, HVM_PARAM_ACPI_S_STATE)
    except HypervisorError:
        return None
    return GUEST_TYPE if callback != 0 and asleep == 0 else None


@hookimpl
async def torpor_device_model_suspend(ctx: OperationContext) -> None:
    if ctx.guest_type is GUEST_TYPE:
        await suspend_device_model(ctx)


@hookimpl
async def torpor_device_model_resume(ctx: OperationContext) -> None:
    if ctx.guest_type is GUEST_TYPE:
        await resume_device_model(ctx)


@hookimpl
async def torpor_check_resumed(ctx: OperationContext) -> Verdict | None:
    if ctx.guest_type is not GUEST_TYPE or ctx.in_place or ctx.cooperative:
        return None
    return await frontends_verdict(ctx)

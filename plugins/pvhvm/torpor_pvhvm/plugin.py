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
* the device model -- declared (``device_model=True``); torpor's generic
  steps stop and save it once suspended and ``cont`` it before the domain
  resumes, as libxl does, so there is no code for it here;
* verification -- after a resume in a new domain, frontends reconnected.
"""

from __future__ import annotations

from torpor import hookimpl
from torpor.context import OperationContext
from torpor.frontends import frontends_verdict
from torpor.host import Host
from torpor.model import (
    DomainInfo,
    GuestType,
    Verdict,
)
from torpor.protocol import hvm_with_device_model

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
    params = hvm_with_device_model(domain, host)
    if params is None:
        return None
    callback, asleep = params
    return GUEST_TYPE if callback != 0 and asleep == 0 else None


@hookimpl
async def torpor_check_resumed(ctx: OperationContext) -> Verdict | None:
    if ctx.guest_type is not GUEST_TYPE or ctx.in_place or ctx.cooperative:
        return None
    return await frontends_verdict(ctx)

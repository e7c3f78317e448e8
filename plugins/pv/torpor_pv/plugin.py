"""PV guests: not HVM; asked through xenstore or their suspend event channel.

What is PV-specific, and nothing else (torpor's core drives the protocol):

* recognition -- the domain is not an HVM guest (``XEN_DOMINF_hvm_guest`` clear);
* capabilities -- it answers the xenstore handshake; classic XenLinux kernels
  publish a suspend event channel (``device/suspend/event-channel``); no
  device model; its suspend hypercall can return 1 (cooperative resume);
  it does **not** survive a non-cooperative resume in the same domain: Linux
  re-registers vcpu_info in ``xen_pv_post_suspend`` and panics on EINVAL;
* verification -- after a resume in a *new* domain (restore, migration) its
  PV frontends must have reconnected to their backends.
"""

from __future__ import annotations

from torpor import hookimpl
from torpor.context import OperationContext
from torpor.frontends import frontends_verdict
from torpor.host import Host
from torpor.model import DomainInfo, GuestType, Verdict

__all__ = ["GUEST_TYPE"]

GUEST_TYPE = GuestType(
    name="pv",
    plugin="pv",
    xenstore_handshake=True,
    event_channel=True,
    device_model=False,
    acpi_s3=False,
    cooperative_resume=True,
    survives_inplace_noncooperative=False,
)


@hookimpl
def torpor_classify_domain(domain: DomainInfo, host: Host) -> GuestType | None:
    return None if domain.hvm else GUEST_TYPE


@hookimpl
async def torpor_check_resumed(ctx: OperationContext) -> Verdict | None:
    if ctx.guest_type is not GUEST_TYPE or ctx.in_place or ctx.cooperative:
        return None
    return await frontends_verdict(ctx)

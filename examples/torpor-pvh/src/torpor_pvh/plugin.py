"""PVH guests: HVM containers that run a PV-aware kernel and emulate only the LAPIC.

A PVH domain has the HVM flag set but no device model: the toolstack gives it
``XEN_X86_EMU_LAPIC`` and nothing else in ``arch_config.emulation_flags``.
Its kernel talks to xenstore like a PV one, so it is asked to suspend with
the xenstore handshake, and after a resume in a new domain its PV frontends
reconnect.  Linux re-registers vcpu_info on a non-cooperative resume, which
fails with EINVAL in the same domain: it must not be resumed that way in
place.

Everything else -- the handshake, the deadlines, the cancel, waiting for the
shutdown, XS_RESUME -- is torpor's.  This module uses only torpor's public
API: :data:`torpor.hookimpl`, :mod:`torpor.model`, :mod:`torpor.context` and
:mod:`torpor.frontends`.
"""

from __future__ import annotations

from torpor import hookimpl
from torpor.context import OperationContext
from torpor.frontends import frontends_verdict
from torpor.host import Host
from torpor.model import X86_EMU_LAPIC, DomainInfo, GuestType, Verdict

__all__ = ["GUEST_TYPE"]

GUEST_TYPE = GuestType(
    name="pvh",
    plugin="pvh",
    xenstore_handshake=True,  # the guest acks control/shutdown
    event_channel=False,  # mainline Linux publishes no suspend event channel
    device_model=False,  # PVH has no QEMU
    acpi_s3=False,
    cooperative_resume=True,  # Xen sets eax = 1: it has a callback IRQ
    survives_inplace_noncooperative=False,  # Linux panics in register_vcpu_info
)


@hookimpl
def torpor_classify_domain(domain: DomainInfo, host: Host) -> GuestType | None:
    """Claim HVM domains that emulate the local APIC only."""
    if domain.hvm and domain.emulation_flags == X86_EMU_LAPIC:
        return GUEST_TYPE
    return None


@hookimpl
async def torpor_check_resumed(ctx: OperationContext) -> Verdict | None:
    """After a resume in a new domain, wait for the frontends to reconnect."""
    if ctx.guest_type is not GUEST_TYPE or ctx.in_place or ctx.cooperative:
        return None
    return await frontends_verdict(ctx)

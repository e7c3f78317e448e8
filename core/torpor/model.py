"""torpor's value types: frozen attrs classes and the enums of Xen's vocabulary.

Values never change in place; derive a changed copy with :func:`attrs.evolve`.
Constants carry the names Xen's public headers give them (``xen/domctl.h``,
``xen/sched.h``, ``xen/hvm/params.h``) so a reader can look them up.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "DOMINF_BLOCKED",
    "DOMINF_DYING",
    "DOMINF_HAP",
    "DOMINF_HVM_GUEST",
    "DOMINF_PAUSED",
    "DOMINF_RUNNING",
    "DOMINF_SHUTDOWN",
    "DOMINF_SHUTDOWN_MASK",
    "DOMINF_SHUTDOWN_SHIFT",
    "HVM_PARAM_ACPI_S_STATE",
    "HVM_PARAM_CALLBACK_IRQ",
    "HVM_PARAM_STORE_EVTCHN",
    "HVM_PARAM_STORE_PFN",
    "X86_EMU_LAPIC",
    "DomainInfo",
    "ShutdownReason",
]

# XEN_DOMINF_* (xen/include/public/domctl.h): xc_domaininfo_t.flags
DOMINF_DYING = 1 << 0
DOMINF_HVM_GUEST = 1 << 1
DOMINF_SHUTDOWN = 1 << 2
DOMINF_PAUSED = 1 << 3
DOMINF_BLOCKED = 1 << 4
DOMINF_RUNNING = 1 << 5
DOMINF_DEBUGGED = 1 << 6
DOMINF_XS_DOMAIN = 1 << 7
DOMINF_HAP = 1 << 8
DOMINF_SHUTDOWN_MASK = 0xFF
DOMINF_SHUTDOWN_SHIFT = 16

# HVM params (xen/include/public/hvm/params.h)
HVM_PARAM_CALLBACK_IRQ = 0
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_ACPI_S_STATE = 14

# XEN_X86_EMU_* (xen/include/public/arch-x86/xen.h): arch_config.emulation_flags
X86_EMU_LAPIC = 1 << 0
X86_EMU_HPET = 1 << 1
X86_EMU_PM = 1 << 2
X86_EMU_RTC = 1 << 3
X86_EMU_IOAPIC = 1 << 4
X86_EMU_PIC = 1 << 5
X86_EMU_VGA = 1 << 6
X86_EMU_IOMMU = 1 << 7
X86_EMU_PIT = 1 << 8
X86_EMU_USE_PIRQ = 1 << 9
#: What an HVM guest with a device model emulates (libxl's default for type=hvm).
X86_EMU_ALL = (
    X86_EMU_LAPIC
    | X86_EMU_HPET
    | X86_EMU_PM
    | X86_EMU_RTC
    | X86_EMU_IOAPIC
    | X86_EMU_PIC
    | X86_EMU_VGA
    | X86_EMU_IOMMU
    | X86_EMU_PIT
)


class ShutdownReason(enum.IntEnum):
    """``SHUTDOWN_*`` (xen/include/public/sched.h): why a domain shut down."""

    POWEROFF = 0
    REBOOT = 1
    SUSPEND = 2
    CRASH = 3
    WATCHDOG = 4
    SOFT_RESET = 5

    @classmethod
    def describe(cls, code: int) -> str:
        """``suspend`` for 2, ``crash`` for 3; ``reason <n>`` for a code Xen doesn't name."""
        try:
            return cls(code).name.lower().replace("_", "-")
        except ValueError:
            return f"reason {code}"


@attrs.frozen
class DomainInfo:
    """One domain as the hypervisor reports it (``xc_domaininfo_t``).

    ``flags`` is the raw ``XEN_DOMINF_*`` word; the properties decode it the way
    libxl does (shut down = ``flags & XEN_DOMINF_shutdown``; reason =
    ``(flags >> 16) & 0xff``).  Keep the raw word: ``xc_domain_getinfo`` folds a
    crash into ``crashed`` and clears ``shutdown``, losing the reason.
    """

    domid: int
    flags: int
    uuid: str = "00000000-0000-0000-0000-000000000000"
    tot_pages: int = 0
    max_pages: int = 0
    cpu_time: int = 0
    nr_online_vcpus: int = 1
    max_vcpu_id: int = 0
    emulation_flags: int = 0

    @property
    def dying(self) -> bool:
        return bool(self.flags & DOMINF_DYING)

    @property
    def hvm(self) -> bool:
        return bool(self.flags & DOMINF_HVM_GUEST)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & DOMINF_SHUTDOWN)

    @property
    def paused(self) -> bool:
        return bool(self.flags & DOMINF_PAUSED)

    @property
    def blocked(self) -> bool:
        return bool(self.flags & DOMINF_BLOCKED)

    @property
    def running(self) -> bool:
        return bool(self.flags & DOMINF_RUNNING)

    @property
    def shutdown_reason(self) -> int | None:
        """The guest-supplied shutdown code, or ``None`` if not shut down."""
        if not self.shutdown:
            return None
        return (self.flags >> DOMINF_SHUTDOWN_SHIFT) & DOMINF_SHUTDOWN_MASK

    @property
    def suspended(self) -> bool:
        """Shut down with reason suspend: what ``xc_domain_resume(fast=1)`` requires."""
        return self.shutdown_reason == ShutdownReason.SUSPEND

    @staticmethod
    def make_flags(
        *,
        hvm: bool = False,
        dying: bool = False,
        shutdown_reason: int | None = None,
        paused: bool = False,
        blocked: bool = False,
        running: bool = False,
        hap: bool = False,
    ) -> int:
        """Compose an ``XEN_DOMINF_*`` word (for backends that model a domain)."""
        flags = 0
        if dying:
            flags |= DOMINF_DYING
        if hvm:
            flags |= DOMINF_HVM_GUEST
        if hap:
            flags |= DOMINF_HAP
        if shutdown_reason is not None:
            flags |= DOMINF_SHUTDOWN
            flags |= (shutdown_reason & DOMINF_SHUTDOWN_MASK) << DOMINF_SHUTDOWN_SHIFT
        if paused:
            flags |= DOMINF_PAUSED
        if blocked:
            flags |= DOMINF_BLOCKED
        if running:
            flags |= DOMINF_RUNNING
        return flags

    def state_word(self) -> str:
        """A one-word state as ``xl list`` would think of it."""
        if self.dying:
            return "dying"
        if self.shutdown:
            reason = self.shutdown_reason
            if reason == ShutdownReason.SUSPEND:
                return "suspended"
            if reason == ShutdownReason.CRASH:
                return "crashed"
            return "shutdown"
        if self.paused:
            return "paused"
        return "running"

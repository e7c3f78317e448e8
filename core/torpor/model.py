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
    "GuestType",
    "Phase",
    "PhaseTiming",
    "PrecopyPolicy",
    "PrecopyRound",
    "PrecopyStats",
    "Result",
    "ShutdownReason",
    "SuspendMethod",
    "Timeouts",
    "Verdict",
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
    def state_word(cls, code: int) -> str:
        """The state a domain shut down with ``code`` is in: ``suspended``, ``crashed``..."""
        words = {
            cls.SUSPEND: "suspended",
            cls.CRASH: "crashed",
            cls.REBOOT: "rebooted",
            cls.POWEROFF: "powered-off",
        }
        for reason, word in words.items():
            if code == reason:
                return word
        return f"shutdown-{cls.describe(code).replace(' ', '-')}"

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
            return ShutdownReason.state_word(self.shutdown_reason or 0)
        if self.paused:
            return "paused"
        return "running"


class Phase(enum.StrEnum):
    """The protocol phases an operation goes through (errors and timings name them)."""

    VALIDATE = "validate"  # look at the domain, classify it, refuse what can't be done
    REQUEST = "request"  # ask the guest to suspend (by the chosen method)
    ACK = "ack"  # xenstore handshake: wait for the guest to take the request
    CANCEL = "cancel"  # ack timeout: withdraw the request, in a transaction
    SHUTDOWN = "shutdown"  # wait for the domain to be shut down with reason suspend / in S3
    DEVICE_MODEL_SUSPEND = "device-model-suspend"  # QMP stop (+ xen-save-devices-state)
    CALLBACK = "callback"  # checkpoint: the caller's work while the guest is suspended
    DEVICE_MODEL_RESUME = "device-model-resume"  # QMP cont, before the domain resumes
    RESUME = "resume"  # xc_domain_resume(fast)
    XS_RESUME = "xs-resume"  # XS_RESUME: re-arm xenstored's @releaseDomain latch
    GUEST_RESUME = "guest-resume"  # guest-type work after the domain runs (S3 wake...)
    VERIFY = "verify"  # the resumed guest is running (and, non-cooperatively, rebuilt)
    SAVE = "save"  # write the guest's state to an image
    RESTORE = "restore"  # build a new domain from an image
    TRANSFER = "transfer"  # stream an image to another host
    PRECOPY = "precopy"  # live migration: copy memory while the guest runs, round by round
    CONNECT = "connect"  # a migration's transport: run the receiver, read its banner
    CLEANUP = "cleanup"  # destroy the source / release what the operation held


class SuspendMethod(enum.StrEnum):
    """How a guest is asked to suspend (libxl's order of preference, first to last)."""

    EVENT_CHANNEL = "event-channel"  # the guest's published suspend event channel
    HARD_SHUTDOWN = "hard-shutdown"  # xc_domain_shutdown(SHUTDOWN_suspend): no cooperation
    XENSTORE = "xenstore"  # control/shutdown = "suspend", the guest acks
    ACPI_S3 = "acpi-s3"  # the guest sleeps in ACPI S3 (HVM, through its device model)


@attrs.frozen
class GuestType:
    """What a guest-type plugin says about the domains it claims.

    :param name: the guest type (``pv``, ``pvhvm``, ``hvm``, ``pvh``...).
    :param plugin: the plugin's name, for reports.
    :param xenstore_handshake: the guest answers ``control/shutdown`` (has PV drivers).
    :param event_channel: the guest may publish a suspend event channel.
    :param device_model: the domain has a QEMU device model (QMP).
    :param acpi_s3: the guest can sleep in ACPI S3.
    :param cooperative_resume: the guest's suspend hypercall can return 1 (fast resume).
    :param survives_inplace_noncooperative: a fast=0 resume *in the same domain* is
        safe.  Linux guests panic on it (register_vcpu_info EINVAL), so False for
        every built-in type; a forced one is reported for what it did.
    """

    name: str
    plugin: str
    xenstore_handshake: bool = True
    event_channel: bool = False
    device_model: bool = False
    acpi_s3: bool = False
    cooperative_resume: bool = True
    survives_inplace_noncooperative: bool = False


@attrs.frozen
class Verdict:
    """A check's answer while the orchestrator waits: done, failed, or not yet.

    :param done: the awaited state is reached.
    :param failed: the awaited state can no longer be reached; ``reason`` says why.
    :param state: the domain's state in words (``suspended``, ``S3``, ``crashed``...).
    :param reason: a shutdown reason code when the domain shut down another way.
    :param cause: for a failure, the exception that says why, if there is one (a
        guest agent's refusal: a :class:`~torpor.errors.QmpCommandError`); the
        orchestrator's error carries it as its ``cause``.
    """

    done: bool = False
    failed: bool = False
    state: str = ""
    detail: str = ""
    reason: int | None = None
    cause: BaseException | None = attrs.field(default=None, eq=False)

    @classmethod
    def ok(cls, state: str, detail: str = "") -> Verdict:
        return cls(done=True, state=state, detail=detail)

    @classmethod
    def fail(
        cls,
        state: str,
        detail: str,
        reason: int | None = None,
        *,
        cause: BaseException | None = None,
    ) -> Verdict:
        return cls(failed=True, state=state, detail=detail, reason=reason, cause=cause)

    @classmethod
    def pending(cls, state: str = "", detail: str = "") -> Verdict:
        return cls(state=state, detail=detail)


@attrs.frozen
class PhaseTiming:
    """How long one phase of an operation took, in seconds."""

    phase: Phase
    seconds: float


@attrs.frozen
class PrecopyStats:
    """What libxenguest tells a precopy policy (``struct precopy_stats``, xenguest.h).

    :param iteration: precopy rounds sent so far.
    :param total_written: pages sent in those rounds.
    :param dirty_count: pages dirtied since the last round was read, or -1
        when not known yet (the policy is asked once before the dirty log is read).
    """

    iteration: int
    total_written: int
    dirty_count: int


@attrs.frozen
class PrecopyPolicy:
    """When a live migration stops copying memory while the guest runs.

    libxenguest's default, which libxl uses (it passes no policy of its own):
    ``simple_precopy_policy`` in ``tools/libs/guest/xg_sr_save.c`` (Xen 4.17)
    -- stop and copy once fewer than ``SPP_TARGET_DIRTY_COUNT`` = 50 pages are
    dirty, or once ``SPP_MAX_ITERATIONS`` = 5 rounds have been sent.

    :param max_iterations: rounds sent while the guest runs, at most (the
        first sends every page).
    :param dirty_threshold: stop and copy once fewer pages than this are dirty.
    """

    max_iterations: int = attrs.field(default=5)
    dirty_threshold: int = attrs.field(default=50)

    @max_iterations.validator
    def _check_iterations(self, _a: object, value: int) -> None:
        if not 1 <= value <= 1000:
            raise ValueError(f"max_iterations must be 1 to 1000, not {value!r}")

    @dirty_threshold.validator
    def _check_threshold(self, _a: object, value: int) -> None:
        if not 0 <= value <= 1 << 40:
            raise ValueError(f"dirty_threshold must be 0 or more pages, not {value!r}")

    def stop_and_copy(self, stats: PrecopyStats) -> bool:
        """libxenguest's question after each round: stop and copy now (True), or go on?"""
        return (
            0 <= stats.dirty_count < self.dirty_threshold or stats.iteration >= self.max_iterations
        )

    def why_stopped(self, stats: PrecopyStats) -> str:
        """Why :meth:`stop_and_copy` said stop, in words (``converged`` or the bound)."""
        if 0 <= stats.dirty_count < self.dirty_threshold:
            return "converged"
        return "iteration bound"


@attrs.frozen
class PrecopyRound:
    """One precopy round of a live migration (the ``torpor_precopy_round`` hook).

    :param iteration: 1 for the first round (every page), then 2, 3...
    :param pages: pages sent in this round.
    :param total_pages: pages sent in all rounds so far.
    :param dirty: pages the guest dirtied while this round was sent (what the
        next round, or the stop-and-copy, must send).
    :param seconds: how long the round took.
    :param dirty_rate: ``dirty / seconds``: pages per second the guest dirties.
    """

    iteration: int
    pages: int
    total_pages: int
    dirty: int
    seconds: float
    dirty_rate: float

    def to_dict(self) -> dict[str, object]:
        return {
            "iteration": self.iteration,
            "pages": self.pages,
            "total_pages": self.total_pages,
            "dirty": self.dirty,
            "seconds": round(self.seconds, 6),
            "dirty_rate": round(self.dirty_rate, 1),
        }


@attrs.frozen
class Timeouts:
    """Every deadline torpor keeps, in seconds (libxl's and xenopsd's in comments).

    :param ack: the guest must take the xenstore request (libxl 60, xenopsd 30).
    :param suspend: the domain must shut down with reason suspend once asked
        (libxl 60, xenopsd 1200).
    :param device_model: one device-model (QMP) exchange.
    :param resume: the resumed domain must be seen running (and rebuilt).
    :param wake: an S3 guest must leave S3 after ``system_wakeup``.
    :param settle: after a *forced* in-place non-cooperative resume, how long to
        watch for the guest crashing or rebooting before calling it survived.
    """

    ack: float = 30.0
    suspend: float = 60.0
    device_model: float = 30.0
    resume: float = 30.0
    wake: float = 30.0
    settle: float = 5.0


@attrs.frozen
class Result:
    """What one operation on one domain did (frozen; ``to_dict()`` for JSON).

    :param outcome: ``suspended``, ``asleep`` (ACPI S3), ``resumed``, ``checkpointed``...
    :param state: the domain's state afterwards, in words.
    :param cooperative: for a resume, whether it was a fast (cooperative) one.
    :param details: extra facts (counts, file names), JSON-ready.
    """

    domid: int
    operation: str
    guest_type: str
    outcome: str
    state: str
    method: SuspendMethod | None = None
    cooperative: bool | None = None
    timings: tuple[PhaseTiming, ...] = ()
    details: tuple[tuple[str, object], ...] = ()

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.timings)

    def timing(self, phase: Phase) -> float | None:
        for t in self.timings:
            if t.phase == phase:
                return t.seconds
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "domid": self.domid,
            "operation": self.operation,
            "ok": True,
            "guest_type": self.guest_type,
            "outcome": self.outcome,
            "state": self.state,
            "method": None if self.method is None else str(self.method),
            "cooperative": self.cooperative,
            "seconds": round(self.seconds, 6),
            # A list, not a dict: a checkpoint or a migration goes through a
            # phase more than once, and every timing must add up to ``seconds``.
            "phases": [[str(t.phase), round(t.seconds, 6)] for t in self.timings],
            **dict(self.details),
        }

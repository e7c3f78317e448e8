"""The plugin conformance suite: mixin classes a guest-type plugin's tests subclass.

Like fsspec's ``tests/abstract`` and SQLAlchemy's ``testing/suite``, the
suite is a set of classes *without* the ``Test`` prefix; a plugin author
subclasses them in their own test module, says which guest type and plugins
are under test and what the guest type can do, and pytest runs every test::

    from torpor.testing import Capability, ConformanceSuite
    import torpor_pvh.plugin

    class TestPvhConformance(ConformanceSuite):
        guest_kind = "pvh"                 # what the simulated host builds
        plugins = [torpor_pvh.plugin]      # exactly the plugins under test
        capabilities = {Capability.XENSTORE_HANDSHAKE, Capability.COOPERATIVE_RESUME}

Every test runs on a fresh simulated host (:mod:`torpor.testing.pytest_plugin`
fixtures) with a plugin manager holding ``torpor.protocol`` and ``plugins``
only.  A test that needs a capability the guest type lacks is skipped with
the reason.  The expected outcome of each misbehaviour follows from the
suspend method the guest type uses (:func:`expected_failure`).

Stability promise: the names of the mixin classes, of their ``test_*``
methods, of :class:`Capability` members and of the class attributes above are
API.  They are only removed or renamed in a new major version of torpor;
new tests may be added in any release (a plugin that conforms to the
protocol passes them).
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import attrs
import pytest

from torpor import errors
from torpor.hookspecs import hookimpl
from torpor.model import Phase, ShutdownReason, SuspendMethod, Timeouts

__all__ = [
    "Capability",
    "CapabilitySuite",
    "CheckpointSuite",
    "ConformanceBase",
    "ConformanceSuite",
    "Expected",
    "HookSuite",
    "LeakSuite",
    "MisbehaviourSuite",
    "RefusalSuite",
    "SuspendResumeSuite",
    "expected_failure",
    "requires",
]

F = TypeVar("F", bound=Callable[..., Any])


class Capability(enum.Enum):
    """What a guest type can do; tests needing one it lacks are skipped."""

    #: The guest answers the xenstore ``control/shutdown`` handshake (PV drivers).
    XENSTORE_HANDSHAKE = "xenstore-handshake"
    #: The guest can publish a suspend event channel (XenLinux).
    EVENT_CHANNEL = "event-channel"
    #: The guest's suspend hypercall can return 1: a fast, cooperative resume.
    COOPERATIVE_RESUME = "cooperative-resume"
    #: The guest has a QEMU device model torpor stops and continues.
    DEVICE_MODEL = "device-model"
    #: The guest can sleep in ACPI S3 (through its agent) and be woken.
    ACPI_S3 = "acpi-s3"
    #: The guest can be suspended without its cooperation (hard shutdown).
    HARD_SUSPEND = "hard-suspend"
    #: A non-cooperative resume in the same domain is safe for it.
    INPLACE_NONCOOPERATIVE = "inplace-noncooperative"


def requires(*caps: Capability) -> Callable[[F], F]:
    """Skip the decorated suite test unless the guest type has every capability."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: ConformanceBase, *a: Any, **kw: Any) -> Any:
            missing = [c for c in caps if c not in self.capabilities]
            if missing:
                pytest.skip(
                    f"guest type {self.guest_kind!r} lacks " + ", ".join(c.value for c in missing)
                )
            return fn(self, *a, **kw)

        return wrapper  # type: ignore[return-value]

    return deco


@attrs.frozen
class Expected:
    """What a misbehaving guest's suspend must end in.

    :param error: the OperationError subclass raised (``None``: the suspend succeeds).
    :param state: ``err.state`` -- what the domain was left in.
    :param phase: the phase named by the error.
    """

    error: type[errors.OperationError] | None
    state: str
    phase: Phase | None = None


def expected_failure(misbehaviour: str, method: SuspendMethod) -> Expected:
    """The protocol's answer to a misbehaviour, by the suspend method in use.

    xenstore handshake: a request nobody takes is cancelled (AckTimeout, the
    guest left running); an ack without a suspend is a SuspendTimeout.  ACPI S3
    through an agent: there is no ack, so a guest that never sleeps is a
    SuspendTimeout; an agent that refuses is an OperationError at once.  Any
    method: a crash is UnexpectedShutdown, a vanished domain DomainVanished.
    """
    if misbehaviour == "crash_during_suspend":
        return Expected(errors.UnexpectedShutdown, "crashed", Phase.SHUTDOWN)
    if misbehaviour == "vanish":
        return Expected(errors.DomainVanished, "gone")
    if method == SuspendMethod.XENSTORE:
        if misbehaviour in ("never_ack", "unknown_command", "lose_xenstore", "slow_ack"):
            return Expected(errors.AckTimeout, "running", Phase.ACK)
        if misbehaviour == "ack_then_hang":
            return Expected(errors.SuspendTimeout, "running", Phase.SHUTDOWN)
    if method == SuspendMethod.ACPI_S3:
        if misbehaviour in ("never_ack", "ack_then_hang", "slow_ack"):
            return Expected(errors.SuspendTimeout, "running", Phase.SHUTDOWN)
        if misbehaviour == "unknown_command":
            return Expected(errors.OperationError, "running", Phase.SHUTDOWN)
        if misbehaviour == "lose_xenstore":  # no agent: the hard suspend needs none
            return Expected(None, "suspended")
    if method == SuspendMethod.HARD_SHUTDOWN:
        return Expected(None, "suspended")  # no cooperation to withhold
    if method == SuspendMethod.EVENT_CHANNEL:
        # No xenstore ack to withhold: the channel's interrupt suspends the guest.
        if misbehaviour in ("never_ack", "unknown_command", "lose_xenstore", "slow_ack"):
            return Expected(None, "suspended")
        if misbehaviour == "ack_then_hang":
            return Expected(errors.SuspendTimeout, "running", Phase.SHUTDOWN)
    raise ValueError(f"no expectation for {misbehaviour!r} with method {method}")


class ConformanceBase:
    """What every suite class needs; set these in your subclass.

    :cvar guest_kind: the guest type the simulated host builds (``pv``, ``pvh``...).
    :cvar plugins: the plugins under test (modules or objects); only these and
        :mod:`torpor.protocol` are registered.
    :cvar capabilities: what the guest type can do.
    :cvar suspend_method: how the guest type is asked to suspend by default.
    :cvar ack_timeout: / :cvar suspend_timeout: short deadlines for the failure tests.
    :cvar use_qemu: HVM device models on real QEMU (``None``: when installed), read
        by the ``torpor_sim_host`` fixture.
    """

    guest_kind: ClassVar[str] = ""
    plugins: ClassVar[Sequence[object]] = ()
    capabilities: ClassVar[Iterable[Capability]] = frozenset()
    suspend_method: ClassVar[SuspendMethod] = SuspendMethod.XENSTORE
    ack_timeout: ClassVar[float] = 0.3
    suspend_timeout: ClassVar[float] = 0.6
    use_qemu: ClassVar[bool | None] = None

    # helpers ------------------------------------------------------------------

    @staticmethod
    def report(host: Any, domid: int) -> dict[str, Any]:
        """The simulated guest's counters, checksum and kernel log."""
        result: dict[str, Any] = host.run(host.guest_report(domid))
        return result

    def timeouts(self) -> Timeouts:
        return Timeouts(ack=self.ack_timeout, suspend=self.suspend_timeout, resume=10.0)


class SuspendResumeSuite(ConformanceBase):
    """The suspend/resume cycle, both ways."""

    def test_classified_as_its_guest_type(self, torpor_guest: Any, torpor_client: Any) -> None:
        rows = {r["domid"]: r for r in torpor_client.list_domains()}
        assert rows[torpor_guest]["guest_type"] == self.guest_kind

    def test_suspend_then_cooperative_resume(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        before = self.report(torpor_sim_host, torpor_guest)
        res = torpor_client.suspend(torpor_guest)
        assert res.outcome in ("suspended", "asleep")
        assert res.method == self.suspend_method
        assert res.guest_type == self.guest_kind
        frozen = self.report(torpor_sim_host, torpor_guest)
        assert frozen["state"] in ("suspended", "S3")
        res = torpor_client.resume(torpor_guest)
        assert res.outcome == "resumed" and res.state == "running"
        after = self.report(torpor_sim_host, torpor_guest)
        assert after["counters"]["boots"] == before["counters"]["boots"], "guest rebooted"
        assert after["counters"]["ticks"] >= frozen["counters"]["ticks"]
        assert after["checksum_at_resume"] == frozen["checksum"], "memory changed"

    @requires(Capability.COOPERATIVE_RESUME)
    def test_resume_is_cooperative_by_default(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        torpor_client.suspend(torpor_guest)
        res = torpor_client.resume(torpor_guest)
        if res.cooperative is not None:  # S3 wake: no hypercall to return from
            assert res.cooperative is True
            assert self.report(torpor_sim_host, torpor_guest)["last_hypercall_return"] == 1

    def test_inplace_noncooperative_resume_refused_unless_safe(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        res = torpor_client.suspend(torpor_guest)
        if res.state != "suspended":
            pytest.skip("the guest sleeps in S3: there is no hypercall to resume from")
        if Capability.INPLACE_NONCOOPERATIVE in set(self.capabilities):
            assert torpor_client.resume(torpor_guest, cooperative=False).outcome == "resumed"
            return
        with pytest.raises(errors.UnsafeResume) as e:
            torpor_client.resume(torpor_guest, cooperative=False)
        assert e.value.state == "suspended"
        info = torpor_sim_host.xen.domain_info(torpor_guest)
        assert info.suspended, "a refused resume must touch nothing"
        torpor_client.resume(torpor_guest)

    def test_forced_inplace_noncooperative_resume_reports_truthfully(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        res = torpor_client.suspend(torpor_guest)
        if res.state != "suspended":
            pytest.skip("the guest sleeps in S3: there is no hypercall to resume from")
        try:
            out = torpor_client.resume(torpor_guest, cooperative=False, force=True)
        except errors.ResumeFailed as e:
            info = torpor_sim_host.xen.domain_info(torpor_guest)
            assert info.shutdown and info.shutdown_reason != ShutdownReason.SUSPEND
            assert e.state == info.state_word()
        else:
            assert out.state == "running"
            assert torpor_sim_host.xen.domain_info(torpor_guest).running


class CapabilitySuite(ConformanceBase):
    """What each declared capability promises, checked on the guest type."""

    @requires(Capability.EVENT_CHANNEL)
    def test_suspend_through_event_channel(
        self, torpor_sim_host: Any, torpor_guest_factory: Any, torpor_client: Any
    ) -> None:
        domid = torpor_guest_factory(suspend_evtchn=True)
        res = torpor_client.suspend(domid)
        assert res.method == SuspendMethod.EVENT_CHANNEL
        assert Phase.ACK not in [t.phase for t in res.timings], "no ack on this path"
        assert torpor_sim_host.xen.domain_info(domid).suspended
        torpor_client.resume(domid)
        assert torpor_sim_host.xen.domain_info(domid).running

    @requires(Capability.DEVICE_MODEL)
    def test_device_model_follows_the_guest(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        res = torpor_client.suspend(torpor_guest)
        expected = "suspended" if res.state == "S3" else "paused"
        assert _qmp_status(torpor_sim_host, torpor_guest) == expected
        torpor_client.resume(torpor_guest)
        assert _qmp_status(torpor_sim_host, torpor_guest) == "running"

    @requires(Capability.ACPI_S3)
    def test_sleeps_in_s3_and_wakes(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        from torpor.model import HVM_PARAM_ACPI_S_STATE

        res = torpor_client.suspend(torpor_guest)
        assert (res.method, res.state) == (SuspendMethod.ACPI_S3, "S3")
        xen = torpor_sim_host.xen
        assert xen.get_hvm_param(torpor_guest, HVM_PARAM_ACPI_S_STATE) == 3
        info = xen.domain_info(torpor_guest)
        assert not info.shutdown and not info.paused, "S3 is neither shut down nor paused"
        res = torpor_client.resume(torpor_guest)
        assert dict(res.details).get("woke_from_s3") is True
        assert xen.get_hvm_param(torpor_guest, HVM_PARAM_ACPI_S_STATE) == 0

    @requires(Capability.HARD_SUSPEND)
    def test_hard_suspend_without_cooperation(
        self, torpor_sim_host: Any, torpor_guest_factory: Any, torpor_client: Any
    ) -> None:
        domid = torpor_guest_factory(agent=False)
        res = torpor_client.suspend(domid)
        assert (res.method, res.state) == (SuspendMethod.HARD_SHUTDOWN, "suspended")
        torpor_client.resume(domid)
        assert torpor_sim_host.xen.domain_info(domid).running


def _qmp_status(host: Any, domid: int) -> str:
    import asyncio

    from torpor.qmp import QmpClient

    async def status() -> str:
        client = QmpClient(domid=domid, name="conformance")
        await client.connect(host.qmp_socket(domid), timeout=10)
        try:
            return await client.query_status(timeout=10)
        finally:
            await client.close()

    return asyncio.run(status())


class CheckpointSuite(ConformanceBase):
    """Checkpoints: suspend, the caller's callback, cooperative resume."""

    @requires(Capability.COOPERATIVE_RESUME)
    def test_checkpoint_repeatedly(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        before = self.report(torpor_sim_host, torpor_guest)["counters"]
        seen: list[str] = []
        for _ in range(3):
            res = torpor_client.checkpoint(
                torpor_guest,
                lambda r: seen.append(self.report(torpor_sim_host, torpor_guest)["state"]),
            )
            assert res.outcome == "checkpointed"
        assert set(seen) <= {"suspended", "S3"} and len(seen) == 3
        after = self.report(torpor_sim_host, torpor_guest)["counters"]
        assert after["boots"] == before["boots"]

    @requires(Capability.COOPERATIVE_RESUME)
    def test_checkpoint_resumes_even_if_callback_fails(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        def boom(_r: Any) -> None:
            raise RuntimeError("callback failed on purpose")

        with pytest.raises(errors.OperationError) as e:
            torpor_client.checkpoint(torpor_guest, boom)
        assert e.value.phase == Phase.CALLBACK and e.value.state == "running"
        assert torpor_sim_host.xen.domain_info(torpor_guest).running


class MisbehaviourSuite(ConformanceBase):
    """Every misbehaviour: the specific error, in its deadline, the guest as documented."""

    def _misbehave(self, factory: Any, host: Any, client_for: Any, name: str) -> None:
        expected = expected_failure(name.partition("=")[0], self.suspend_method)
        domid = factory(name)
        client = client_for(self.timeouts())
        if expected.error is None:
            assert client.suspend(domid).state == expected.state
            client.resume(domid)
            return
        with pytest.raises(expected.error) as e:
            client.suspend(domid)
        err = e.value
        assert type(err) is expected.error or expected.error is errors.OperationError
        assert err.domid == domid
        assert err.state == expected.state, f"{name}: left {err.state}, expected {expected.state}"
        if expected.phase is not None:
            assert err.phase == expected.phase
        if expected.state == "running":
            assert host.xen.domain_info(domid).running
            xs = host.toolstack_host().xenstore
            try:  # no request is left behind
                assert xs.read_or(f"/local/domain/{domid}/control/shutdown", "") == ""
            finally:
                xs.close()

    def test_never_ack(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "never_ack")

    def test_ack_then_hang(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(
            torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "ack_then_hang"
        )

    def test_slow_ack_past_deadline(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "slow_ack=5")

    def test_slow_ack_within_deadline(
        self, torpor_misbehaving_guest: Any, torpor_client_with: Any
    ) -> None:
        domid = torpor_misbehaving_guest("slow_ack=0.1")
        client = torpor_client_with(Timeouts(ack=10, suspend=10))
        assert client.suspend(domid).state in ("suspended", "S3")
        client.resume(domid)

    def test_unknown_command(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(
            torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "unknown_command"
        )

    def test_crash_during_suspend(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(
            torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "crash_during_suspend"
        )

    def test_vanish(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "vanish")

    def test_lose_xenstore(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(
            torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "lose_xenstore"
        )

    @requires(Capability.XENSTORE_HANDSHAKE)
    def test_paused_guest_times_out_and_stays_paused(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client_with: Any
    ) -> None:
        torpor_sim_host.xen.pause(torpor_guest)
        client = torpor_client_with(self.timeouts())
        with pytest.raises(errors.AckTimeout) as e:
            client.suspend(torpor_guest)
        assert e.value.state == "paused"
        torpor_sim_host.xen.unpause(torpor_guest)
        assert torpor_sim_host.xen.domain_info(torpor_guest).running


class RefusalSuite(ConformanceBase):
    """Refusals touch nothing, and stay the same when repeated."""

    def test_double_suspend_refused(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        first = torpor_client.suspend(torpor_guest)
        if first.state == "S3":
            # libxl's rule: a guest already asleep is suspended the hard way.
            deeper = torpor_client.suspend(torpor_guest)
            assert deeper.method == SuspendMethod.HARD_SHUTDOWN
            assert deeper.state == "suspended"
        for _ in range(2):
            with pytest.raises(errors.AlreadySuspended) as e:
                torpor_client.suspend(torpor_guest)
            assert e.value.phase == Phase.VALIDATE and e.value.state == "suspended"
        assert torpor_sim_host.xen.domain_info(torpor_guest).suspended
        res = torpor_client.resume(torpor_guest)
        assert res.state == "running"
        assert self.report(torpor_sim_host, torpor_guest)["state"] == "running"

    def test_resume_of_running_refused(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        calls = dict(torpor_sim_host.xen.calls)
        for _ in range(2):
            with pytest.raises(errors.NotSuspended) as e:
                torpor_client.resume(torpor_guest)
            assert e.value.state == "running" and e.value.phase == Phase.VALIDATE
        assert torpor_sim_host.xen.calls.get("resume") == calls.get("resume")

    def test_concurrent_operation_is_busy(
        self, torpor_sim_host: Any, torpor_misbehaving_guest: Any, torpor_client: Any
    ) -> None:
        domid = torpor_misbehaving_guest("slow_ack=0.3")
        errors_seen: list[BaseException] = []
        started = threading.Event()

        def first() -> None:
            started.set()
            try:
                torpor_client.suspend(domid)
            except errors.TorporError as e:  # pragma: no cover - reported below
                errors_seen.append(e)

        th = threading.Thread(target=first)
        th.start()
        started.wait()
        busy = False
        while th.is_alive() and not busy:
            try:
                torpor_client.suspend(domid)
            except errors.DomainBusy:
                busy = True
            except errors.InvalidState:
                break
        th.join()
        assert busy and not errors_seen
        torpor_client.resume(domid)


class HookSuite(ConformanceBase):
    """The plugin's hooks run in protocol order; notifications come exactly once."""

    def test_hook_order_and_exactly_once_notifications(
        self, torpor_guest: Any, torpor_client_with: Any
    ) -> None:
        events: list[str] = []

        class Recorder:
            @hookimpl
            def torpor_before_suspend(self, ctx: Any) -> None:
                events.append("before_suspend")

            @hookimpl
            def torpor_after_suspend(self, ctx: Any, result: Any) -> None:
                events.append("after_suspend")

            @hookimpl
            def torpor_before_resume(self, ctx: Any) -> None:
                events.append("before_resume")

            @hookimpl
            def torpor_after_resume(self, ctx: Any, result: Any) -> None:
                events.append("after_resume")

            @hookimpl
            def torpor_phase_started(self, ctx: Any, phase: Any) -> None:
                events.append(f"+{phase}")

            @hookimpl
            def torpor_phase_finished(
                self, ctx: Any, phase: Any, seconds: float, error: Any
            ) -> None:
                events.append(f"-{phase}")

        client = torpor_client_with(None, extra_plugins=[Recorder()])
        client.suspend(torpor_guest)
        client.resume(torpor_guest)
        assert events.count("before_suspend") == events.count("after_suspend") == 1
        assert events.count("before_resume") == events.count("after_resume") == 1
        assert events.index("after_suspend") < events.index("before_resume")
        starts = [e[1:] for e in events if e.startswith("+")]
        ends = [e[1:] for e in events if e.startswith("-")]
        assert starts == ends, "every phase ends exactly once, in order"
        suspend_phases = starts[: starts.index("validate", 1)]
        assert suspend_phases[0] == "validate" and "request" in suspend_phases
        resume_phases = starts[starts.index("validate", 1) :]
        assert resume_phases[-1] == "verify"


class LeakSuite(ConformanceBase):
    """Nothing is left behind: watches, threads, file descriptors."""

    def test_no_leaked_watches_threads_or_fds(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client_with: Any
    ) -> None:
        import os

        def resources() -> tuple[int, int]:
            return threading.active_count(), len(os.listdir("/proc/self/fd"))

        xenstored = torpor_sim_host.xenstored

        def settled(conns: int) -> None:
            # The simulated xenstored lives in this process: wait until it has
            # seen closed clients hang up, so their server ends are not counted.
            torpor_sim_host.run(
                xenstored.wait_until(lambda: xenstored.connection_count() <= conns, timeout=5)
            )

        warm = torpor_client_with(None)
        warm.suspend(torpor_guest)  # let the guest settle (frontends, first watches)
        warm.resume(torpor_guest)
        conns = xenstored.connection_count() - 1
        warm.close()
        settled(conns)
        base = resources()
        for _ in range(3):
            client = torpor_client_with(None)
            xs = client.host.xenstore
            for _ in range(2):
                client.suspend(torpor_guest)
                client.resume(torpor_guest)
            # Only the orchestrator's standing @releaseDomain watch remains.
            assert xs.watch_count() == 1, f"{xs.watch_count()} watches left on the connection"
            client.close()
            assert xs.watch_count() == 0
            settled(conns)
        after = resources()
        # Fewer is fine (a connection of the warm-up closing late); more is a leak.
        assert after[0] <= base[0] and after[1] <= base[1], (
            f"(threads, fds) went from {base} to {after}"
        )


class ConformanceSuite(
    SuspendResumeSuite,
    CapabilitySuite,
    CheckpointSuite,
    MisbehaviourSuite,
    RefusalSuite,
    HookSuite,
    LeakSuite,
):
    """Every conformance test.  Subclass it as ``Test<YourGuestType>Conformance``."""

"""The orchestrator on the simulated host, PV guests: every path of the state machine."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from typing import Any

import pytest

from torpor import hookimpl
from torpor.errors import (
    AckTimeout,
    AlreadySuspended,
    DomainBusy,
    DomainVanished,
    NoSuchDomain,
    NotSuspended,
    OperationError,
    ResumeFailed,
    SuspendTimeout,
    UnexpectedShutdown,
    UnsafeResume,
    UnsupportedGuest,
    UsageError,
)
from torpor.facade import Torpor
from torpor.model import Phase, ShutdownReason, SuspendMethod, Timeouts
from torpor.plugins import get_plugin_manager
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost


def report(host: SimHost, domid: int) -> dict[str, Any]:
    return host.run(host.guest_report(domid))


def shutdown_node(host: SimHost, domid: int) -> str | None:
    xs = host.toolstack_host().xenstore
    try:
        return xs.read_or(f"/local/domain/{domid}/control/shutdown", None)
    finally:
        xs.close()


def test_xenstore_suspend_then_cooperative_resume(sim_host: SimHost, torpor: Torpor) -> None:
    dom = sim_host.create_guest("pv")
    before = report(sim_host, dom)["counters"]
    res = torpor.suspend(dom)
    assert (res.outcome, res.state, res.method) == (
        "suspended",
        "suspended",
        SuspendMethod.XENSTORE,
    )
    assert [t.phase for t in res.timings] == [
        Phase.VALIDATE,
        Phase.REQUEST,
        Phase.ACK,
        Phase.SHUTDOWN,
    ]
    info = sim_host.xen.domain_info(dom)
    assert info.shutdown_reason == ShutdownReason.SUSPEND
    frozen = report(sim_host, dom)
    # PV: start_info's store/console frames are PFNs while suspended, edx = start_info MFN.
    d = sim_host.xen.domain(dom)
    assert d.start_info is not None and d.start_info.frames_are_pfns
    assert sim_host.xen.vcpu(dom).edx == d.start_info_mfn
    res = torpor.resume(dom)
    assert (res.outcome, res.cooperative, res.state) == ("resumed", True, "running")
    after = report(sim_host, dom)
    assert after["last_hypercall_return"] == 1
    assert after["checksum_at_resume"] == frozen["checksum"]  # memory untouched
    assert after["counters"]["boots"] == before["boots"] == 1
    assert after["counters"]["cooperative_resumes"] == 1
    assert after["counters"]["ticks"] >= frozen["counters"]["ticks"] >= before["ticks"]
    assert not d.start_info.frames_are_pfns  # the guest rewrote them back to MFNs
    assert shutdown_node(sim_host, dom) == ""


def test_event_channel_suspend_skips_release_domain(sim_host: SimHost, torpor: Torpor) -> None:
    dom = sim_host.create_guest("pv", behaviour=Behaviour(suspend_evtchn=True))
    res = torpor.suspend(dom)
    assert res.method == SuspendMethod.EVENT_CHANNEL
    assert Phase.ACK not in [t.phase for t in res.timings]
    # Xen signalled the subscribed channel instead of VIRQ_DOM_EXC: xenstored never latched.
    assert not sim_host.run(_latched(sim_host, dom))
    assert shutdown_node(sim_host, dom) == ""  # no xenstore request was written
    assert sim_host.xen.domain(dom).suspend_evtchn == 0  # unsubscribed afterwards
    torpor.resume(dom)
    assert report(sim_host, dom)["counters"]["cooperative_resumes"] == 1


async def _latched(host: SimHost, domid: int) -> bool:
    assert host.xenstored is not None
    return host.xenstored.is_latched(domid)


def test_second_suspend_and_resume_of_running_are_refused_untouched(
    sim_host: SimHost, torpor: Torpor
) -> None:
    dom = sim_host.create_guest("pv")
    with pytest.raises(NotSuspended) as e:
        torpor.resume(dom)
    assert (e.value.domid, e.value.phase, e.value.state) == (dom, Phase.VALIDATE, "running")
    assert sim_host.xen.calls.get("resume", 0) == 0
    torpor.suspend(dom)
    calls = dict(sim_host.xen.calls)
    with pytest.raises(AlreadySuspended):
        torpor.suspend(dom)
    assert sim_host.xen.calls.get("shutdown") == calls.get("shutdown")
    assert shutdown_node(sim_host, dom) == ""


def test_inplace_noncooperative_resume_refused_then_forced_crashes_pv(
    sim_host: SimHost, torpor: Torpor
) -> None:
    dom = sim_host.create_guest("pv")
    torpor.suspend(dom)
    with pytest.raises(UnsafeResume, match="register their vcpu_info"):
        torpor.resume(dom, cooperative=False)
    assert sim_host.xen.domain_info(dom).suspended  # nothing touched
    with pytest.raises(ResumeFailed) as e:
        torpor.resume(dom, cooperative=False, force=True)
    assert e.value.state == "crashed"
    assert sim_host.xen.domain_info(dom).shutdown_reason == ShutdownReason.CRASH
    assert "register_vcpu_info failed: err=-22" in " ".join(report(sim_host, dom)["log"])


@pytest.mark.parametrize(
    ("misbehaviour", "error", "state"),
    [
        ("never_ack", AckTimeout, "running"),
        ("unknown_command", AckTimeout, "running"),
        ("lose_xenstore", AckTimeout, "running"),
        ("slow_ack=5", AckTimeout, "running"),
        ("ack_then_hang", SuspendTimeout, "running"),
        ("crash_during_suspend", UnexpectedShutdown, "crashed"),
        ("vanish", DomainVanished, "gone"),
    ],
)
def test_misbehaving_pv_guest(
    sim_host: SimHost, misbehaviour: str, error: type[OperationError], state: str
) -> None:
    dom = sim_host.create_guest("pv", behaviour=Behaviour.parse(misbehaviour))
    t = Torpor(sim_host.toolstack_host(), own_host=True, timeouts=Timeouts(ack=0.3, suspend=0.5))
    try:
        with pytest.raises(error) as e:
            t.suspend(dom)
    finally:
        t.close()
    assert e.value.domid == dom
    assert e.value.state == state
    if state == "running":
        assert sim_host.xen.domain_info(dom).running
        # The request never stays behind: cancelled, or acked.
        assert shutdown_node(sim_host, dom) == ""
        if error is AckTimeout:
            assert e.value.phase == Phase.ACK
    if misbehaviour == "crash_during_suspend":
        assert isinstance(e.value, UnexpectedShutdown)
        assert e.value.reason == ShutdownReason.CRASH
    if misbehaviour == "ack_then_hang":
        assert "failed to freeze" in str(e.value)


def test_slow_ack_within_the_deadline_succeeds(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv", behaviour=Behaviour.parse("slow_ack=0.2"))
    with Torpor(sim_host.toolstack_host(), own_host=True, timeouts=Timeouts(ack=5)) as t:
        assert t.suspend(dom).outcome == "suspended"
        t.resume(dom)


def test_paused_guest_never_acks_and_stays_paused(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv")
    sim_host.xen.pause(dom)
    with Torpor(sim_host.toolstack_host(), own_host=True, timeouts=Timeouts(ack=0.2)) as t:
        with pytest.raises(AckTimeout) as e:
            t.suspend(dom)
    assert e.value.state == "paused"
    assert shutdown_node(sim_host, dom) == ""
    sim_host.xen.unpause(dom)  # writing "" and unpausing leaves it running normally
    assert sim_host.xen.domain_info(dom).running


def test_cancel_sees_a_last_moment_ack(sim_host: SimHost) -> None:
    """The transactional cancel re-reads: an ack that raced the deadline wins."""
    dom = sim_host.create_guest("pv", behaviour=Behaviour.parse("never_ack"))

    class ActAsGuest:
        """At the cancel, the 'guest' acks and suspends just before torpor looks."""

        @hookimpl
        def torpor_phase_started(self, ctx: Any, phase: Phase) -> None:
            if phase == Phase.CANCEL:
                xs = sim_host.toolstack_host().xenstore
                xs.write(f"/local/domain/{ctx.domid}/control/shutdown", "")
                xs.close()
                sim_host.xen.shutdown(ctx.domid, ShutdownReason.SUSPEND)

    pm = get_plugin_manager(plugins=[ActAsGuest()])
    with Torpor(
        sim_host.toolstack_host(), own_host=True, plugin_manager=pm, timeouts=Timeouts(ack=0.2)
    ) as t:
        res = t.suspend(dom)
    assert res.outcome == "suspended"
    assert Phase.CANCEL in [p.phase for p in res.timings]


def test_busy_in_process_and_across_processes(sim_host: SimHost, torpor: Torpor) -> None:
    dom = sim_host.create_guest("pv", behaviour=Behaviour.parse("slow_ack=0.3"))
    errors: list[BaseException] = []
    started = threading.Event()

    def first() -> None:
        started.set()
        torpor.suspend(dom)

    th = threading.Thread(target=first)
    th.start()
    started.wait()
    # Wait until the first suspend holds the domain (its lock file names it).
    lock = os.path.join(sim_host.toolstack_host().lock_dir, f"domain-{dom}.lock")
    with pytest.raises(DomainBusy, match=r"in progress|busy"):
        while True:
            try:
                torpor.suspend(dom)
            except DomainBusy:
                raise
            except (AlreadySuspended, NotSuspended) as e:  # pragma: no cover - lost the race
                errors.append(e)
                break
    th.join()
    assert not errors
    torpor.resume(dom)
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another toolstack process holds the domain
    try:
        with pytest.raises(DomainBusy, match="busy"):
            torpor.suspend(dom)
    finally:
        os.close(fd)


def test_no_such_domain_and_bad_domids(torpor: Torpor) -> None:
    with pytest.raises(NoSuchDomain):
        torpor.suspend(77)
    for bad in (0, -1, 0x7FF0, "3; rm -rf /", True):
        with pytest.raises(UsageError):
            torpor.suspend(bad)  # type: ignore[arg-type]


def test_unsupported_guest_when_no_plugin_claims_it(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv")
    pm = get_plugin_manager(autoload=False)
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(UnsupportedGuest, match="no torpor plugin claims"):
            t.suspend(dom)


def test_hypervisor_error_on_resume_leaves_domain_suspended(
    sim_host: SimHost, torpor: Torpor
) -> None:
    dom = sim_host.create_guest("pv")
    torpor.suspend(dom)
    sim_host.xen.fail_ops["resume"] = errno.EIO
    try:
        with pytest.raises(ResumeFailed) as e:
            torpor.resume(dom)
    finally:
        del sim_host.xen.fail_ops["resume"]
    assert e.value.state == "suspended" and e.value.phase == Phase.RESUME
    torpor.resume(dom)


def test_checkpoint_runs_callback_while_suspended(sim_host: SimHost, torpor: Torpor) -> None:
    dom = sim_host.create_guest("pv")
    seen: list[bool] = []
    res = torpor.checkpoint(dom, lambda r: seen.append(sim_host.xen.domain_info(dom).suspended))
    assert seen == [True] and res.outcome == "checkpointed"
    with pytest.raises(OperationError, match="callback failed") as e:
        torpor.checkpoint(dom, lambda r: 1 / 0)
    assert e.value.phase == Phase.CALLBACK and e.value.state == "running"
    assert sim_host.xen.domain_info(dom).running
    assert report(sim_host, dom)["counters"]["cooperative_resumes"] == 2


def test_a_checkpoint_session_reads_the_suspend_event_channel_node_once(
    sim_host: SimHost, torpor: Torpor
) -> None:
    """As libxl sets the suspend event channel up once per save, not per
    checkpoint: a guest without one is asked once a session, and separate
    checkpoint() calls ask each time."""
    from torpor.xenstore import Op, Xenstore

    dom = sim_host.create_guest("pv")
    node = f"/local/domain/{dom}/device/suspend/event-channel"
    reads: list[str] = []
    submit = Xenstore._submit

    def counted(self: Xenstore, op: Any, payload: bytes, *a: Any, **k: Any) -> None:
        if op == Op.READ and payload.rstrip(b"\0").decode() == node:
            reads.append(node)
        submit(self, op, payload, *a, **k)

    Xenstore._submit = counted  # type: ignore[method-assign]
    try:
        results = torpor.checkpoints(dom, 5)
        assert [r.method for r in results] == [SuspendMethod.XENSTORE] * 5
        assert len(reads) == 1
        torpor.checkpoint(dom)
        torpor.checkpoint(dom)
        assert len(reads) == 3
    finally:
        Xenstore._submit = submit  # type: ignore[method-assign]


def test_bulk_suspend_and_resume(sim_host: SimHost, torpor: Torpor) -> None:
    doms = [sim_host.create_guest("pv", behaviour=Behaviour(freeze_time=0.05)) for _ in range(12)]
    bad = sim_host.create_guest("pv", behaviour=Behaviour.parse("crash_during_suspend"))
    results = torpor.suspend_many([*doms, bad])
    assert [r.outcome for r in results[:-1]] == ["suspended"] * 12  # type: ignore[union-attr]
    assert isinstance(results[-1], UnexpectedShutdown)
    results = torpor.resume_many(doms)
    assert all(r.outcome == "resumed" for r in results)  # type: ignore[union-attr]


def test_hooks_fire_in_order_exactly_once(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv")
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
        def torpor_phase_started(self, ctx: Any, phase: Phase) -> None:
            events.append(f"+{phase}")

        @hookimpl
        def torpor_phase_finished(self, ctx: Any, phase: Phase, seconds: float, error: Any) -> None:
            events.append(f"-{phase}")

        @hookimpl
        def torpor_operation_failed(self, ctx: Any, error: Any) -> None:
            events.append(f"failed:{type(error).__name__}")

    pm = get_plugin_manager(plugins=[Recorder()])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        t.suspend(dom)
        t.resume(dom)
        with pytest.raises(NotSuspended):
            t.resume(dom)
    assert events == [
        "+validate",
        "-validate",
        "before_suspend",
        "+request",
        "-request",
        "+ack",
        "-ack",
        "+shutdown",
        "-shutdown",
        "after_suspend",
        "+validate",
        "-validate",
        "before_resume",
        "+resume",
        "-resume",
        "+xs-resume",
        "-xs-resume",
        "+guest-resume",
        "-guest-resume",
        "+verify",
        "-verify",
        "after_resume",
        "+validate",
        "-validate",
        "failed:NotSuspended",
    ]


def test_no_leaked_watches_threads_or_fds(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv", behaviour=Behaviour(suspend_evtchn=True))
    dom2 = sim_host.create_guest("pv", behaviour=Behaviour.parse("never_ack"))
    assert sim_host.xenstored is not None
    base_watches = len(sim_host.run(_watches(sim_host)))
    threads = threading.active_count()
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with Torpor(sim_host.toolstack_host(), own_host=True, timeouts=Timeouts(ack=0.05)) as t:
            t.checkpoint(dom)
            with pytest.raises(AckTimeout):
                t.suspend(dom2)
    assert len(sim_host.run(_watches(sim_host))) == base_watches
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds


async def _watches(host: SimHost) -> list[Any]:
    assert host.xenstored is not None
    return [w for w in host.xenstored.watches() if w.domid == 0 and w.conn_id != 0]


def test_repeated_suspends_of_a_slow_freezer_are_each_noticed(sim_host: SimHost) -> None:
    """A resume changes a domain without @releaseDomain; the next suspend must still wake us.

    (Regression: the domain monitor compared flags with what it saw at the
    previous suspend and slept through the second one.)
    """
    dom = sim_host.create_guest("pv", behaviour=Behaviour(freeze_time=0.05))
    with Torpor(sim_host.toolstack_host(), own_host=True, timeouts=Timeouts(suspend=5)) as t:
        for _ in range(3):
            assert t.suspend(dom).state == "suspended"
            t.resume(dom)

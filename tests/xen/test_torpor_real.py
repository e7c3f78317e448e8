"""torpor itself on a real Xen 4.17 hypervisor (issue 5 item 3, issue 6).

torpor's real backend (``Host.xen()``: libxenctrl/libxenguest through cffi,
pyxs on dom0's C xenstored, qemu-xen's QMP, the guest agent), its public API
(``torpor.Torpor``) and its CLI (the ``torpor`` entry point the lab puts on
dom0's PATH, ``--host xen --json``) against the lab's real guests.  What
torpor claims is checked against the lab's own witnesses, which do not use
torpor (tests/xen/xenlab.py): the guest's counter on its console (a resumed
guest counts on, a rebooted one starts again at n=1, and it boots once),
libxenctrl's raw domain flags and shutdown reason, HVM params, xenstore read
on a separate connection, and qemu-xen's QMP.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import xenlab
from xenlab import (
    HVM_PARAM_ACPI_S_STATE,
    SHUTDOWN_CRASH,
    SHUTDOWN_REBOOT,
    SHUTDOWN_SUSPEND,
    sh,
)

from torpor import Host, Torpor
from torpor.errors import (
    AckTimeout,
    AlreadySuspended,
    NotSuspended,
    UnsafeResume,
)
from torpor.intent import read_record
from torpor.model import Phase, SuspendMethod

MakeGuest = Callable[..., xenlab.Guest]

#: What a *forced* in-place non-cooperative resume (xc_domain_resume fast=0 in
#: the same domain) does to each kind of Linux guest on this Xen: the kernel
#: re-registers vcpu_info, Xen refuses (EINVAL), Linux panics ("register_vcpu_info
#: failed: cpu=0 err=-22") at once.  PV and PVH kernels end their panic with
#: SCHEDOP_shutdown(crash); a PVHVM one reboots (docs/real-xen.md; PVH seen
#: here first).  The lab's guests are kept (on_crash/on_reboot "preserve"), so
#: torpor sees the shutdown reason rather than a vanished domain.
FORCED_OUTCOME = {
    "pv": ("crashed", SHUTDOWN_CRASH),
    "pvh": ("crashed", SHUTDOWN_CRASH),
    "pvhvm": ("rebooted", SHUTDOWN_REBOOT),
}


@pytest.fixture
def torpor() -> Iterator[Torpor]:
    """torpor's public API on this dom0 (its real backend)."""
    with Torpor(Host.xen(), own_host=True) as t:
        yield t


def torpor_cli(*args: str, timeout: float = 600) -> tuple[int, list[dict[str, Any]], str]:
    """Run dom0's ``torpor --host xen --json ARGS``: (exit code, JSON lines, stderr)."""
    exe = shutil.which("torpor")
    assert exe, "the lab puts a `torpor` entry-point wrapper on dom0's PATH"
    r = subprocess.run(
        [exe, "--host", "xen", "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        out = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise AssertionError(f"torpor {' '.join(args)}: not JSON lines: {r.stdout!r}") from e
    print(f"$ torpor {' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r.returncode, out, r.stderr


def info(xc: xenlab.XenCtrl, domid: int) -> xenlab.DomInfo:
    i = xc.info(domid)
    assert i is not None, f"domain {domid} vanished"
    return i


def assert_suspended(xc: xenlab.XenCtrl, domid: int) -> None:
    i = info(xc, domid)
    assert i.shutdown and i.shutdown_reason == SHUTDOWN_SUSPEND, i


def assert_kept_running(
    g: xenlab.Guest, xc: xenlab.XenCtrl, before: xenlab.Tick, timeout: float = 120
) -> xenlab.Tick:
    """The guest runs on from where it was: same domain, counter and uptime go on."""
    after = g.wait_tick(after=before.n, timeout=timeout)
    assert after.uptime > before.uptime, (before, after)
    assert g.console().count("TORPOR-GUEST boot") == 1, "the guest booted again"
    i = info(xc, g.domid)
    assert not i.shutdown and not i.paused and not i.dying, i
    assert sh("xl", "domid", g.name).strip() == str(g.domid)
    return after


def releases_since(xs: xenlab.XsConn, mark: int) -> int:
    return sum(1 for e in xs.events[mark:] if e == ("@releaseDomain", "rel"))


# --- guests that take the xenstore handshake: PV, PVH (the example plugin), PVHVM ---


# PVHVM: ~1 min to boot, and every suspend and resume stops, saves and
# continues its device model over QMP (slow under TCG, slower with other load).
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("kind", ["pv", "pvh", "pvhvm"])
def test_xenstore_guest_suspend_resume_checkpoint_and_refusals(
    kind: str, make_guest: MakeGuest, xc: xenlab.XenCtrl, xs: xenlab.XsConn, torpor: Torpor
) -> None:
    g = make_guest(kind)
    d = g.domid
    ctl = f"/local/domain/{d}/control/shutdown"
    xs.watch("@releaseDomain", "rel")

    st = torpor.status(d)
    assert (st["guest_type"], st["state"], st["request_pending"]) == (kind, "running", False)

    # A resume of a running domain is refused, and touches nothing.
    with pytest.raises(NotSuspended) as refused:
        torpor.resume(d)
    assert refused.value.state == "running"

    # Suspend: the xenstore handshake, then shut down with reason suspend.
    before = g.wait_tick()
    mark = xs.mark()
    r = torpor.suspend(d)
    assert (r.domid, r.guest_type, r.outcome, r.state) == (d, kind, "suspended", "suspended")
    assert r.method == SuspendMethod.XENSTORE
    assert [t.phase for t in r.timings][:4] == [
        Phase.VALIDATE,
        Phase.REQUEST,
        Phase.ACK,
        Phase.SHUTDOWN,
    ]
    assert_suspended(xc, d)
    assert xs.read(ctl) in ("", None), "the guest acked by clearing control/shutdown"
    xs.wait_until(lambda: releases_since(xs, mark), 10, "@releaseDomain for the suspend")
    assert torpor.status(d)["state"] == "suspended"

    # Refused on a suspended domain: another suspend, an unsafe in-place fast=0.
    with pytest.raises(AlreadySuspended) as refused_again:
        torpor.suspend(d)
    assert refused_again.value.state == "suspended"
    with pytest.raises(UnsafeResume) as unsafe:
        torpor.resume(d, cooperative=False)
    assert unsafe.value.state == "suspended"
    assert_suspended(xc, d)

    # Cooperative resume: the same domain runs on.
    r = torpor.resume(d)
    assert (r.domid, r.outcome, r.state, r.cooperative) == (d, "resumed", "running", True)
    phases = [t.phase for t in r.timings]
    assert phases.index(Phase.RESUME) < phases.index(Phase.XS_RESUME) < phases.index(Phase.VERIFY)
    before = assert_kept_running(g, xc, before)

    # The CLI: five checkpoints in one session.  Each suspend is noticed only
    # through @releaseDomain, which xenstored re-arms on XS_RESUME alone.
    mark = xs.mark()
    rc, out, err = torpor_cli("checkpoint", str(d), "--count", "5")
    assert rc == 0, err
    assert [o["index"] for o in out] == [0, 1, 2, 3, 4]
    for o in out:
        assert (o["ok"], o["outcome"], o["state"], o["method"]) == (
            True,
            "checkpointed",
            "running",
            "xenstore",
        ), o
    xs.wait_until(lambda: releases_since(xs, mark) >= 5, 10, "five @releaseDomain events")
    before = assert_kept_running(g, xc, before)

    # The CLI refuses cleanly: exit code 3 (all failed), the error and the state.
    rc, out, _ = torpor_cli("resume", str(d))
    assert rc == 3
    assert (out[0]["ok"], out[0]["error"], out[0]["state"]) == (False, "NotSuspended", "running")
    rc, out, err = torpor_cli("suspend", str(d))
    assert rc == 0, err
    assert (out[0]["outcome"], out[0]["method"]) == ("suspended", "xenstore")
    assert_suspended(xc, d)
    rc, out, _ = torpor_cli("suspend", str(d))
    assert rc == 3
    assert (out[0]["error"], out[0]["state"]) == ("AlreadySuspended", "suspended")
    rc, out, _ = torpor_cli("resume", "--slow", str(d))
    assert rc == 3
    assert (out[0]["error"], out[0]["state"]) == ("UnsafeResume", "suspended")
    assert_suspended(xc, d)

    # Forced: the guest dies as real-xen.md says, and torpor reports it so.
    state, reason = FORCED_OUTCOME[kind]
    rc, out, _ = torpor_cli("resume", "--slow", "--force", str(d))
    assert rc == 3, out
    assert (out[0]["error"], out[0]["state"]) == ("ResumeFailed", state), out
    assert "forced in-place non-cooperative resume" in out[0]["message"]
    i = info(xc, d)
    assert i.shutdown and i.shutdown_reason == reason, i
    assert "register_vcpu_info failed" in g.console(), g.console()[-2000:]


def test_the_pvh_guest_is_claimed_by_the_example_third_party_plugin(
    make_guest: MakeGuest,
) -> None:
    g = make_guest("pvh")
    rc, out, err = torpor_cli("plugins")
    assert rc == 0, err
    origins = {o["name"]: o["origin"] for o in out}
    assert origins.get("pvh", "").startswith("torpor-pvh "), origins  # its own distribution
    rc, out, err = torpor_cli("list")
    assert rc == 0, err
    assert {"domid": g.domid, "name": g.name, "guest_type": "pvh", "state": "running"} in out
    # Without the example plugin no one claims a PVH domain.
    rc, out, _ = torpor_cli("--no-plugin", "pvh", "suspend", str(g.domid))
    assert rc == 3
    assert out[0]["error"] == "UnsupportedGuest"


# --- a guest that cannot ack --------------------------------------------------------


def test_a_paused_guest_cannot_ack_the_request_is_withdrawn(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, xs: xenlab.XsConn, torpor: Torpor
) -> None:
    g = make_guest("pv")
    d = g.domid
    ctl = f"/local/domain/{d}/control/shutdown"
    xs.watch(ctl, "ctl")
    before = g.wait_tick()
    sh("xl", "pause", str(d))

    mark = xs.mark()
    t0 = time.monotonic()
    with pytest.raises(AckTimeout) as timed_out:
        torpor.suspend(d, ack_timeout=3)
    took = time.monotonic() - t0
    assert 3 <= took < 30, took
    assert (timed_out.value.phase, timed_out.value.state) == (Phase.ACK, "paused")
    # The request was written, then withdrawn in a transaction: "" again.
    xs.wait_until(lambda: xs.saw(ctl, "ctl", mark), 10, "the request's write event")
    assert xs.read(ctl) == ""
    i = info(xc, d)
    assert i.paused and not i.shutdown, i
    assert read_record("/var/run/torpor", d) is None, "torpor's intent record was left behind"
    st = torpor.status(d)
    assert (st["state"], st["request_pending"]) == ("paused", False)

    # The same through the CLI.
    rc, out, _ = torpor_cli("suspend", str(d), "--ack-timeout", "2")
    assert rc == 3
    assert (out[0]["error"], out[0]["phase"], out[0]["state"]) == ("AckTimeout", "ack", "paused")
    assert xs.read(ctl) == ""

    # Unpaused, the guest sees only "" and runs on: it never suspends.
    sh("xl", "unpause", str(d))
    after = assert_kept_running(g, xc, before)
    g.wait_tick(after=after.n + 2, timeout=60)  # GuestDied if it shut down meanwhile
    assert not info(xc, d).shutdown


# --- plain HVM: ACPI S3 through the guest agent, and the hard suspend --------------


@pytest.mark.timeout(600)
def test_hvm_sleeps_in_s3_through_its_guest_agent_and_wakes(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, torpor: Torpor
) -> None:
    g = make_guest("hvm", agent=True)
    d = g.domid
    assert "TORPOR-GUEST qga ttyS1" in g.console()
    assert g.agent_socket == Path(f"/var/run/xen/qga-{d}") and g.agent_socket.exists()
    assert torpor.status(d)["guest_type"] == "hvm"

    before = g.wait_tick()
    r = torpor.suspend(d)
    assert (r.outcome, r.state, r.method) == ("asleep", "S3", SuspendMethod.ACPI_S3)
    assert xc.hvm_param(d, HVM_PARAM_ACPI_S_STATE) == 3
    i = info(xc, d)
    assert not i.shutdown and not i.paused, i  # S3 is neither to the hypervisor
    with xenlab.qmp(g.qmp_socket) as q:
        assert q.execute("query-status")["status"] == "suspended"
    st = torpor.status(d)
    assert (st["guest_type"], st["state"]) == ("hvm", "S3")
    assert "qga-exited" not in g.console()

    r = torpor.resume(d)
    assert (r.outcome, r.state) == ("resumed", "running")
    assert dict(r.details).get("woke_from_s3") is True
    assert xc.hvm_param(d, HVM_PARAM_ACPI_S_STATE) == 0
    with xenlab.qmp(g.qmp_socket) as q:
        assert q.execute("query-status")["status"] == "running"
    assert_kept_running(g, xc, before)


@pytest.mark.timeout(600)
def test_hvm_hard_suspend_stops_and_saves_the_device_model_and_resumes(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, torpor: Torpor
) -> None:
    g = make_guest("hvm")  # no guest agent: the hard suspend, as libxl does
    d = g.domid
    saved = Path(f"/var/lib/xen/qemu-save.{d}")
    before = g.wait_tick()
    r = torpor.suspend(d)
    assert (r.outcome, r.state, r.method) == ("suspended", "suspended", SuspendMethod.HARD_SHUTDOWN)
    assert Phase.DEVICE_MODEL_SUSPEND in [t.phase for t in r.timings]
    assert_suspended(xc, d)
    with xenlab.qmp(g.qmp_socket) as q:
        assert q.execute("query-status")["status"] == "paused"  # QMP stop
    with saved.open("rb") as f:
        assert f.read(4) == b"QEVM", "xen-save-devices-state writes QEMU's migration stream"

    with pytest.raises(AlreadySuspended):
        torpor.suspend(d)

    r = torpor.resume(d)
    phases = [t.phase for t in r.timings]
    assert phases.index(Phase.DEVICE_MODEL_RESUME) < phases.index(Phase.RESUME), phases
    assert (r.outcome, r.state, r.cooperative) == ("resumed", "running", True)
    with xenlab.qmp(g.qmp_socket) as q:
        assert q.execute("query-status")["status"] == "running"  # QMP cont
    before = assert_kept_running(g, xc, before)

    # Without PV drivers a fast=0 resume in place is just resumedomain: torpor
    # allows it without --force, and the guest runs on.
    rc, out, err = torpor_cli("suspend", str(d))
    assert rc == 0, err
    assert out[0]["method"] == "hard-shutdown"
    rc, out, err = torpor_cli("resume", "--slow", str(d))
    assert rc == 0, err
    assert (out[0]["outcome"], out[0]["cooperative"]) == ("resumed", False)
    assert_kept_running(g, xc, before)


@pytest.mark.timeout(600)
def test_hvm_asleep_in_s3_is_suspended_the_hard_way_and_resumed_awake(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, torpor: Torpor
) -> None:
    """docs/protocol.md's method table: a guest already in S3 is suspended with the hard
    shutdown (as libxl does); its resume must bring it back *awake*."""
    g = make_guest("hvm", agent=True)
    d = g.domid
    before = g.wait_tick()
    assert torpor.suspend(d).state == "S3"
    r = torpor.suspend(d)
    assert (r.outcome, r.state, r.method) == ("suspended", "suspended", SuspendMethod.HARD_SHUTDOWN)
    assert_suspended(xc, d)
    assert xc.hvm_param(d, HVM_PARAM_ACPI_S_STATE) == 3

    r = torpor.resume(d)
    assert (r.outcome, r.state) == ("resumed", "running"), r
    assert xc.hvm_param(d, HVM_PARAM_ACPI_S_STATE) == 0, "resumed but still asleep in S3"
    with xenlab.qmp(g.qmp_socket) as q:
        assert q.execute("query-status")["status"] == "running"
    assert_kept_running(g, xc, before)


def test_two_guests_suspended_and_resumed_together_by_the_cli(
    make_guest: MakeGuest, xc: xenlab.XenCtrl
) -> None:
    guests = [make_guest("pv"), make_guest("pvh")]
    before = [g.wait_tick() for g in guests]
    ids = [str(g.domid) for g in guests]
    rc, out, err = torpor_cli("suspend", *ids)
    assert rc == 0, err
    assert sorted((o["domid"], o["outcome"]) for o in out) == sorted(
        (g.domid, "suspended") for g in guests
    )
    for g in guests:
        assert_suspended(xc, g.domid)
    rc, out, err = torpor_cli("resume", *ids)
    assert rc == 0, err
    assert sorted((o["domid"], o["state"]) for o in out) == sorted(
        (g.domid, "running") for g in guests
    )
    for g, b in zip(guests, before, strict=True):
        assert_kept_running(g, xc, b)

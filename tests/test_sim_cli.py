"""``torpor sim start / status / stop`` as real subprocesses, and a suspend driven by
hand on the daemon from this process: RemoteHypervisor on ``DIR/hypervisor.sock``
and torpor's pyxs adapter on ``DIR/xenstored/socket`` -- no orchestrator.

One daemon (``pv:2,pvhvm:1,hvm:1``, domain 2 never acks) serves most tests of
this module; the stop test and the start-up measurement run daemons of their
own.  HVM guests run on real QEMU where it is installed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import attrs
import pytest
from sim.facts_fixtures import (
    QUIET,
    STEP,
    ReleaseDomain,
    cancel,
    is_suspended,
    request,
    wait_ack,
)

from torpor.errors import HypervisorError, Timeout
from torpor.hypervisor.remote import RemoteHypervisor
from torpor.model import ShutdownReason
from torpor.xenstore import Xenstore
from torpor_sim.qemu import qemu_binary, running_qemu_pids

HAVE_QEMU = qemu_binary() is not None
GUESTS = "pv:2,pvhvm:1,hvm:1"
KINDS = ["pv", "pv", "pvhvm", "hvm"]
CLI_TIMEOUT = 60
EXIT_USAGE, EXIT_BACKEND = 2, 4


def _torpor_command() -> list[str]:
    script = shutil.which("torpor", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "torpor.cli"]


TORPOR = _torpor_command()


def torpor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TORPOR, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )


@attrs.frozen
class Daemon:
    dir: str
    pid: int
    start: subprocess.CompletedProcess[str]
    seconds: float

    @property
    def xenstore_socket(self) -> str:
        return f"{self.dir}/xenstored/socket"

    @property
    def hypervisor_socket(self) -> str:
        return f"{self.dir}/hypervisor.sock"


def start_daemon(directory: str, *args: str) -> Daemon:
    t0 = time.monotonic()
    r = torpor("sim", "start", "--dir", directory, *args)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, f"sim start failed ({r.returncode}): {r.stderr}"
    pid = int(Path(directory, "sim.pid").read_text())
    return Daemon(directory, pid, r, seconds)


def wait_exit(pid: int, timeout: float = STEP) -> None:
    """Wait for a process that is not our child to exit (its pidfd turns readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still running after {timeout:g} s"
    finally:
        os.close(fd)


def stop_quietly(d: Daemon) -> None:
    if torpor("sim", "stop", "--dir", d.dir).returncode != 0:
        # Never leave a daemon behind: this one we started, by its own pid.
        try:
            os.kill(d.pid, 15)
        except ProcessLookupError:
            return
    wait_exit(d.pid)


def short_tmpdir() -> str:
    return tempfile.mkdtemp(prefix="tc", dir="/tmp")  # AF_UNIX paths: <= 108 bytes


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    directory = short_tmpdir()
    d = start_daemon(directory, "--guests", GUESTS, "--misbehave", "2=never_ack")
    try:
        yield d
    finally:
        stop_quietly(d)
        shutil.rmtree(directory, ignore_errors=True)


STATUS_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s*(.*)$")


def status_rows(text: str) -> list[tuple[int, str, str, str, int, str]]:
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:5] == [
        "domid", "name", "type", "state", "counter"
    ])  # fmt: skip
    rows = []
    for line in lines[header + 1 :]:
        m = STATUS_LINE.match(line)
        assert m, f"not a status line: {line!r}"
        rows.append(
            (int(m[1]), m[2], m[3], m[4], int(m[5]), m[6].strip()),
        )
    return rows


# --------------------------------------------------------------------------- start / status


def test_start_builds_the_guests_as_domids_1_to_4_in_order(daemon: Daemon) -> None:
    out = daemon.start.stdout
    assert f"simulated host running in {daemon.dir}" in out
    assert f"XENSTORED_PATH={daemon.xenstore_socket}" in out
    rows = status_rows(out)
    assert [(r[0], r[2]) for r in rows] == list(enumerate(KINDS, start=1))
    assert [r[1] for r in rows] == [f"{k}-guest-{i}" for i, k in enumerate(KINDS, start=1)]
    assert all(r[3] == "running" for r in rows)
    assert "misbehaves: never_ack" in rows[1][5]
    assert "device model: in-process" in rows[2][5]  # PVHVM: the kernel is simulated
    assert f"device model: {'qemu' if HAVE_QEMU else 'in-process'}" in rows[3][5]


def test_status_lines_and_json(daemon: Daemon) -> None:
    first = torpor("sim", "status", "--dir", daemon.dir)
    assert first.returncode == 0, first.stderr
    rows = status_rows(first.stdout)
    assert [(r[0], r[2], r[3]) for r in rows] == [
        (i, k, "running") for i, k in enumerate(KINDS, start=1)
    ]
    js = torpor("sim", "status", "--dir", daemon.dir, "--json")
    assert js.returncode == 0, js.stderr
    records = json.loads(js.stdout)
    assert [r["domid"] for r in records] == [1, 2, 3, 4]
    for r, row in zip(records, rows, strict=True):
        assert (r["name"], r["kind"], r["state"]) == row[1:4]
        assert r["ticks"] >= row[4]  # the counter only goes on
        assert r["boots"] == 1
    assert [r["misbehaviour"] for r in records] == [None, "never_ack", None, None]
    assert records[0]["ticks"] > rows[0][4]  # a PV guest ticks every 10 ms of vCPU time


@pytest.mark.ctools
@pytest.mark.skipif(shutil.which("xenstore-ls") is None, reason="xenstore-utils not installed")
def test_the_c_xenstore_ls_shows_their_trees(daemon: Daemon) -> None:
    env = dict(os.environ, XENSTORED_PATH=daemon.xenstore_socket)
    r = subprocess.run(
        ["xenstore-ls", "-f", "/local/domain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=True,
    )
    nodes = dict(line.split(" = ", 1) for line in r.stdout.splitlines())
    for domid, kind in enumerate(KINDS, start=1):
        home = f"/local/domain/{domid}"
        assert nodes[f"{home}/name"] == f'"{kind}-guest-{domid}"'
        assert nodes[f"{home}/domid"] == f'"{domid}"'
        assert f"{home}/control/shutdown" in nodes
        has_pv_drivers = kind != "hvm"
        assert nodes.get(f"{home}/control/feature-suspend") == ('"1"' if has_pv_drivers else '""')
        for dev in ("vif/0", "vbd/51712"):
            assert (f"{home}/device/{dev}/state" in nodes) == has_pv_drivers
            if has_pv_drivers:
                assert nodes[f"{home}/device/{dev}/state"] == '"4"'
                backend = f"/local/domain/0/backend/{dev.split('/')[0]}/{domid}/{dev.split('/')[1]}"
                assert nodes[f"{home}/device/{dev}/backend"] == f'"{backend}"'
                assert nodes[f"{backend}/state"] == '"4"'


# --------------------------------------------------------------------------- by hand


def test_a_suspend_driven_by_hand_on_the_daemon_keeps_the_counter_going(daemon: Daemon) -> None:
    dom = 1
    with (
        closing(RemoteHypervisor(daemon.hypervisor_socket, timeout=STEP)) as hv,
        Xenstore(daemon.xenstore_socket, timeout=STEP) as xs,
    ):
        release = ReleaseDomain(xs)

        def guest() -> dict[str, Any]:
            report: dict[str, Any] = hv.call("sim_guest", domid=dom)
            return report

        before = guest()["counters"]
        for cycle in (1, 2):  # the second is noticed only because of the XS_RESUME
            seen = release.fence()
            request(xs, dom)
            wait_ack(xs, dom)
            info = release.wait_domain(hv, dom, is_suspended)
            assert info is not None and info.shutdown_reason == ShutdownReason.SUSPEND
            assert release.fence() == seen + 1
            frozen = guest()
            assert frozen["state"] == "suspended"
            hv.resume(dom, fast=True)
            xs.resume(dom)
            after = guest()
            assert after["state"] == "running"
            assert after["last_hypercall_return"] == 1
            assert after["counters"]["cooperative_resumes"] == cycle
            assert after["counters"]["boots"] == 1
            assert after["counters"]["ticks"] >= frozen["counters"]["ticks"]
            assert after["checksum_at_resume"] == frozen["checksum"]
        # Suspended, it did no work (the counter is a function of vCPU time) ...
        assert after["counters"]["ticks"] >= before["ticks"]
        time.sleep(0.05)  # ... and running, it does: 50 ms of vCPU time is >= 4 ticks
        assert guest()["counters"]["ticks"] > after["counters"]["ticks"]

        # Domain 2 never acks: the request stays until the toolstack cancels it.
        seen = release.fence()
        request(xs, 2)
        with pytest.raises(Timeout):
            wait_ack(xs, 2, timeout=QUIET)
        assert cancel(xs, 2) is False
        assert release.fence() == seen
        assert hv.domain_info(2).running
        # The EINVAL guard over the socket, too.
        with pytest.raises(HypervisorError) as e:
            hv.resume(2, fast=True)
        assert e.value.errno == errno.EINVAL
        release.close()


def test_a_second_start_on_the_same_dir_is_refused(daemon: Daemon) -> None:
    r = torpor("sim", "start", "--dir", daemon.dir, "--guests", "pv:1")
    assert r.returncode == EXIT_USAGE
    assert "a simulated host is already running in" in r.stderr
    assert f"(pid {daemon.pid})" in r.stderr
    assert f"torpor sim stop --dir {daemon.dir}" in r.stderr
    # The running one is untouched.
    status = torpor("sim", "status", "--dir", daemon.dir, "--json")
    assert [g["domid"] for g in json.loads(status.stdout)] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- stop


def test_stop_stops_it_cleanly_with_no_qemu_left() -> None:
    directory = short_tmpdir()
    try:
        d = start_daemon(directory, "--guests", "pv:1,hvm:1")
        qemus = running_qemu_pids(d.pid)
        assert len(qemus) == (1 if HAVE_QEMU else 0)
        r = torpor("sim", "stop", "--dir", directory)
        assert r.returncode == 0, r.stderr
        assert f"simulated host in {directory} stopped" in r.stdout
        assert running_qemu_pids(d.pid) == []
        for pid in qemus:
            wait_exit(pid)
        wait_exit(d.pid)
        assert not Path(directory, "hypervisor.sock").exists()
        assert not Path(directory, "sim.pid").exists()
        # Nothing answers any more; a second stop says so.
        r = torpor("sim", "status", "--dir", directory)
        assert r.returncode == EXIT_BACKEND and "no simulated host answers" in r.stderr
        r = torpor("sim", "stop", "--dir", directory)
        assert r.returncode == EXIT_BACKEND
        assert f"no simulated host running in {directory}" in r.stderr
        # And the DIR can be used again.
        again = start_daemon(directory, "--guests", "pv:1")
        stop_quietly(again)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- start-up time


def test_start_up_time_is_measured_and_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """Reported, not asserted: guests start well under a second (QEMU ones excepted)."""
    n_pv, n_pvhvm = 64, 16
    runs = {
        "empty": ("", ["--no-qemu"], 0),
        "pv+pvhvm": (f"pv:{n_pv},pvhvm:{n_pvhvm}", ["--no-qemu"], n_pv + n_pvhvm),
        "hvm": ("hvm:1", [], 1),
    }
    measured = {}
    for label, (guests, flags, expected) in runs.items():
        directory = short_tmpdir()
        try:
            d = start_daemon(directory, "--guests", guests, *flags)
            measured[label] = d.seconds
            status = json.loads(torpor("sim", "status", "--dir", directory, "--json").stdout)
            assert len(status) == expected
            stop_quietly(d)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    per_guest = (measured["pv+pvhvm"] - measured["empty"]) / (n_pv + n_pvhvm)
    hvm = measured["hvm"] - measured["empty"]
    with capsys.disabled():
        print(
            f"\n[torpor sim start] empty host {measured['empty']:.2f} s (process start-up); "
            f"{n_pv} PV + {n_pvhvm} PVHVM guests {measured['pv+pvhvm']:.2f} s, "
            f"~{per_guest * 1000:.1f} ms per guest; "
            f"one HVM guest ({'QEMU' if HAVE_QEMU else 'in-process'}) +{hvm:.2f} s"
        )

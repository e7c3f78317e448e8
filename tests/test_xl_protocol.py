"""xl's migration protocol between simulated hosts: ``torpor migrate --to xl://HOST``
and ``torpor migrate-receive`` (issue 15).

The sender runs ``exec SSH HOST xl migrate-receive`` through ``sh -c`` as xl
does; ``python -m torpor_sim.ssh`` stands in for ssh (a simulated host's xl
is torpor), and ``tests/xl_peers.py`` for receivers that die or misbehave.
Each failure path must end with exactly one copy of the guest running, never
two with one name; what the CLI says is checked against what the simulated
hosts say.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from torpor.cli import EXIT_ALL_FAILED, EXIT_OK, main
from torpor.hypervisor.remote import RemoteHypervisor
from torpor.xlmigrate import BANNER, GO, READY, REPORT, parse_target, rune
from torpor_sim import daemon

TESTS = Path(__file__).parent
SIM_SSH = f"{sys.executable} -m torpor_sim.ssh"


def peers(mode: str) -> str:
    return f"{sys.executable} {TESTS / 'xl_peers.py'} {mode}"


class Hosts:
    def __init__(self) -> None:
        self.src = tempfile.mkdtemp(prefix="xs", dir="/tmp")
        self.dst = tempfile.mkdtemp(prefix="xd", dir="/tmp")
        self.started: list[str] = []

    def start(self, where: str, guests: list[str], **kw: Any) -> None:
        daemon.start(where, guests, qemu=False, timeout=120, **kw)
        self.started.append(where)

    def call(self, where: str, op: str, **args: Any) -> Any:
        with closing(RemoteHypervisor(f"{where}/hypervisor.sock")) as hv:
            return hv.call(op, **args)

    def guests(self, where: str) -> dict[str, dict[str, Any]]:
        """name -> sim status row, for every guest domain of that host."""
        return {row["name"]: row for row in self.call(where, "sim_status")}

    def running(self, where: str) -> list[str]:
        return sorted(n for n, r in self.guests(where).items() if r["state"] == "running")

    def stop(self) -> None:
        for where in self.started:
            daemon.stop(where)
        shutil.rmtree(self.src, ignore_errors=True)
        shutil.rmtree(self.dst, ignore_errors=True)


@pytest.fixture
def hosts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hosts]:
    # the receivers' plugins (refuse_start_plugin) are found on PYTHONPATH
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{path}" if path else str(TESTS))
    h = Hosts()
    yield h
    h.stop()


def migrate(
    capsys: pytest.CaptureFixture[str], src: str, domid: int, to: str, ssh: str, *more: str
) -> tuple[int, dict[str, Any], str]:
    capsys.readouterr()
    args = ["--host", f"sim:{src}", "--json", "migrate", str(domid), "--to", to]
    code = main([*args, "--ssh-command", ssh, *more])
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1, out
    return code, json.loads(lines[0]), out.err


# ---------------------------------------------------------------------------
# the protocol's words


def test_the_messages_are_xls_byte_for_byte() -> None:
    # tools/xl/xl.h (4.17); the banner goes without its NUL, the others with it.
    assert BANNER == b"xl migration receiver ready, send binary domain data.\n"
    assert (READY, len(READY)) == (b"domain received, ready to unpause\0", 34)
    assert (GO, len(GO)) == (b"domain is yours, you are cleared to unpause\0", 44)
    assert (REPORT, len(REPORT)) == (b"my copy unpause results are as follows\0", 39)
    # main_migrate's rune, and -s "" making HOST the command
    assert rune("ssh", "h1") == "exec ssh h1 xl migrate-receive"
    assert rune("", "nc h1 8002") == "nc h1 8002"
    assert [parse_target(t) for t in ("xl://h1", "localhost", "sim:/x", "xen", "-x")] == [
        "h1",
        "localhost",
        None,
        None,
        None,
    ]


# ---------------------------------------------------------------------------
# torpor -> torpor


@pytest.mark.parametrize(
    ("kind", "live"), [("pv", True), ("pvhvm", True), ("pvh", True), ("pv", False)]
)
def test_torpor_to_torpor_over_xls_protocol(
    hosts: Hosts, capsys: pytest.CaptureFixture[str], kind: str, live: bool
) -> None:
    hosts.start(hosts.src, [kind], dirty_rate=2000, dirty_pages=200)
    hosts.start(hosts.dst, ["hvm"])  # guests of its own, named apart
    name = f"{kind}-guest-1"
    before = hosts.call(hosts.src, "sim_guest", domid=1)["counters"]
    code, got, _ = migrate(
        capsys, hosts.src, 1, f"xl://{hosts.dst}", SIM_SSH, "--live" if live else "--no-live"
    )
    assert code == EXIT_OK, got
    assert got["protocol"] == "xl" and got["live"] is live and got["source_domid"] == 1
    assert got["destination_domid"] is None and got["state"] == "reported running"
    assert hosts.guests(hosts.src) == {}  # the source is gone
    there = hosts.guests(hosts.dst)
    assert sorted(there) == ["hvm-guest-1", name]  # no NAME--incoming left
    seen = hosts.call(hosts.dst, "sim_guest", domid=there[name]["domid"])
    assert seen["state"] == "running" and seen["memory_consistent"] is True
    assert seen["last_hypercall_return"] == 0 and seen["frontends"] == {
        "vif/0": 4,
        "vbd/51712": 4,
    }
    c = seen["counters"]
    assert c["boots"] == 1 and c["ticks"] >= before["ticks"] and c["new_domain_resumes"] == 1
    if live:
        assert got["rounds"] and got["precopy"] in ("converged", "iteration bound")
        assert [p for p, _ in got["phases"]][:2] == ["connect", "precopy"]


def test_to_the_same_host_the_copy_takes_the_name_once_the_source_is_away(
    hosts: Hosts, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts.start(hosts.src, ["pvh", "pv"])
    code, got, _ = migrate(capsys, hosts.src, 1, f"xl://{hosts.src}", SIM_SSH)
    assert code == EXIT_OK, got
    names = hosts.guests(hosts.src)
    assert sorted(names) == ["pv-guest-2", "pvh-guest-1"]  # one of each, no --incoming
    assert names["pvh-guest-1"]["domid"] != 1 and names["pvh-guest-1"]["state"] == "running"


# ---------------------------------------------------------------------------
# failure paths: one copy runs


def test_receiver_dying_mid_stream_leaves_the_source_never_stopped(
    hosts: Hosts, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts.start(hosts.src, ["pv"], dirty_rate=1000, dirty_pages=2000)
    hosts.start(hosts.dst, ["pvh"])
    code, got, _ = migrate(capsys, hosts.src, 1, f"xl://{hosts.dst}", peers("cut=200000"))
    assert code == EXIT_ALL_FAILED and got["error"] == "MigrationFailed"
    assert "never suspended" in got["message"] and got["state"] == "running"
    seen = hosts.call(hosts.src, "sim_guest", domid=1)
    assert seen["state"] == "running" and seen["counters"]["suspends"] == 0
    assert hosts.running(hosts.src) == ["pv-guest-1"]
    assert sorted(hosts.guests(hosts.dst)) == ["pvh-guest-1"]  # nothing left there


def test_receiver_dying_after_the_suspend_resumes_the_source(
    hosts: Hosts, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts.start(hosts.src, ["pvhvm"], dirty_rate=1000, dirty_pages=2000)
    hosts.start(hosts.dst, ["pvh"])
    code, got, _ = migrate(
        capsys, hosts.src, 1, f"xl://{hosts.dst}", peers("cut=200000"), "--no-live"
    )
    assert code == EXIT_ALL_FAILED and got["state"] == "running"
    seen = hosts.call(hosts.src, "sim_guest", domid=1)
    assert seen["counters"]["suspends"] == 1 and seen["counters"]["cooperative_resumes"] == 1
    assert hosts.running(hosts.src) == ["pvhvm-guest-1"]
    assert sorted(hosts.guests(hosts.dst)) == ["pvh-guest-1"]


@pytest.mark.parametrize("how", ["name taken there", "refusing plugin", "fake receiver"])
def test_a_receiver_that_cannot_start_the_guest_gives_it_back(
    hosts: Hosts, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    hosts.start(hosts.src, ["pv"])
    # "name taken there": the destination already has a pv-guest-1, which xl's
    # protocol finds out only when the receiver renames its copy (after "go").
    hosts.start(hosts.dst, ["pv"] if how == "name taken there" else ["pvh"])
    before = hosts.guests(hosts.dst)
    ssh = {
        "name taken there": SIM_SSH,
        "refusing plugin": peers("plugin=refuse_start_plugin"),
        "fake receiver": peers("refuse"),
    }[how]
    code, got, _ = migrate(capsys, hosts.src, 1, f"xl://{hosts.dst}", ssh)
    assert code == EXIT_ALL_FAILED and got["error"] == "MigrationFailed"
    status = {"name taken there": 6, "refusing plugin": 3, "fake receiver": 3}[how]
    assert f"could not start the guest (status {status}" in got["message"]
    assert got["state"] == "running"
    # Renamed back (it was pv-guest-1--migratedaway meanwhile) and resumed cooperatively.
    assert hosts.running(hosts.src) == ["pv-guest-1"]
    seen = hosts.call(hosts.src, "sim_guest", domid=1)
    assert seen["counters"]["cooperative_resumes"] == 1 and seen["state"] == "running"
    assert hosts.guests(hosts.dst).keys() == before.keys()  # its copy destroyed


def test_no_banner_means_the_guest_is_not_touched(
    hosts: Hosts, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts.start(hosts.src, ["pv"])
    code, got, _ = migrate(capsys, hosts.src, 1, "xl://nowhere", peers("garbage"))
    assert code == EXIT_ALL_FAILED and "instead of banner" in got["message"]
    assert "not touched" in got["message"] and got["state"] == "running"
    assert hosts.call(hosts.src, "sim_guest", domid=1)["counters"]["suspends"] == 0


def test_silence_after_permission_to_go_leaves_the_truth_and_no_second_copy(
    hosts: Hosts, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts.start(hosts.src, ["pv"])
    code, got, _ = migrate(capsys, hosts.src, 1, "xl://elsewhere", peers("silent-after-go"))
    assert code == EXIT_ALL_FAILED and "final handshake" in got["message"]
    assert got["state"] == "suspended"
    # xl's failed_badly: the source stays suspended, renamed away, nothing resumed.
    assert hosts.guests(hosts.src)["pv-guest-1--migratedaway"]["state"] == "suspended"
    code, out, _ = _cli(capsys, hosts.src, "--json", "status", "1")
    st = json.loads(out[0])
    assert st["state"] == "suspended" and st["intent"]["migration"] == "go"
    assert st["intent"]["to"] == "xl://elsewhere" and st["intent"]["undefined"] is True
    code, out, _ = _cli(capsys, hosts.src, "--json", "recover", "1")
    refused = json.loads(out[0])
    assert code == EXIT_ALL_FAILED and refused["error"] == "InvalidState"
    assert "handed over" in refused["message"] and refused["state"] == "suspended"
    assert hosts.guests(hosts.src)["pv-guest-1--migratedaway"]["state"] == "suspended"


def _wait_exit(pid: int, timeout: float) -> None:
    """Until process ``pid`` (not our child) has ended: its pidfd becomes readable."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still runs after {timeout}s"
    finally:
        os.close(fd)


def _cli(capsys: pytest.CaptureFixture[str], src: str, *args: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(["--host", f"sim:{src}", *args])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def _killed_sender(
    hosts: Hosts, at: str, *more: str, ssh: str = SIM_SSH
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TORPOR_TEST_KILL_AT": at,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torpor",
            "--host",
            f"sim:{hosts.src}",
            "-p",
            "kill_plugin",
            "migrate",
            "1",
            "--to",
            f"xl://{hosts.dst}",
            "--ssh-command",
            ssh,
            *more,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_sender_killed_after_the_final_suspend_status_and_recover_bring_it_back(
    hosts: Hosts, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts.start(hosts.src, ["pvhvm"])
    hosts.start(hosts.dst, ["pvh"])
    r = _killed_sender(hosts, "migrate:finished:shutdown")
    assert r.returncode == -9, r.stderr
    # The receiver saw the stream end: it built nothing that stays.
    assert sorted(hosts.guests(hosts.dst)) == ["pvh-guest-1"]
    code, out, _ = _cli(capsys, hosts.src, "--json", "status", "1")
    st = json.loads(out[0])
    assert st["state"] == "suspended" and st["intent"]["op"] == "migrate"
    assert st["intent_alive"] is False and st["intent"]["migration"] == "streaming"
    code, out, _ = _cli(capsys, hosts.src, "--json", "recover", "1")
    assert code == EXIT_OK, out
    assert json.loads(out[0])["state"] == "running"
    assert hosts.running(hosts.src) == ["pvhvm-guest-1"]
    assert hosts.call(hosts.src, "sim_guest", domid=1)["counters"]["cooperative_resumes"] == 1


def test_sender_killed_after_permission_to_go_the_copy_runs_and_recover_refuses(
    hosts: Hosts, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts.start(hosts.src, ["pv"])
    hosts.start(hosts.dst, ["pvh"])
    pidfile = Path(hosts.dst) / "receiver.pid"
    # right after "go" was sent
    r = _killed_sender(hosts, "migrate:started:resume", ssh=peers(f"pidfile={pidfile}"))
    assert r.returncode == -9, r.stderr
    _wait_exit(int(pidfile.read_text()), timeout=60)  # the receiver outlives the sender
    there = hosts.guests(hosts.dst)
    assert there["pv-guest-1"]["state"] == "running"  # the receiver started its copy
    here = hosts.guests(hosts.src)
    assert list(here) == ["pv-guest-1--migratedaway"]  # never two running under one name
    assert here["pv-guest-1--migratedaway"]["state"] == "suspended"
    code, out, _ = _cli(capsys, hosts.src, "--json", "recover", "1")
    assert code == EXIT_ALL_FAILED and "handed over" in json.loads(out[0])["message"]
    assert hosts.running(hosts.src) == []

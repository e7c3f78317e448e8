"""Live migration on real Xen, over xl's migration protocol, both ways (issue 15).

In the lab's dom0 (Xen 4.17, no shadow paging): a guest moves to
``localhost`` three times -- torpor to torpor, torpor to ``xl
migrate-receive``, ``xl migrate`` to ``torpor migrate-receive`` -- live for
PVH (the example plugin), PVHVM and plain HVM (hard suspend), non-live for
PV (its log-dirty needs shadow paging: ``--live`` is refused with the
reason, and xl cannot migrate it at all).  After each move the guest counts
on from where it was in the same boot (tick counter and uptime), its
frontends are Connected, the old domain is gone and exactly one domain has
its name.  The failure paths: the receiver dying mid-stream, a receiver that
refuses to start the guest, the sender killed after the final suspend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xenlab
from xenlab import CONSOLE_DIR, sh

MakeGuest = Callable[..., xenlab.Guest]
TESTS = Path(__file__).resolve().parent.parent
PY = sys.executable

#: ``ssh localhost`` without an sshd: xl runs ``exec CMD localhost xl migrate-receive``
#: through sh -c; this CMD drops "localhost" and runs the rest here.
SELF = "sh -c 'shift; exec \"$@\"' sh"


def torpor_receiver(*extra: str) -> str:
    """A CMD for xl's -s / torpor's --ssh-command that runs torpor migrate-receive here."""
    more = " ".join(extra)
    return f"sh -c 'exec {PY} -m torpor --host xen {more} migrate-receive' sh"


def env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{path}"}


def torpor(*args: str, timeout: float = 600) -> tuple[int, dict[str, Any], str]:
    """``torpor --host xen --json ARGS`` as an operator runs it: exit code, JSON, stderr."""
    r = subprocess.run(
        [PY, "-m", "torpor", "--host", "xen", "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env(),
    )
    lines = r.stdout.splitlines()
    got = json.loads(lines[-1]) if lines else {}
    return r.returncode, got, r.stderr


def domids_named(name: str) -> list[int]:
    """Every domain whose xenstore name is ``name`` (what libxl_name_to_domid reads)."""
    out = []
    for line in sh("xl", "list").splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == name:
            out.append(int(parts[1]))
    return out


def follow(g: xenlab.Guest) -> None:
    """The guest now lives in a new domain: its domid, and the console it writes to
    (xenconsoled names a log after the first name it saw: NAME--incoming)."""
    (g.domid,) = domids_named(g.name)
    if g.kind != "hvm":  # plain HVM: its QEMU writes ttyS0 to the same file, afresh
        g.console_log = CONSOLE_DIR / f"guest-{g.name}--incoming.log"


def frontends(domid: int) -> dict[str, str]:
    """``device/<kind>/<id>/state`` of every frontend the domain has."""
    out: dict[str, str] = {}
    with xenlab.XsConn() as xs:
        for kind in xs.directory(f"/local/domain/{domid}/device") or []:
            for dev in xs.directory(f"/local/domain/{domid}/device/{kind}") or []:
                state = xs.read(f"/local/domain/{domid}/device/{kind}/{dev}/state")
                if state is not None:
                    out[f"{kind}/{dev}"] = state
    return out


_RESULTS: dict[str, Any] = {}


def record(key: str, value: object) -> None:
    _RESULTS[key] = value
    out = os.environ.get("TORPOR_LAB_OUT")
    if out:
        Path(out, "migrate.json").write_text(json.dumps(_RESULTS, indent=2) + "\n")


def check_moved(
    g: xenlab.Guest, xc: xenlab.XenCtrl, old: int, before: xenlab.Tick, how: str
) -> None:
    """Gone from ``old``, one domain of its name, counting on in the same boot, its
    frontends as they were: Connected, for a guest with PV drivers (a plain HVM
    guest has none running: libxl's vkbd stays Initialising there, as before)."""
    assert xc.info(old) is None or xc.info(old).dying, f"domain {old} is still there"
    assert domids_named(g.name) == [g.domid]
    for suffix in ("--incoming", "--migratedaway"):
        assert domids_named(g.name + suffix) == []
    first = g.wait_tick(after=before.n, timeout=120)
    after = g.wait_tick(after=first.n, timeout=120)
    assert before.n < first.n < after.n and after.uptime > before.uptime, (before, after)
    if g.kind != "hvm":
        assert "TORPOR-GUEST boot" not in g.console(), "the guest rebooted"
    fe = frontends(g.domid)
    if g.kind == "hvm":
        assert set(fe.values()) <= {"1"}, fe  # no PV drivers: nothing connects
    else:
        assert all(state == "4" for state in fe.values()), fe
    record(
        f"{g.kind}:{how}",
        {"before": [before.n, before.uptime], "after": [after.n, after.uptime], "frontends": fe},
    )


# ---------------------------------------------------------------------------
# the three directions, for each guest type


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", ["pvh", "pvhvm", "hvm"])
def test_live_migration_to_localhost_three_ways(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, kind: str
) -> None:
    g = make_guest(kind, overrides={"memory": "128"} if kind == "pvh" else None)
    # torpor -> torpor
    old, before = g.domid, g.wait_tick()
    code, got, err = torpor(
        "migrate", str(g.domid), "--to", "localhost", "--ssh-command", torpor_receiver(), "--live"
    )
    assert code == 0, (got, err)
    assert got["live"] is True and got["protocol"] == "xl" and got["rounds"], got
    follow(g)
    assert got["destination_domid"] == g.domid and got["state"] == "running"
    check_moved(g, xc, old, before, "torpor->torpor")
    record(f"{kind}:torpor->torpor:result", got)
    # torpor -> xl migrate-receive
    old, before = g.domid, g.wait_tick()
    code, got, err = torpor(
        "migrate", str(g.domid), "--to", "xl://localhost", "--ssh-command", SELF, "--live"
    )
    assert code == 0, (got, err)
    follow(g)
    check_moved(g, xc, old, before, "torpor->xl")
    record(f"{kind}:torpor->xl:result", got)
    # xl migrate -> torpor migrate-receive
    old, before = g.domid, g.wait_tick()
    t0 = time.monotonic()
    r = subprocess.run(
        ["xl", "migrate", "-s", torpor_receiver(), g.name, "localhost"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env(),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "migration sender: Target reports successful startup." in r.stderr, r.stderr
    follow(g)
    check_moved(g, xc, old, before, "xl->torpor")
    record(f"{kind}:xl->torpor:seconds", round(time.monotonic() - t0, 3))


@pytest.mark.timeout(900)
def test_pv_migrates_non_live_saying_why_and_live_is_refused(
    make_guest: MakeGuest, xc: xenlab.XenCtrl
) -> None:
    assert "shadow" not in sh("xl", "info").split("virt_caps")[1].splitlines()[0]
    g = make_guest("pv", overrides={"memory": "128"})
    before = g.wait_tick()
    code, got, _ = torpor(
        "migrate", str(g.domid), "--to", "localhost", "--ssh-command", torpor_receiver(), "--live"
    )
    assert code == 3 and got["error"] == "LiveUnavailable", got
    assert "shadow paging" in got["reason"] and got["state"] == "running"
    assert xc.info(g.domid) is not None and not xc.info(g.domid).shutdown
    g.wait_tick(after=before.n, timeout=60)  # untouched, counting on
    for how, ssh in (("torpor->torpor", torpor_receiver()), ("torpor->xl", SELF)):
        old, before = g.domid, g.wait_tick()
        code, got, err = torpor("migrate", str(g.domid), "--to", "localhost", "--ssh-command", ssh)
        assert code == 0, (got, err)
        assert got["live"] is False and "shadow paging" in got["live_refusal"], got
        follow(g)
        check_moved(g, xc, old, before, how)
        record(f"pv:{how}:result", got)
    # xl itself cannot migrate it at all (always live): it fails, the guest runs on.
    r = subprocess.run(
        ["xl", "migrate", "-s", torpor_receiver(), g.name, "localhost"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env(),
    )
    assert r.returncode != 0 and "logdirty" in r.stderr, r.stderr
    record("pv:xl->torpor", r.stderr.strip().splitlines()[-3:])
    assert domids_named(g.name) == [g.domid]
    g.wait_tick(timeout=60)


# ---------------------------------------------------------------------------
# failure paths


@pytest.mark.timeout(900)
def test_receiver_dying_mid_stream_leaves_the_guest_running_never_stopped(
    make_guest: MakeGuest, xc: xenlab.XenCtrl
) -> None:
    g = make_guest("pvh", overrides={"memory": "128"})
    before = g.wait_tick()
    # the transport dies after 4 MiB: the receiver sees the stream end, the sender EPIPE
    cut = f"sh -c 'head -c 4194304 | {PY} -m torpor --host xen migrate-receive' sh"
    code, got, err = torpor("migrate", str(g.domid), "--to", "localhost", "--ssh-command", cut)
    assert code == 3 and got["error"] == "MigrationFailed", (got, err)
    assert "never suspended" in got["message"] and got["state"] == "running", got
    info = xc.info(g.domid)
    assert info is not None and not info.shutdown
    g.wait_tick(after=before.n, timeout=60)
    assert domids_named(g.name) == [g.domid] and domids_named(g.name + "--incoming") == []


@pytest.mark.timeout(900)
def test_receiver_refusing_to_start_the_guest_gives_it_back(
    make_guest: MakeGuest, xc: xenlab.XenCtrl
) -> None:
    g = make_guest("pvh", overrides={"memory": "128"})
    before = g.wait_tick()
    code, got, err = torpor(
        "migrate",
        str(g.domid),
        "--to",
        "localhost",
        "--ssh-command",
        torpor_receiver("-p", "refuse_start_plugin"),
    )
    assert code == 3 and "could not start the guest (status 3" in got["message"], (got, err)
    assert got["state"] == "running"
    # renamed back from NAME--migratedaway, resumed cooperatively in its domain
    assert domids_named(g.name) == [g.domid]
    assert domids_named(g.name + "--incoming") == [] == domids_named(g.name + "--migratedaway")
    g.wait_tick(after=before.n, timeout=60)
    assert "TORPOR-GUEST boot" in g.console() and g.console().count("TORPOR-GUEST boot") == 1


@pytest.mark.timeout(900)
def test_sender_killed_after_the_final_suspend_status_and_recover_bring_it_back(
    make_guest: MakeGuest, xc: xenlab.XenCtrl
) -> None:
    g = make_guest("pvh", overrides={"memory": "128"})
    before = g.wait_tick()
    r = subprocess.run(
        [
            PY,
            "-m",
            "torpor",
            "--host",
            "xen",
            "-p",
            "kill_plugin",
            "migrate",
            str(g.domid),
            "--to",
            "localhost",
            "--ssh-command",
            torpor_receiver(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**env(), "TORPOR_TEST_KILL_AT": "migrate:finished:shutdown"},
    )
    assert r.returncode == -9, r.stderr
    info = xc.info(g.domid)
    assert info is not None and info.shutdown and info.shutdown_reason == 2
    code, st, _ = torpor("status", str(g.domid))
    assert st["state"] == "suspended" and st["intent"]["op"] == "migrate", st
    assert st["intent_alive"] is False
    code, got, err = torpor("recover", str(g.domid))
    assert code == 0 and got["state"] == "running", (got, err)
    g.wait_tick(after=before.n, timeout=60)
    # the receiver saw the stream end: no second copy, no leftover
    assert domids_named(g.name) == [g.domid]
    deadline = time.monotonic() + 60
    with xenlab.XsConn() as xs:
        xs.watch("@releaseDomain", "leftover")
        xs.wait_until(
            lambda: domids_named(g.name + "--incoming") == [],
            timeout=max(0.0, deadline - time.monotonic()),
            what="the receiver's partial domain gone",
        )

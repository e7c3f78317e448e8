"""``torpor migrate`` between ``torpor sim`` daemons, live (issue 15).

Two daemons per module: a source whose guests dirty their memory and whose
hypervisor has no shadow paging (``--no-shadow``: its PV guest cannot go
live), and a destination.  What the CLI says is checked against what the
daemons say.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

from torpor.cli import EXIT_ALL_FAILED, EXIT_OK, EXIT_USAGE, main
from torpor.hypervisor.remote import RemoteHypervisor
from torpor_sim import daemon

PV, PVH, PVHVM = 1, 2, 3


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[str, str]]:
    src = tempfile.mkdtemp(prefix="ts", dir="/tmp")
    dst = tempfile.mkdtemp(prefix="td", dir="/tmp")
    try:
        daemon.start(
            src,
            ["pv", "pvh", "pvhvm"],
            qemu=False,
            dirty_rate=20000,
            dirty_pages=300,
            shadow=False,
            timeout=120,
        )
        daemon.start(dst, ["pvh"], qemu=False, timeout=120)  # named apart from the sources
        yield src, dst
    finally:
        daemon.stop(src)
        daemon.stop(dst)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def guest(directory: str, domid: int) -> dict[str, Any]:
    with closing(RemoteHypervisor(f"{directory}/hypervisor.sock")) as hv:
        got: dict[str, Any] = hv.call("sim_guest", domid=domid)
        return got


def test_live_migration_shows_each_round_and_the_downtime(
    hosts: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = hosts
    code, out, err = run(capsys, "--host", f"sim:{src}", "migrate", str(PVH), "--to", f"sim:{dst}")
    assert code == EXIT_OK, err
    (line,) = out
    assert line.startswith(f"domain {PVH}: migrate ok via xenstore (non-cooperative): migrated")
    assert "; live, downtime " in line and "precopy round" in line
    rounds = [x for x in err.splitlines() if ": precopy round " in x]
    assert rounds and rounds[0].startswith(f"domain {PVH}: migrate: precopy round 1: 316 pages")


def test_json_carries_downtime_and_rounds_and_nothing_on_stderr(
    hosts: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = hosts
    code, out, err = run(
        capsys,
        "--host",
        f"sim:{src}",
        "--json",
        "migrate",
        str(PVHVM),
        "--to",
        f"sim:{dst}",
        "--max-iterations",
        "2",
        "--dirty-threshold",
        "10",
    )
    assert code == EXIT_OK and err == ""
    (got,) = (json.loads(x) for x in out)
    assert got["live"] is True and got["source_domid"] == PVHVM
    assert got["downtime"] > 0 and got["max_iterations"] == 2 and got["dirty_threshold"] == 10
    assert [r["iteration"] for r in got["rounds"]][:2] == [1, 2]
    assert guest(dst, got["domid"])["memory_consistent"] is True


def test_live_is_refused_without_shadow_paging_and_the_guest_runs_on(
    hosts: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = hosts
    code, out, _ = run(
        capsys, "--host", f"sim:{src}", "--json", "migrate", str(PV), "--to", f"sim:{dst}", "--live"
    )
    assert code == EXIT_ALL_FAILED
    (got,) = (json.loads(x) for x in out)
    assert got["error"] == "LiveUnavailable" and "shadow paging" in got["reason"]
    assert got["state"] == "running"
    seen = guest(src, PV)
    assert seen["state"] == "running" and seen["counters"]["suspends"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["migrate", "1", "--to", "sim:/x", "--max-iterations", "0"],
        ["migrate", "1", "--to", "sim:/x", "--max-iterations", "1001"],
        ["migrate", "1", "--to", "sim:/x", "--dirty-threshold", "-1"],
        ["migrate", "1", "--to", "sim:/x", "--live", "--no-live"],
        ["sim", "start", "--dir", "/tmp/never-made-x", "--dirty-rate", "-1"],
        ["sim", "start", "--dir", "/tmp/never-made-x", "--dirty-pages", "0"],
    ],
)
def test_bad_live_options_are_usage_errors(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, *args)
    assert code == EXIT_USAGE and "error:" in err

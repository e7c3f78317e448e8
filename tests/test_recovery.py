"""torpor killed with SIGKILL in every phase: status tells the truth, recover fixes it.

Each case runs the real CLI against a `torpor sim` daemon with a plugin that
SIGKILLs the torpor process at the start or end of one phase, then checks
``torpor status`` and ``torpor recover`` from a fresh process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor.sim import daemon

HERE = Path(__file__).parent
SUSPEND_POINTS = [
    f"suspend:{when}:{phase}"
    for phase in ("validate", "request", "ack", "shutdown", "device-model-suspend")
    for when in ("started", "finished")
]
RESUME_POINTS = [
    f"resume:{when}:{phase}"
    for phase in ("validate", "device-model-resume", "resume", "xs-resume", "guest-resume",
                  "verify")
    for when in ("started", "finished")
]


def torpor(dirpath: str, *args: str, kill_at: str | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}"}
    if kill_at:
        env["TORPOR_TEST_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "torpor.cli", "--host", f"sim:{dirpath}", "-p", "kill_plugin",
         *args],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("r", numbered=True)
    short = f"/tmp/tr{os.getpid()}"
    os.makedirs(short, exist_ok=True)
    # one PV and one PVHVM guest per kill point, so every case starts clean
    n = len(SUSPEND_POINTS) + len(RESUME_POINTS)
    daemon.start(short, ["pv"] * n + ["pvhvm"] * n)
    yield short
    daemon.stop(short)
    del d


def status(dirpath: str, domid: int) -> dict[str, object]:
    out = torpor(dirpath, "status", str(domid), "--json")
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def check_recovers(dirpath: str, domid: int) -> None:
    out = torpor(dirpath, "recover", str(domid), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    st = status(dirpath, domid)
    assert st["state"] == "running" and not st["request_pending"] and st["intent"] is None
    # The domain is fully usable again: xenstored's latch was re-armed, so a
    # new suspend is noticed and a cooperative resume works.
    for op in ("suspend", "resume"):
        res = torpor(dirpath, op, str(domid), "--json")
        assert res.returncode == 0, res.stdout + res.stderr


def _domid(point: str, kind: str) -> int:
    points = SUSPEND_POINTS + RESUME_POINTS
    n = len(points)
    return 1 + points.index(point) + (n if kind == "pvhvm" else 0)


@pytest.mark.parametrize("kind", ["pv", "pvhvm"])
@pytest.mark.parametrize("point", SUSPEND_POINTS)
def test_killed_during_suspend(sim_dir: str, point: str, kind: str) -> None:
    domid = _domid(point, kind)
    if kind == "pv" and "device-model" in point:
        pytest.skip("a PV guest has no device model phase")
    out = torpor(sim_dir, "suspend", str(domid), kill_at=point)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
    st = status(sim_dir, domid)
    intent = st["intent"]
    assert isinstance(intent, dict) and intent["op"] == "suspend"
    assert st["intent_alive"] is False
    assert st["state"] in ("running", "suspended")
    if st["state"] == "running" and intent.get("requested") and point.endswith(":request"):
        # Killed right after asking: the request may still be pending, or acked.
        assert isinstance(st["request_pending"], bool)
    check_recovers(sim_dir, domid)


@pytest.mark.parametrize("kind", ["pv", "pvhvm"])
@pytest.mark.parametrize("point", RESUME_POINTS)
def test_killed_during_resume(sim_dir: str, point: str, kind: str) -> None:
    domid = _domid(point, kind)
    if kind == "pv" and "device-model" in point:
        pytest.skip("a PV guest has no device model phase")
    assert torpor(sim_dir, "suspend", str(domid)).returncode == 0
    out = torpor(sim_dir, "resume", str(domid), kill_at=point)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
    st = status(sim_dir, domid)
    assert isinstance(st["intent"], dict) and st["intent"]["op"] == "resume"
    # Before xc_domain_resume it is still suspended; after, running.
    before_resume = point.split(":")[2] in ("validate", "device-model-resume") or (
        point == "resume:started:resume")
    assert st["state"] == ("suspended" if before_resume else "running")
    check_recovers(sim_dir, domid)

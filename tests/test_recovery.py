"""torpor killed with SIGKILL in every phase: status tells the truth, recover fixes it.

Each case runs the real CLI (``torpor.cli.main``, in a forked child so that
it is a process of its own to kill) against a `torpor sim` daemon with a
plugin that SIGKILLs that process at the start or end of one phase, then
checks ``status`` and ``recover`` as a new toolstack process would, with a
fresh connection.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor.facade import Torpor
from torpor.host import Host
from torpor.model import Timeouts
from torpor.xenstore import Xenstore
from torpor_sim import daemon

HERE = Path(__file__).parent
SUSPEND_POINTS = [
    f"suspend:{when}:{phase}"
    for phase in ("validate", "request", "ack", "shutdown", "device-model-suspend")
    for when in ("started", "finished")
]
RESUME_POINTS = [
    f"resume:{when}:{phase}"
    for phase in (
        "validate",
        "device-model-resume",
        "resume",
        "xs-resume",
        "guest-resume",
        "verify",
    )
    for when in ("started", "finished")
]


def killed(dirpath: str, *args: str, kill_at: str) -> int:
    """Run ``torpor ARGS`` in a forked child that kills itself at ``kill_at``; its status."""
    pid = os.fork()
    if pid == 0:  # the child: a torpor process of its own
        try:
            os.environ["TORPOR_TEST_KILL_AT"] = kill_at
            sys.path.insert(0, str(HERE))
            from torpor.cli import main

            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                os.dup2(null.fileno(), 2)
            code = main(["--host", f"sim:{dirpath}", "-p", "kill_plugin", *args])
        except BaseException:
            code = 99
        os._exit(code)
    _, wstatus = os.waitpid(pid, 0)
    return -os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else os.WEXITSTATUS(wstatus)


def toolstack(dirpath: str) -> Torpor:
    """A fresh toolstack process's view: its own connections, nothing cached."""
    return Torpor(Host.sim(dirpath), own_host=True, timeouts=Timeouts(settle=2.0))


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("r", numbered=True)
    short = f"/tmp/tr{os.getpid()}"
    os.makedirs(short, exist_ok=True)
    # one PV and one PVHVM guest per kill point, so every case starts clean,
    # and a PV guest that never acknowledges (NEVER_ACK)
    n = len(SUSPEND_POINTS) + len(RESUME_POINTS)
    daemon.start(short, ["pv"] * n + ["pvhvm"] * n + ["pv"], {NEVER_ACK: "never_ack"})
    yield short
    daemon.stop(short)
    del d


NEVER_ACK = 2 * (len(SUSPEND_POINTS) + len(RESUME_POINTS)) + 1


def shutdown_node(dirpath: str, domid: int) -> str | None:
    """``control/shutdown`` as xenstored holds it (read directly, not through torpor)."""
    with Xenstore(f"{dirpath}/xenstored/socket").connect() as xs:
        return xs.read_or(f"/local/domain/{domid}/control/shutdown", None)


def status(dirpath: str, domid: int) -> dict[str, Any]:
    with toolstack(dirpath) as t:
        return t.status(domid)


def check_recovers(dirpath: str, domid: int) -> None:
    with toolstack(dirpath) as t:
        assert t.recover(domid).state == "running"
        st = t.status(domid)
        assert st["state"] == "running" and not st["request_pending"] and st["intent"] is None
        # Fully usable again: xenstored's latch was re-armed, so a new suspend
        # is noticed (a lost XS_RESUME would make this one time out).
        t.suspend(domid, suspend_timeout=5)
        t.resume(domid)


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
    assert killed(sim_dir, "suspend", str(domid), kill_at=point) == -signal.SIGKILL
    st = status(sim_dir, domid)
    intent = st["intent"]
    if point in (
        "suspend:started:validate",
        "suspend:finished:validate",
        "suspend:started:request",
    ):
        # Killed before touching the guest: no record, nothing to undo.
        assert intent is None and st["state"] == "running" and not st["request_pending"]
        return
    assert isinstance(intent, dict) and intent["op"] == "suspend"
    assert st["intent_alive"] is False
    assert st["state"] in ("running", "suspended")
    # Killed right after asking, the request may still be pending or acked:
    # status must say which, as xenstored has it.
    assert st["request_pending"] == (shutdown_node(sim_dir, domid) == "suspend")
    check_recovers(sim_dir, domid)


@pytest.mark.parametrize("kind", ["pv", "pvhvm"])
@pytest.mark.parametrize("point", RESUME_POINTS)
def test_killed_during_resume(sim_dir: str, point: str, kind: str) -> None:
    domid = _domid(point, kind)
    if kind == "pv" and "device-model" in point:
        pytest.skip("a PV guest has no device model phase")
    with toolstack(sim_dir) as t:
        t.suspend(domid)
    assert killed(sim_dir, "resume", str(domid), kill_at=point) == -signal.SIGKILL
    st = status(sim_dir, domid)
    if point in ("resume:started:validate", "resume:finished:validate"):
        assert st["intent"] is None and st["state"] == "suspended"  # nothing touched yet
        check_recovers(sim_dir, domid)
        return
    assert isinstance(st["intent"], dict) and st["intent"]["op"] == "resume"
    # Before xc_domain_resume it is still suspended; after, running.
    before_resume = point.split(":")[2] in ("validate", "device-model-resume") or (
        point == "resume:started:resume"
    )
    assert st["state"] == ("suspended" if before_resume else "running")
    check_recovers(sim_dir, domid)


def test_recover_withdraws_a_pending_suspend_request(sim_dir: str) -> None:
    """torpor killed after asking a guest that never answers: the request stays
    pending until recover withdraws it (in a transaction)."""
    domid = NEVER_ACK
    assert killed(sim_dir, "suspend", str(domid), kill_at="suspend:finished:request") == (
        -signal.SIGKILL
    )
    assert shutdown_node(sim_dir, domid) == "suspend"
    st = status(sim_dir, domid)
    assert st["request_pending"] is True and st["state"] == "running"
    with toolstack(sim_dir) as t:
        res = t.recover(domid)
    assert "withdrew the pending suspend request" in dict(res.details)["actions"]  # type: ignore[operator]
    assert shutdown_node(sim_dir, domid) == ""
    st = status(sim_dir, domid)
    assert st["state"] == "running" and not st["request_pending"] and st["intent"] is None

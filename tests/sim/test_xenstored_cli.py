"""``python -m torpor_sim.xenstored``: foreground daemon, one readiness line, clean exit."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys

import pytest

from .xs_helpers import RawXs

TIMEOUT = 10


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_runs_in_foreground_and_exits_cleanly(sockdir: str, sig: int) -> None:
    sock = os.path.join(sockdir, "xs")
    guest = os.path.join(sockdir, "g3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torpor_sim.xenstored", "--socket", sock, "--guest-socket",
         f"3:{guest}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(TIMEOUT), "no readiness line"
        assert proc.stdout.readline() == f"torpor-sim-xenstored: ready on {sock}\n"
        c, g = RawXs(sock), RawXs(guest)
        c.write("/local/domain/3/x", "v")
        assert c.read("/local/domain/3/x") == b"v"
        assert g.request(4, b"x\0t\0")[0] == 4  # XS_WATCH from the guest socket works
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert out == ""
        assert c.is_closed_by_peer()
        assert not os.path.exists(sock)
        c.close()
        g.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

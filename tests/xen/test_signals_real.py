"""Ctrl-C on a real terminal, on real Xen (issue 12): the rollback against a real PV guest.

dom0's ``python3 -m torpor --host xen`` runs on a pseudo-terminal that is its
controlling terminal; ^C is typed when the CLI itself says a phase began (the
``signal_plugin`` marker, tests/signal_plugin.py), never after a sleep.  The
guest is judged by the lab's own witnesses (tests/xen/xenlab.py): its
console counter (same boot, counting on), libxenctrl's raw flags, xenstore
read on a separate connection.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xenlab
from xenlab import SHUTDOWN_SUSPEND, sh

from torpor import Host, Torpor
from torpor.intent import read_record

MakeGuest = Callable[..., xenlab.Guest]
TESTS = Path(__file__).resolve().parent.parent
ACK_TIMEOUT = 30.0


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def run_on_terminal(args: list[str], mark: str, *, hold: bool) -> tuple[int, float, str]:
    """``torpor --host xen ARGS`` on a pty; ^C when ``MARK <mark>`` appears.

    Returns (exit status, seconds from ^C to exit, what the terminal showed).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["TORPOR_TEST_MARK_AT"] = mark
    env["TORPOR_TEST_HOLD"] = "1" if hold else ""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor",
            "--host",
            "xen",
            "-p",
            "signal_plugin",
            "--ack-timeout",
            str(ACK_TIMEOUT),
            *args,
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
        preexec_fn=_take_terminal,  # noqa: PLW1509 - an ioctl only
    )
    os.close(slave)
    out = b""
    sent = 0.0
    deadline = time.monotonic() + 300
    try:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, out.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
            if not sent and f"MARK {mark}".encode() in out:
                os.write(master, b"\x03")  # ^C, typed
                sent = time.monotonic()
                deadline = sent + ACK_TIMEOUT + 5 + 10
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = out.decode(errors="replace").replace("\r\n", "\n")
    print(text)
    assert sent, f"the marker never came:\n{text}"
    return code, time.monotonic() - sent, text


@pytest.mark.timeout(900)
def test_ctrl_c_on_a_real_pv_guest_rolls_back_and_exits_130(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, xs: xenlab.XsConn
) -> None:
    g = make_guest("pv")
    d = g.domid
    ctl = f"/local/domain/{d}/control/shutdown"
    before = g.wait_tick()

    # 1. The guest cannot ack (paused): ^C while torpor waits for the ack.
    sh("xl", "pause", str(d))
    code, seconds, text = run_on_terminal(["suspend", str(d)], "suspend:ack", hold=False)
    assert code == 130 and "Traceback" not in text, text
    assert seconds <= ACK_TIMEOUT + 5, seconds
    assert "withdrew the pending suspend request" in text, text
    assert xs.read(ctl) == "", "the request was not withdrawn"
    assert read_record("/var/run/torpor", d) is None
    i = xc.info(d)
    assert i is not None and i.paused and not i.shutdown, i
    sh("xl", "unpause", str(d))
    before = g.wait_tick(after=before.n, timeout=120)

    # 2. The guest acks and suspends while torpor is held in the shutdown phase:
    #    ^C; the rollback resumes it cooperatively, in the same domain.
    code, seconds, text = run_on_terminal(["suspend", str(d)], "suspend:shutdown", hold=True)
    assert code == 130 and "Traceback" not in text, text
    assert seconds <= ACK_TIMEOUT + 5, seconds
    assert "resumed it cooperatively" in text, text
    assert "(domain state: running)" in text, text
    i = xc.info(d)
    assert i is not None and not i.shutdown and not i.paused, i
    assert xs.read(ctl) in ("", None)
    assert read_record("/var/run/torpor", d) is None
    after = g.wait_tick(after=before.n, timeout=120)
    assert after.uptime > before.uptime and g.console().count("TORPOR-GUEST boot") == 1

    # Usable again: XS_RESUME re-armed @releaseDomain, so a suspend is noticed.
    with Torpor(Host.xen(), own_host=True) as t:
        assert t.suspend(d).state == "suspended"
        i = xc.info(d)
        assert i is not None and i.shutdown_reason == SHUTDOWN_SUSPEND, i
        t.resume(d)
    g.wait_tick(after=after.n, timeout=120)
    assert (
        re.search(r"TORPOR-GUEST boot", g.console()) and g.console().count("TORPOR-GUEST boot") == 1
    )

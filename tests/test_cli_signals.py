"""Ctrl-C and SIGTERM through a real terminal: the signal matrix.

Each case runs the installed CLI (``python -m torpor``) on a pseudo-terminal
that is its controlling terminal, as a person at a shell runs it, against a
``torpor sim`` daemon.  The moment to signal comes from the CLI itself (a
marker the ``signal_plugin`` prints when a phase starts, or a result line),
never from a sleep.  SIGINT is sent as a typed ^C (the terminal's line
discipline turns it into SIGINT for the foreground process group); SIGTERM
with kill(2).  Afterwards the guest is judged by the simulated host itself,
not by torpor: it runs, its memory holds what its own work wrote,
``control/shutdown`` is empty, no intent record is left, and it can be
suspended again (xenstored's ``@releaseDomain`` latch re-armed).

``TORPOR_RELIABILITY_REPORT=docs/reliability.md`` writes the signal matrix
into that file (``make reliability``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from reliability_report import write_section

from torpor.facade import Torpor
from torpor.host import Host
from torpor.hypervisor.remote import RemoteHypervisor
from torpor.intent import read_record
from torpor.model import Timeouts
from torpor.xenstore import Xenstore
from torpor_sim import daemon

HERE = Path(__file__).parent
ACK_TIMEOUT = 10.0
BOUND = ACK_TIMEOUT + 5.0  # the bound: the ack deadline plus 5 s


@attrs.frozen
class Case:
    name: str
    kind: str  # simulated guest type
    command: tuple[str, ...]  # after ``torpor``; {d} is the domid
    mark: str = ""  # operation:phase whose start is the moment to signal
    hold: bool = False  # hold the phase until interrupted
    misbehave: str = ""
    suspended_first: bool = False
    wait_for: str = ""  # else: a regex on the terminal output that is the moment
    domains: int = 1


CASES = (
    Case("suspend before the request", "pv", ("suspend", "{d}"), "suspend:request", hold=True),
    Case("suspend, ack pending", "pv", ("suspend", "{d}"), "suspend:ack", misbehave="never_ack"),
    Case("suspend, slow ack", "pv", ("suspend", "{d}"), "suspend:ack", misbehave="slow_ack=5"),
    Case("suspend, acked, shutting down", "pv", ("suspend", "{d}"), "suspend:shutdown", hold=True),
    Case(
        "suspend, after shutdown before the device model",
        "pvhvm",
        ("suspend", "{d}"),
        "suspend:device-model-suspend",
        hold=True,
    ),
    Case(
        "checkpoint session",
        "pv",
        ("checkpoint", "{d}", "--count", "50", "--interval", "100"),
        wait_for=r"checkpoint 1/50",
    ),
    Case(
        "resume, device model",
        "pvhvm",
        ("resume", "{d}"),
        "resume:device-model-resume",
        hold=True,
        suspended_first=True,
    ),
    Case(
        "resume, before xc_domain_resume",
        "pv",
        ("resume", "{d}"),
        "resume:resume",
        hold=True,
        suspended_first=True,
    ),
    Case(
        "resume, before XS_RESUME",
        "pv",
        ("resume", "{d}"),
        "resume:xs-resume",
        hold=True,
        suspended_first=True,
    ),
    Case(
        "resume, verifying",
        "pv",
        ("resume", "{d}"),
        "resume:verify",
        hold=True,
        suspended_first=True,
    ),
    Case(
        "suspend of three domains, acks pending",
        "pv",
        ("suspend", "{d}", "{d1}", "{d2}"),
        misbehave="slow_ack=5",
        domains=3,
    ),
)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _layout() -> dict[tuple[str, str], list[int]]:
    """Fresh guests for every (case, signal), domids in order."""
    out: dict[tuple[str, str], list[int]] = {}
    domid = 1
    for sig in SIGNALS:
        for case in CASES:
            out[(case.name, sig.name)] = list(range(domid, domid + case.domains))
            domid += case.domains
    return out


LAYOUT = _layout()


@pytest.fixture(scope="module")
def sim_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ts", dir="/tmp")
    kinds: list[str] = []
    misbehave: dict[int, str] = {}
    for sig in SIGNALS:
        for case in CASES:
            for domid in LAYOUT[(case.name, sig.name)]:
                kinds.append(case.kind)
                if case.misbehave:
                    misbehave[domid] = case.misbehave
    daemon.start(d, kinds, misbehave, qemu=False, timeout=120)
    yield d
    daemon.stop(d)
    shutil.rmtree(d, ignore_errors=True)


_rows: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    target = os.environ.get("TORPOR_RELIABILITY_REPORT")
    if target and _rows:
        lines = [
            "| case | signal | phase | exit | time (s) | left (observed) | torpor said | "
            "what the rollback did |",
            "|---|---|---|---|---|---|---|---|",
        ]
        order = {c.name: i for i, c in enumerate(CASES)}
        for r in sorted(_rows, key=lambda r: (order[r["case"]], r["signal"])):
            lines.append(
                f"| {r['case']} | {r['signal']} | {r['phase']} | {r['exit']} | "
                f"{r['seconds']:.2f} | {r['left']} | {r['said']} | {r['actions']} |"
            )
        lines.append("")
        lines.append(
            f"{len(_rows)} cells; bound on each: exit within the ack deadline "
            f"({ACK_TIMEOUT:g} s here) plus 5 s of the signal."
        )
        write_section(target, "signal-matrix", "\n".join(lines))


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """``torpor ...`` on a pseudo-terminal that is its controlling terminal."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,  # its own session, whose controlling terminal...
            # ...is the pty, as a login shell's is (an ioctl only: no lock to deadlock on)
            preexec_fn=_take_terminal,  # noqa: PLW1509
            close_fds=True,
        )
        os.close(slave)
        self.out = b""

    def _read(self, deadline: float) -> bool:
        """Read what is there (waiting until ``deadline``); False at EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        ready, _, _ = select.select([self.master], [], [], remaining)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the other side closed
            return False
        if not data:
            return False
        self.out += data
        return True

    def expect(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            if time.monotonic() >= deadline or not self._read(deadline):
                raise AssertionError(f"{pattern!r} not seen; terminal said:\n{self.text}")

    def wait(self, timeout: float) -> int:
        """Read to EOF, then the exit status (-signal if killed)."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            if time.monotonic() >= deadline:
                self.proc.kill()
                raise AssertionError(f"no exit within {timeout}s; terminal said:\n{self.text}")
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))

    def interrupt(self, sig: signal.Signals) -> None:
        if sig == signal.SIGINT:
            os.write(self.master, b"\x03")  # ^C, as typed
        else:
            self.proc.send_signal(sig)

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def torpor_argv(sim_dir: str, case: Case, domids: list[int]) -> list[str]:
    names = {"d": domids[0], "d1": domids[-2] if len(domids) > 1 else 0, "d2": domids[-1]}
    words = [w.format(**names) for w in case.command]
    return [
        sys.executable,
        "-m",
        "torpor",
        "--host",
        f"sim:{sim_dir}",
        "-p",
        "signal_plugin",
        *words,
        # only commands that ask a guest to suspend take it
        *(["--ack-timeout", str(ACK_TIMEOUT)] if words[0] != "resume" else []),
    ]


def cli_env(case: Case) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["TORPOR_TEST_MARK_AT"] = case.mark
    env["TORPOR_TEST_HOLD"] = "1" if case.hold else ""
    env.pop("TORPOR_HOST", None)
    return env


def truth(sim_dir: str, domid: int) -> dict[str, Any]:
    """What the simulated host says of a domain, read directly."""
    with contextlib.closing(RemoteHypervisor(f"{sim_dir}/hypervisor.sock")) as hv:
        rows = {r["domid"]: r for r in hv.call("sim_status")}
        report = hv.call("sim_guest", domid=domid)
    with Xenstore(f"{sim_dir}/xenstored/socket").connect() as xs:
        shutdown = xs.read_or(f"/local/domain/{domid}/control/shutdown", None)
    intent = read_record(f"{sim_dir}/locks", domid)
    return {
        "state": rows[domid]["state"],
        "memory_consistent": report["memory_consistent"],
        "shutdown": shutdown,
        "intent": intent,
    }


def toolstack(sim_dir: str) -> Torpor:
    return Torpor(Host.sim(sim_dir), own_host=True, timeouts=Timeouts(suspend=5.0))


def requests_pending(sim_dir: str, domids: list[int], timeout: float) -> None:
    """Wait (on xenstore watches) until every domain has a suspend request pending."""
    deadline = time.monotonic() + timeout
    with Xenstore(f"{sim_dir}/xenstored/socket").connect() as xs:
        for d in domids:
            xs.wait(
                f"/local/domain/{d}/control/shutdown",
                lambda v: v == "suspend",
                timeout=max(deadline - time.monotonic(), 0.1),
            )


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_signal(sim_dir: str, case: Case, sig: signal.Signals) -> None:
    domids = LAYOUT[(case.name, sig.name)]
    if case.suspended_first:
        with toolstack(sim_dir) as t:
            for d in domids:
                t.suspend(d)
    term = Terminal(torpor_argv(sim_dir, case, domids), cli_env(case))
    try:
        if case.mark:
            term.expect(re.escape(f"MARK {case.mark}"), timeout=30)
        elif case.wait_for:
            term.expect(case.wait_for, timeout=30)
        else:
            requests_pending(sim_dir, domids, timeout=30)
        t0 = time.monotonic()
        term.interrupt(sig)
        code = term.wait(timeout=BOUND + 10)
        seconds = time.monotonic() - t0
    finally:
        term.close()
    text = term.text
    assert "Traceback" not in text, text
    assert code == 128 + sig, text
    assert seconds <= BOUND, (seconds, text)
    said = re.findall(r"\(domain state: ([^)]*)\)", text)
    actions = re.findall(r"interrupted \(\w+\) (?:in phase [\w-]+|between \w+): ([^;]*)", text)
    phase = re.findall(r"interrupted \(\w+\) (in phase [\w-]+|between \w+)", text)
    for d in domids:
        seen = truth(sim_dir, d)
        assert seen["state"] == "running", (d, seen, text)
        assert seen["memory_consistent"] is True, (d, seen)
        assert seen["shutdown"] in ("", None), (d, seen)
        assert seen["intent"] is None, (d, seen)
    if said:  # torpor's report must match what is there
        assert set(said) == {"running"}, text
    _rows.append(
        {
            "case": case.name,
            "signal": sig.name,
            "phase": ", ".join(sorted(p.removeprefix("in phase ") for p in set(phase))),
            "exit": code,
            "seconds": seconds,
            "left": "running",
            "said": ", ".join(sorted(set(said))) or "(no domain was in flight)",
            "actions": "; ".join(sorted(set(actions))) or "-",
        }
    )
    if case.misbehave:
        return  # a guest that does not (quickly) ack cannot show the next suspend
    with toolstack(sim_dir) as t:  # usable again: the next suspend is noticed
        for d in domids:
            t.suspend(d)
            t.resume(d)


@pytest.fixture(scope="module")
def hang_dir() -> Iterator[str]:
    """One PV guest that acks and then never suspends (its tasks will not freeze)."""
    d = tempfile.mkdtemp(prefix="th", dir="/tmp")
    daemon.start(d, ["pv"], {1: "ack_then_hang"}, qemu=False, timeout=60)
    yield d
    daemon.stop(d)
    shutil.rmtree(d, ignore_errors=True)


def test_a_second_signal_exits_at_once_naming_what_is_left(hang_dir: str) -> None:
    """The first ^C starts the rollback, which waits (settle) for the acked guest
    to suspend; the second exits at once, saying what is left and how to fix it."""
    case = Case("second signal", "pv", ("suspend", "1"), "suspend:shutdown")
    term = Terminal(torpor_argv(hang_dir, case, [1]), cli_env(case))
    try:
        term.expect(re.escape("MARK suspend:shutdown"), timeout=30)
        term.interrupt(signal.SIGINT)
        term.expect("rolling back what is in flight", timeout=10)
        t0 = time.monotonic()
        term.interrupt(signal.SIGINT)
        code = term.wait(timeout=10)
        seconds = time.monotonic() - t0
    finally:
        term.close()
    text = term.text
    assert code == 130 and "Traceback" not in text, text
    assert seconds < 2.0, (seconds, text)  # at once: not the 5 s settle wait
    assert "`torpor recover 1`" in text and "left unfinished" in text, text
    with toolstack(hang_dir) as t:
        st = t.status(1)
        assert st["intent"] is not None and st["intent_alive"] is False
        assert t.recover(1).state == "running"
    seen = truth(hang_dir, 1)
    assert seen["state"] == "running" and seen["intent"] is None, seen

"""What ``torpor`` shows while it works, as a user sees it: each command a real process
(``python -m torpor``) against a ``torpor sim`` daemon, its output read as it comes.

* On a pseudo-terminal, several domains: one live line per domain in flight with
  its phase, rewritten in place (rich), and what a long wait waits for; each
  domain's result once.
* On pipes: each domain's result on stdout as it finishes (not all at the end),
  read incrementally with timestamps; stderr says only what long waits wait for.
* ``recover`` of a guest whose torpor was killed while waiting for its ack says
  what it waits for.

The daemon's guests: 1 and 6 well-behaved; 2, 3 and 5 never acknowledge (with
``--ack-timeout 3`` a deterministic three-second ack phase, then a withdrawn
request); 4 acknowledges and then never suspends (``--suspend-timeout 3``: a
three-second shutdown phase).  Every wait below is a select() on the process's
output with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import attrs
import pytest

from torpor.hypervisor.remote import RemoteHypervisor
from torpor.intent import read_record
from torpor.model import Phase, SuspendMethod, Timeouts
from torpor.progress import Reporter
from torpor.xenstore import Xenstore
from torpor_sim import daemon

FAST, MUTE, MUTE2, HANGS, MUTE3, FAST2, HANGS2 = 1, 2, 3, 4, 5, 6, 7
DEADLINE = 60.0  # for any one command
SLOW = ["--ack-timeout", "3", "--suspend-timeout", "3"]


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="tg", dir="/tmp")
    try:
        daemon.start(
            d,
            ["pv"] * 7,
            {
                MUTE: "never_ack",
                MUTE2: "never_ack",
                HANGS: "ack_then_hang",
                MUTE3: "never_ack",
                HANGS2: "ack_then_hang",
            },
            qemu=False,
        )
        yield d
    finally:
        daemon.stop(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def witness(host: str) -> Iterator[tuple[RemoteHypervisor, Xenstore]]:
    hv = RemoteHypervisor(os.path.join(host, "hypervisor.sock"))
    xs = Xenstore(os.path.join(host, "xenstored", "socket")).connect()
    yield hv, xs
    xs.close()
    hv.close()


def torpor(host: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torpor", "--host", f"sim:{host}", *args]


def back_to_running(host: str, hv: RemoteHypervisor, *domids: int) -> None:
    """Resume what a test suspended; every guest of the module is running afterwards."""
    suspended = [d for d in domids if hv.domain_info(d).state_word() == "suspended"]
    if suspended:
        r = subprocess.run(
            torpor(host, "resume", *map(str, suspended)),
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert r.returncode == 0, r
    assert all(hv.domain_info(d).state_word() == "running" for d in domids)


@attrs.define
class Timed:
    """A finished process's output lines, each with when it arrived (s after start)."""

    code: int
    exited: float
    out: list[tuple[float, str]]
    err: list[tuple[float, str]]

    def first(self, stream: str, needle: str) -> float:
        lines = self.out if stream == "out" else self.err
        return next(t for t, line in lines if needle in line)


def run_piped(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr on pipes (read them with :func:`read_piped`)."""
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def read_piped(
    proc: subprocess.Popen[bytes], *, stop_at: str | None = None, t0: float | None = None
) -> Timed:
    """Read the process's stdout and stderr as they come, a line at a time, with the
    time each line arrived; until both close (or a stderr line contains ``stop_at``)."""
    assert proc.stdout is not None and proc.stderr is not None
    t0 = time.monotonic() if t0 is None else t0
    names = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
    partial = {"out": b"", "err": b""}
    lines: dict[str, list[tuple[float, str]]] = {"out": [], "err": []}
    while names:
        left = t0 + DEADLINE - time.monotonic()
        ready, _, _ = select.select(list(names), [], [], max(left, 0))
        assert ready, f"no output for {DEADLINE:g}s: {lines}"
        for fd in ready:
            chunk = os.read(fd, 65536)
            now = time.monotonic() - t0
            name = names[fd]
            if not chunk:
                del names[fd]
                continue
            partial[name] += chunk
            while b"\n" in partial[name]:
                line, partial[name] = partial[name].split(b"\n", 1)
                lines[name].append((now, line.decode()))
                if stop_at is not None and name == "err" and stop_at in line.decode():
                    return Timed(-1, now, lines["out"], lines["err"])
    code = proc.wait(DEADLINE)
    return Timed(code, time.monotonic() - t0, lines["out"], lines["err"])


def run_on_pty(argv: list[str], *, columns: int = 200) -> tuple[int, list[tuple[float, bytes]]]:
    """Run ``argv`` with stdin, stdout and stderr on a new pseudo-terminal (``columns``
    wide); its exit code and every chunk it wrote, with when it arrived."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    chunks: list[tuple[float, bytes]] = []
    try:
        while True:
            left = t0 + DEADLINE - time.monotonic()
            ready, _, _ = select.select([master], [], [], max(left, 0))
            assert ready, f"no output for {DEADLINE:g}s: {b''.join(c for _, c in chunks)!r}"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every slave end is closed, the process is gone
                break
            if not chunk:
                break
            chunks.append((time.monotonic() - t0, chunk))
    finally:
        os.close(master)
    return proc.wait(DEADLINE), chunks


# --------------------------------------------------------------------------- terminal


def test_on_a_terminal_each_domain_in_flight_has_a_live_line_rewritten_in_place(
    host: str, witness: tuple[RemoteHypervisor, Xenstore]
) -> None:
    hv, _ = witness
    try:
        code, chunks = run_on_pty(torpor(host, "suspend", str(FAST), str(MUTE), str(MUTE2), *SLOW))
        text = b"".join(c for _, c in chunks).decode(errors="replace")
        assert code == 1, text  # domain 1 suspended, the two mute ones refused
        assert "Traceback" not in text
        # Both mute guests in flight at once: their two live lines in one frame.
        frame = re.compile(
            rf"domain ({MUTE}|{MUTE2}): suspend: ack \(\d+\.\ds\)[^\r\n]*\r\n"
            rf"domain ({MUTE}|{MUTE2}): suspend: ack \(\d+\.\ds\)"
        )
        assert frame.search(text), text
        # ... rewritten in place (cursor up, erase line), the time in the phase going on.
        assert "\x1b[1A\x1b[2K" in text
        seen = {float(s) for s in re.findall(rf"domain {MUTE}: suspend: ack \((\d+\.\d)s\)", text)}
        assert len(seen) >= 3 and max(seen) >= 2.0, seen
        # After a second, the line says what it waits for, with the deadline.
        wait = "waiting up to 3s for the guest to acknowledge the suspend request"
        when = next(t for t, c in chunks if b"suspend: ack (" in c and wait.encode() in c)
        assert when >= 1.0
        assert re.search(rf"domain {MUTE}: suspend: ack \([12]\.\ds\) -- {wait}", text), text
        # One report per domain: each result line once.
        assert text.count(f"domain {FAST}: suspend ok via xenstore") == 1
        for d in (MUTE, MUTE2):
            assert text.count(f"domain {d}: suspend FAILED: [domain {d}, phase ack]") == 1
        # The live lines are gone at the end (transient); the cursor is visible again.
        assert text.rstrip("\r\n").endswith("\x1b[2K") and "\x1b[?25h" in text
        assert hv.domain_info(FAST).state_word() == "suspended"
        assert all(hv.domain_info(d).state_word() == "running" for d in (MUTE, MUTE2))
    finally:
        back_to_running(host, hv, FAST, MUTE, MUTE2)


def test_on_a_terminal_one_domain_shows_its_phases_as_lines(
    host: str, witness: tuple[RemoteHypervisor, Xenstore]
) -> None:
    hv, _ = witness
    try:
        code, chunks = run_on_pty(torpor(host, "suspend", str(FAST)))
        text = b"".join(c for _, c in chunks).decode(errors="replace")
        assert code == 0, text
        lines = text.replace("\r\n", "\n").splitlines()
        phases = [ln for ln in lines if ln.startswith(f"domain {FAST}: suspend: ")]
        assert phases[:2] == [
            f"domain {FAST}: suspend: validate ...",
            f"domain {FAST}: suspend: request ...",
        ]
        assert [ln for ln in lines if "suspend ok" in ln] == [lines[-1]]
        assert "\x1b[" not in text  # no live display for one domain: rich not even loaded
    finally:
        back_to_running(host, hv, FAST)


# --------------------------------------------------------------------------- pipes


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_not_on_a_terminal_each_result_is_on_stdout_as_the_domain_finishes(
    host: str, witness: tuple[RemoteHypervisor, Xenstore], as_json: bool
) -> None:
    hv, _ = witness
    slow = HANGS if as_json else MUTE
    try:
        extra = ["--json"] if as_json else []
        proc = run_piped(torpor(host, "suspend", str(FAST), str(slow), *SLOW, *extra))
        run = read_piped(proc)
        assert run.code == 1, run
        assert len(run.out) == 2, run.out  # one line per domain, on stdout only
        (fast_at, fast_line), (slow_at, slow_line) = run.out
        # The fast domain's line came as it finished: seconds before the slow one's
        # (its ack or shutdown phase lasts 3 s), and before the process ended.
        assert slow_at - fast_at >= 2.0, run
        assert run.exited - fast_at >= 2.0, run
        if as_json:
            first, second = json.loads(fast_line), json.loads(slow_line)
            assert (first["domid"], first["ok"]) == (FAST, True)
            assert (second["domid"], second["ok"], second["phase"]) == (slow, False, "shutdown")
            assert run.err == []  # --json: nothing on stderr
        else:
            assert fast_line.startswith(f"domain {FAST}: suspend ok via xenstore")
            assert slow_line.startswith(
                f"domain {slow}: suspend FAILED: [domain {slow}, phase ack]"
            )
            # stderr: what the long wait waited for, once, after a second; nothing else.
            want = f"domain {slow}: suspend: waiting up to 3s for the guest to acknowledge"
            assert [line for _, line in run.err] == [want + " the suspend request"], run.err
            assert 1.0 <= run.first("err", want) < slow_at
    finally:
        back_to_running(host, hv, FAST, slow)


def test_a_long_shutdown_phase_says_what_it_waits_for(
    host: str, witness: tuple[RemoteHypervisor, Xenstore]
) -> None:
    hv, _ = witness
    proc = run_piped(torpor(host, "suspend", str(HANGS), *SLOW))
    run = read_piped(proc)
    assert run.code == 3, run
    assert [line for _, line in run.err] == [
        f"domain {HANGS}: suspend: waiting up to 3s for the domain to shut down with reason suspend"
    ]
    assert hv.domain_info(HANGS).state_word() == "running"


def test_one_fast_domain_on_pipes_prints_its_result_and_nothing_else(
    host: str, witness: tuple[RemoteHypervisor, Xenstore]
) -> None:
    hv, _ = witness
    try:
        run = read_piped(run_piped(torpor(host, "suspend", str(FAST))))
        assert run.code == 0
        assert [line.split(" in ")[0] for _, line in run.out] == [
            f"domain {FAST}: suspend ok via xenstore: suspended, now suspended"
        ]
        assert run.err == []
    finally:
        back_to_running(host, hv, FAST)


def test_plain_commands_do_not_import_rich(host: str) -> None:
    code = (
        "import sys\n"
        "from torpor.cli import main\n"
        f"codes = [main(['--host', 'sim:{host}', *a.split()]) for a in sys.argv[1:]]\n"
        "print(codes, 'rich' in sys.modules)\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "list",
            "status 1",
            "plugins",
            f"suspend {FAST} {FAST2}",
            f"resume {FAST} {FAST2}",
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert r.returncode == 0, r
    assert r.stdout.splitlines()[-1] == "[0, 0, 0, 0, 0] False", r


# --------------------------------------------------------------------------- recover


def _killed_while(host: str, domid: int, waiting: str) -> None:
    """``torpor suspend DOMID`` SIGKILLed once it says ``waiting``."""
    victim = run_piped(torpor(host, "suspend", str(domid)))
    try:
        read_piped(victim, stop_at=waiting)
    finally:
        victim.kill()
        victim.wait(DEADLINE)
        assert victim.stdout is not None and victim.stderr is not None
        victim.stdout.close()
        victim.stderr.close()


def test_recover_withdraws_a_request_nobody_took_without_waiting(
    host: str, witness: tuple[RemoteHypervisor, Xenstore]
) -> None:
    """torpor SIGKILLed while it waits for a mute guest's ack leaves the request
    pending and its intent record; ``recover`` withdraws the request in a
    transaction -- the guest never took it, so no suspend can be under way and
    there is nothing to wait for."""
    hv, xs = witness
    shutdown = f"/local/domain/{MUTE3}/control/shutdown"
    _killed_while(
        host, MUTE3, f"domain {MUTE3}: suspend: waiting up to 30s for the guest to acknowledge"
    )
    assert xs.read_or(shutdown, "") == "suspend"

    run = read_piped(run_piped(torpor(host, "recover", str(MUTE3))))
    assert run.code == 0, run
    assert run.err == [], run.err  # nothing to wait for, so nothing said
    lines = [line for _, line in run.out]
    assert lines[0].startswith(f"domain {MUTE3}: recover ok (cooperative): recovered, now running")
    assert "  withdrew the pending suspend request" in lines[1:]
    # What the host says, not what torpor says.
    assert xs.read_or(shutdown, "") == ""
    assert hv.domain_info(MUTE3).state_word() == "running"
    assert read_record(f"{host}/locks", MUTE3) is None


def test_recover_after_an_ack_says_what_it_waits_for(
    host: str, witness: tuple[RemoteHypervisor, Xenstore]
) -> None:
    """torpor SIGKILLed after the guest took the request: the guest may be on
    its way to suspending, so ``recover`` waits ``Timeouts.settle`` (5 s) for it
    -- and says so after a second."""
    hv, _xs = witness
    _killed_while(
        host,
        HANGS2,
        f"domain {HANGS2}: suspend: waiting up to 60s for the domain to shut down",
    )
    run = read_piped(run_piped(torpor(host, "recover", str(HANGS2))))
    assert run.code == 0, run
    want = f"domain {HANGS2}: recover: waiting up to 5s for a suspend already under way"
    assert [line for _, line in run.err] == [want], run.err
    assert 1.0 <= run.first("err", want) < run.out[0][0]
    lines = [line for _, line in run.out]
    assert lines[0].startswith(f"domain {HANGS2}: recover ok (cooperative): recovered, now running")
    assert hv.domain_info(HANGS2).state_word() == "running"
    assert read_record(f"{host}/locks", HANGS2) is None


# --------------------------------------------------------------------------- the timers


class _Stream:
    """A text stream whose writes resolve a future (the loop's own thread writes)."""

    def __init__(self) -> None:
        self.text = ""
        self.written: asyncio.Future[str] | None = None

    def write(self, s: str) -> int:
        self.text += s
        if self.written is not None and not self.written.done() and s.strip():
            self.written.set_result(s)
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _ctx(operation: str, domid: int = 7, **timeouts: float) -> Any:
    return SimpleNamespace(
        operation=operation,
        domid=domid,
        timeouts=Timeouts(**timeouts),
        method=SuspendMethod.XENSTORE,
        # recover (and a rollback) wait for a suspend they did not start
        facts={"settling": True} if operation == "recover" else {},
    )


@pytest.mark.parametrize(
    ("operation", "phase", "timeouts", "line"),
    [
        (
            "suspend",
            Phase.ACK,
            {"ack": 30},
            "domain 7: suspend: waiting up to 30s for the guest to acknowledge the suspend request",
        ),
        (
            "checkpoint",
            Phase.SHUTDOWN,
            {"suspend": 60},
            "domain 7: checkpoint: waiting up to 60s for the domain to shut down with reason "
            "suspend",
        ),
        (
            "recover",
            Phase.SHUTDOWN,
            {"settle": 5},
            "domain 7: recover: waiting up to 5s for a suspend already under way",
        ),
    ],
)
def test_a_phase_still_running_after_the_delay_says_once_what_it_waits_for(
    operation: str, phase: Phase, timeouts: dict[str, float], line: str
) -> None:
    async def scenario() -> str:
        err = _Stream()
        rep = Reporter(err=err, out=_Stream(), notice_after=0.01)
        err.written = asyncio.get_running_loop().create_future()
        ctx = _ctx(operation, **timeouts)
        rep.torpor_phase_started(ctx=ctx, phase=phase)
        await asyncio.wait_for(err.written, DEADLINE)
        rep.torpor_phase_finished(ctx=ctx, phase=phase, seconds=1.0, error=None)
        return err.text

    assert asyncio.run(scenario()) == line + "\n"


def test_a_phase_that_ends_in_time_says_nothing() -> None:
    async def scenario() -> str:
        err = _Stream()
        rep = Reporter(err=err, out=_Stream(), notice_after=0.01)
        loop = asyncio.get_running_loop()
        ctx = _ctx("suspend")
        rep.torpor_phase_started(ctx=ctx, phase=Phase.ACK)
        rep.torpor_phase_finished(ctx=ctx, phase=Phase.ACK, seconds=0.001, error=None)
        # Timers fire in deadline order: once a later one has, the notice's would have.
        later = loop.create_future()
        loop.call_later(0.05, later.set_result, None)
        await later
        return err.text

    assert asyncio.run(scenario()) == ""


def test_results_are_printed_once_per_domain_of_the_reported_operation() -> None:
    from torpor.errors import AckTimeout
    from torpor.model import Result

    async def scenario() -> tuple[str, str, dict[int, bool]]:
        out, err = _Stream(), _Stream()
        rep = Reporter(operation="suspend", err=err, out=out)
        ok = Result(domid=7, operation="suspend", guest_type="pv", outcome="suspended",
                    state="suspended")  # fmt: skip
        rep.torpor_after_suspend(ctx=_ctx("suspend"), result=ok)
        rep.torpor_after_suspend(ctx=_ctx("suspend"), result=ok)  # once only
        rep.torpor_after_suspend(ctx=_ctx("checkpoint", 8), result=ok)  # not this command's
        bad = AckTimeout("no ack", domid=9, phase=Phase.ACK, state="running")
        rep.torpor_operation_failed(ctx=_ctx("suspend", 9), error=bad)
        return out.text, err.text, rep.reported

    out, err, reported = asyncio.run(scenario())
    assert out.splitlines() == [
        "domain 7: suspend ok: suspended, now suspended in 0.0 ms []",
        "domain 9: suspend FAILED: [domain 9, phase ack] no ack (domain state: running)",
    ]
    assert err == "" and reported == {7: True, 9: False}

"""Live migration's downtime on real Xen, torpor vs. xl (issue 15, item 4).

In the lab's dom0 a PVH and a PVHVM guest tick every 50 ms on their console
(``torpor.tick=0.05``); dom0 timestamps each tick line as it arrives
(inotify on xenconsoled's logs, ``time.monotonic``).  A migration's
*downtime* is the largest gap between two consecutive ticks while it ran --
from the last tick printed in the source domain to the first in the new one
-- and its *total* the wall clock of the command.  Each guest moves to
``localhost`` by

* ``torpor migrate DOMID --to localhost`` with xl's ``migrate-receive`` at
  the other end (``--ssh-command`` running it here: no sshd in the lab) --
  the same receiver as xl's, so the two senders are compared;
* ``xl migrate -s ... NAME localhost`` (xl to xl);
* ``torpor migrate`` to ``torpor migrate-receive`` (torpor both ends);

alternated, five runs each; medians.  Then a PVH guest that rewrites 64 MiB
of its memory in a loop (an initramfs appended to the lab's, see
:func:`dirty_initrd`) migrates live with torpor and with xl and non-live with
torpor: precopy never converges, stops at its iteration bound, and the
downtime is the stop-and-copy of the working set -- bounded, and below the
non-live one, which copies everything with the guest stopped.

Nothing here asserts a time: the numbers go to ``<results>/bench-xen-migrate.json``
and `make bench-xen` renders them in docs/performance.md.
"""

from __future__ import annotations

import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xenlab
from importtime import slowest_imports  # bench/, on sys.path by bench/xen/conftest.py
from xenlab import CONSOLE_DIR, LAB_DIR, RUN_DIR, sh

RUNS = int(os.environ.get("TORPOR_BENCH_MIGRATE_RUNS", "5"))
DIRTY_RUNS = int(os.environ.get("TORPOR_BENCH_MIGRATE_DIRTY_RUNS", "3"))
TICK = 0.05
PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
SELF = "sh -c 'shift; exec \"$@\"' sh"  # `ssh localhost` without an sshd
TORPOR_RECEIVE = f"sh -c 'exec {PY} -m torpor --host xen migrate-receive' sh"
_TICK_LINE = re.compile(rb"TORPOR-TICK n=(\d+) uptime=([\d.]+)\r?\n")

MakeGuest = Callable[..., xenlab.Guest]
_OUT: dict[str, Any] = {}


def save() -> None:
    out = os.environ.get("TORPOR_LAB_OUT")
    if out:
        Path(out, "bench-xen-migrate.json").write_text(json.dumps(_OUT, indent=1) + "\n")


class TickClock:
    """When each of a guest's ticks reached dom0: xenconsoled's logs for its name
    (``NAME`` and every ``NAME--incoming`` domain), read as they grow."""

    def __init__(self, name: str, consoles: xenlab.ConsoleDir) -> None:
        self.paths = [
            CONSOLE_DIR / f"guest-{name}.log",
            CONSOLE_DIR / f"guest-{name}--incoming.log",
        ]
        self.consoles = consoles
        self.offset = {p: (p.stat().st_size if p.exists() else 0) for p in self.paths}
        self.partial = {p: b"" for p in self.paths}
        #: tick number -> (arrival in dom0, the guest's uptime)
        self.ticks: dict[int, tuple[float, float]] = {}

    def read(self) -> None:
        now = time.monotonic()
        for p in self.paths:
            try:
                with p.open("rb") as f:
                    f.seek(self.offset[p])
                    data = f.read()
            except FileNotFoundError:
                continue
            self.offset[p] += len(data)
            buf = self.partial[p] + data
            end = buf.rfind(b"\n") + 1
            self.partial[p] = buf[end:]
            for n, up in _TICK_LINE.findall(buf[:end]):
                self.ticks.setdefault(int(n), (now, float(up)))

    def pump(self, timeout: float, *also: int) -> list[int]:
        """Wait for a log to grow (or ``also`` to be readable); read what is new."""
        r, _, _ = select.select([self.consoles.fd, *also], [], [], max(timeout, 0.0))
        if self.consoles.fd in r:
            try:
                while os.read(self.consoles.fd, 65536):
                    pass
            except BlockingIOError:
                pass
        self.read()
        return [fd for fd in also if fd in r]

    def last(self) -> int:
        return max(self.ticks, default=0)

    def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.last() < n:
            left = deadline - time.monotonic()
            assert left > 0, f"no tick {n} within {timeout}s (last {self.last()})"
            self.pump(left)


class CommandFailed(AssertionError):
    """A migration command exited non-zero, or its guest never ticked again
    after it succeeded (``after_success``); when, for the crash check."""

    def __init__(self, msg: str, started: float, after_success: bool = False) -> None:
        super().__init__(msg)
        self.started = started
        self.after_success = after_success


def run_timed(
    cmd: list[str], clock: TickClock, timeout: float = 600, keep_stderr: bool = False
) -> dict[str, Any]:
    """Run a migration command, reading ticks while it runs; its wall time, the
    tick gap it caused (dom0 arrival and guest uptime) and its output (its
    stderr too, as ``_stderr``, with ``keep_stderr``)."""
    before = clock.last()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        pidfd = os.pidfd_open(proc.pid)
        try:
            while proc.poll() is None:
                assert time.monotonic() - t0 < timeout, f"{cmd} still runs after {timeout}s"
                clock.pump(5.0, pidfd)
        finally:
            os.close(pidfd)
        total = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise CommandFailed(f"{cmd} -> {proc.returncode}\n{stdout}{stderr}", t0)
    try:
        clock.wait_for(clock.last() + 2, timeout=60)  # it runs again: two new ticks
    except AssertionError as silent:
        raise CommandFailed(f"{cmd} -> 0, then {silent}", t0, after_success=True) from None
    gaps = [
        (clock.ticks[n + 1][0] - clock.ticks[n][0], clock.ticks[n + 1][1] - clock.ticks[n][1], n)
        for n in range(before, clock.last())
        if n in clock.ticks and n + 1 in clock.ticks
    ]
    gap, uptime_gap, at = max(gaps)
    result: dict[str, Any] = {
        "total": round(total, 3),
        "downtime": round(gap, 3),
        "guest_downtime": round(uptime_gap, 3),
        "gap_at_tick": at,
    }
    lines = stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        got = json.loads(lines[-1])
        result["torpor"] = {
            k: got.get(k)
            for k in ("downtime", "rounds", "precopy", "live", "phases", "live_refusal")
            if k in got
        }
    if keep_stderr:
        result["_stderr"] = stderr
    return result


def now_domid(name: str) -> int:
    return int(sh("xl", "domid", name).strip())


def ways(name: str) -> dict[str, Callable[[], list[str]]]:
    def torpor(ssh: str, *more: str) -> Callable[[], list[str]]:
        head = [PY, "-m", "torpor", "--host", "xen", "--json", "migrate"]
        return lambda: [
            *head,
            str(now_domid(name)),
            "--to",
            "localhost",
            "--ssh-command",
            ssh,
            *more,
        ]

    return {
        "torpor": torpor(SELF),
        "xl": lambda: ["xl", "migrate", "-s", SELF, name, "localhost"],
        "torpor_to_torpor": torpor(TORPOR_RECEIVE),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    return {
        "n": len(runs),
        "downtime_median": med("downtime"),
        "guest_downtime_median": med("guest_downtime"),
        "total_median": med("total"),
        "runs": runs,
    }


def follow(g: xenlab.Guest) -> None:
    g.domid = now_domid(g.name)
    g.console_log = CONSOLE_DIR / f"guest-{g.name}--incoming.log"


#: guests that may crash on their own in one test before it fails
MAX_CRASHES = 3


def crashed_guest(
    g: xenlab.Guest, xc: xenlab.XenCtrl, clock: TickClock, failed: CommandFailed, how: str
) -> dict[str, Any]:
    """Whether a migration failed, or its guest fell silent after it, because the
    guest had crashed; the crash's record, or the failure re-raised.

    Under the lab's nested TCG, HVM-container guest kernels now and then
    triple-fault (tests/xen/xenlab.py: a PVH kernel's PIT calibration at
    boot).  Seen in this bench: a PVH guest in the domain ``xl create`` built,
    before its first migration had stopped it; a PVHVM guest 30 s after an
    xl -> xl migration; another 9 s after a torpor -> torpor one, its vCPU
    dumped with Xen's own CS:RIP (e008:ffff82d0...) as the guest's state.
    A torpor command was running, or had just run, each time -- as one is
    for most of a series -- so the record names the command and when the
    last tick came.  But xl alone does it too once dom0 is busy
    (experiment_guest_crashes.py: 2 of 22 xl migrations with two CPU
    burners in dom0, 0 of 20 without).
    A crash is told apart from a migration that lost or doubled a guest by
    what the hypervisor says: exactly one domain of the name, shut down with
    reason reboot, crash or watchdog (never suspend: that one a sender left
    behind), with ``xl dmesg``'s lines about it kept.
    """
    names = sh("xl", "list").split()
    if any(f"{g.name}--" in n for n in names):  # an incoming or migrated-away copy left
        raise failed
    g.domid = now_domid(g.name)  # the domain of the name now, whoever built it
    info = xc.info(g.domid)
    if info is None or not info.shutdown or info.shutdown_reason not in (1, 3, 4):
        raise failed
    last = clock.ticks.get(clock.last())
    domid = info.domid
    hv_log = [
        line
        for line in sh("xl", "dmesg").splitlines()
        if f"d{domid}v" in line or f"Dom{domid} " in line or f"HVM{domid} " in line
    ]
    return {
        "sender": how,
        "domid": domid,
        # the command had succeeded: the guest died in its new domain
        "after_success": failed.after_success,
        "reason": xenlab.SHUTDOWN_NAMES.get(info.shutdown_reason, info.shutdown_reason),
        # where in the command the guest's last tick came: < 0, before it began
        "last_tick_into_command_s": round(last[0] - failed.started, 3) if last else None,
        "last_tick_uptime": last[1] if last else None,
        "hypervisor_log": hv_log[-8:],
        "command": str(failed).splitlines()[1:4],
    }


def ticking(make_guest: MakeGuest, kind: str, **kw: Any) -> tuple[xenlab.Guest, TickClock]:
    g = make_guest(kind, extra_cmdline=f"torpor.tick={TICK}", **kw)
    clock = TickClock(g.name, g.consoles)
    clock.read()
    clock.wait_for(clock.last() + 3, timeout=60)
    return g, clock


def alternate(
    make_guest: MakeGuest,
    xc: xenlab.XenCtrl,
    kind: str,
    ways_of: Callable[[str], list[tuple[str, Callable[[], list[str]]]]],
    n: int,
    crashes: list[dict[str, Any]],
    keep_stderr: bool = False,
    **kw: Any,
) -> dict[str, list[dict[str, Any]]]:
    """``n`` rounds of every way, alternated; a guest that crashes on its own
    is recorded in ``crashes`` and replaced by a new one, and the round goes on."""
    g, clock = ticking(make_guest, kind, **kw)
    order = ways_of(g.name)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k, _ in order}
    for i in range(n):
        for j in range(len(order)):
            how = order[(i + j) % len(order)][0]
            while True:
                cmd = dict(ways_of(g.name))[how]
                try:
                    runs[how].append(run_timed(cmd(), clock, keep_stderr=keep_stderr))
                except CommandFailed as failed:
                    crashes.append(crashed_guest(g, xc, clock, failed, how) | {"run": i})
                    assert len(crashes) <= MAX_CRASHES, f"guests crashed {len(crashes)}: {crashes}"
                    make_guest.__self__.destroy(g)  # type: ignore[attr-defined]
                    g, clock = ticking(make_guest, kind, **kw)
                    continue
                follow(g)
                break
    return runs


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("kind", ["pvh", "pvhvm"])
def test_downtime_torpor_vs_xl(make_guest: MakeGuest, xc: xenlab.XenCtrl, kind: str) -> None:
    crashes: list[dict[str, Any]] = []
    runs = alternate(make_guest, xc, kind, lambda name: list(ways(name).items()), RUNS, crashes)
    _OUT.setdefault("machine", {"dom0_python": platform.python_version(), "tick_s": TICK})
    sums = {k: summary(v) for k, v in runs.items()}
    _OUT[kind] = {
        **sums,
        "memory_mib": 256,
        "downtime_ratio_torpor_vs_xl": round(
            sums["torpor"]["downtime_median"] / sums["xl"]["downtime_median"], 3
        ),
        "total_ratio_torpor_vs_xl": round(
            sums["torpor"]["total_median"] / sums["xl"]["total_median"], 3
        ),
        "guest_crashes": crashes,
    }
    save()


def dirty_initrd(mib: int) -> Path:
    """The lab's guest initramfs with a second cpio appended (the kernel unpacks
    both; later files win): ``/init`` starts a loop that rewrites ``mib`` MiB of
    memory (``dd`` over a file in the RAM root) for ever, then runs the lab's
    own init, kept as ``/init.lab``."""
    wrapper = (
        "#!/bin/busybox sh\n"
        f"( while :; do /bin/busybox dd if=/dev/zero of=/dirty bs=1048576 count={mib} "
        "conv=notrunc 2>/dev/null; done ) &\n"
        "exec /bin/busybox sh /init.lab\n"
    ).encode()
    files = [
        ("init", wrapper, 0o100755),
        ("init.lab", (REPO / "lab/guest/init").read_bytes(), 0o100755),
    ]
    archive = bytearray()
    for ino, (name, data, mode) in enumerate([*files, ("TRAILER!!!", b"", 0)], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        archive += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        archive += b"\0" * (-len(archive) % 4) + data
        archive += b"\0" * (-len(archive) % 4)
    base = (LAB_DIR / "guest-initrd.img").read_bytes()
    out = RUN_DIR / f"dirty-{mib}-initrd.img"
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base + b"\0" * (-len(base) % 4) + bytes(archive))
    return out


@pytest.mark.timeout(3600)
def test_a_guest_dirtying_fast_precopy_bounds_the_downtime(
    make_guest: MakeGuest, xc: xenlab.XenCtrl
) -> None:
    mib = 64

    def dirty_ways(name: str) -> list[tuple[str, Callable[[], list[str]]]]:
        w = ways(name)
        return [
            ("torpor_live", w["torpor"]),
            ("xl_live", w["xl"]),
            ("torpor_non_live", lambda: [*w["torpor"](), "--no-live"]),
        ]

    crashes: list[dict[str, Any]] = []
    runs = alternate(
        make_guest,
        xc,
        "pvh",
        dirty_ways,
        DIRTY_RUNS,
        crashes,
        overrides={"ramdisk": f'"{dirty_initrd(mib)}"'},
    )
    _OUT["dirty_pvh"] = {k: summary(v) for k, v in runs.items()} | {
        "memory_mib": 256,
        "dirty_mib": mib,
        "guest_crashes": crashes,
    }
    save()


def _short(file: str) -> str:
    """A source file's name, with its package's for an ``__init__.py``."""
    path = Path(file)
    return f"{path.parent.name}/{path.name}" if path.name == "__init__.py" else path.name


def _profile_rows(path: Path, top: int = 30) -> list[dict[str, Any]]:
    """The ``top`` functions by cumulative time in a cProfile dump, without
    the import machinery's and the interpreter's own frames (they would fill
    the list: imports are counted apart, by ``-X importtime``)."""
    import pstats

    stats = pstats.Stats(str(path))
    rows = []
    table = stats.stats  # type: ignore[attr-defined]
    for (file, line, func), (_cc, nc, tt, ct, _callers) in table.items():
        if file.startswith("<frozen") or func == "<built-in method builtins.exec>":
            continue
        rows.append(
            {
                "function": f"{_short(file)}:{line}({func})" if file != "~" else func,
                "calls": nc,
                "own_ms": round(tt * 1000, 1),
                "cumulative_ms": round(ct * 1000, 1),
            }
        )
    rows.sort(key=lambda r: -r["cumulative_ms"])
    return rows[:top]


@pytest.mark.timeout(1800)
def test_anatomy_of_a_torpor_migration(make_guest: MakeGuest, xc: xenlab.XenCtrl) -> None:
    """Where a ``torpor migrate --to localhost`` spends the time it does not
    report in a phase: one plain run (its wall clock and phases), one under
    ``-X importtime`` (the imports, grouped), one under cProfile (the rest,
    by function).  Not counted in the medians above."""
    crashes: list[dict[str, Any]] = []
    profile = RUN_DIR / "migrate.prof"
    RUN_DIR.mkdir(parents=True, exist_ok=True)

    def anatomy_ways(name: str) -> list[tuple[str, Callable[[], list[str]]]]:
        plain = ways(name)["torpor"]
        return [
            ("plain", plain),
            ("importtime", lambda: [PY, "-X", "importtime", *plain()[1:]]),
            ("cprofile", lambda: [PY, "-m", "cProfile", "-o", str(profile), *plain()[1:]]),
        ]

    runs = alternate(make_guest, xc, "pvh", anatomy_ways, 1, crashes, keep_stderr=True)
    plain = runs["plain"][0]
    phases = (plain.get("torpor") or {}).get("phases") or []
    in_phases = sum(t for _name, t in phases)
    _OUT["anatomy_pvh"] = {
        "total_s": plain["total"],
        "in_phases_s": round(in_phases, 3),
        "outside_phases_s": round(plain["total"] - in_phases, 3),
        "phases": phases,
        "imports_ms": slowest_imports(runs["importtime"][0]["_stderr"]),
        "profile_total_s": runs["cprofile"][0]["total"],
        "profile": _profile_rows(profile),
        "guest_crashes": crashes,
    }
    save()

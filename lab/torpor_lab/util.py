"""Phase reporting, bounded subprocesses and the lab's one error type."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


class LabError(Exception):
    """Why the lab could not run; printed as is, so it must read well."""


def log(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


def fmt_s(seconds: float) -> str:
    if seconds >= 60:
        return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"
    return f"{seconds:.1f}s"


class Phases:
    """Times each phase of a run and prints it as it starts and ends."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.done: list[tuple[str, float, str]] = []

    @contextlib.contextmanager
    def phase(self, name: str, what: str = "") -> Iterator[dict[str, str]]:
        note: dict[str, str] = {}
        log(f"{name}: {what}" if what else f"{name} ...")
        start = time.monotonic()
        try:
            yield note
        except BaseException:
            took = time.monotonic() - start
            self.done.append((name, took, "FAILED"))
            log(f"{name}: failed after {fmt_s(took)}")
            raise
        took = time.monotonic() - start
        self.done.append((name, took, note.get("result", "")))
        extra = f" ({note['result']})" if note.get("result") else ""
        log(f"{name}: done in {fmt_s(took)}{extra}")

    def record(self, name: str, seconds: float, result: str = "") -> None:
        self.done.append((name, seconds, result))

    def total(self) -> float:
        return time.monotonic() - self.t0

    def table(self) -> str:
        lines = ["timings:"]
        for name, took, result in self.done:
            lines.append(f"  {name:<10} {fmt_s(took):>9}  {result}")
        lines.append(f"  {'total':<10} {fmt_s(self.total()):>9}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {
            "phases": [{"name": n, "seconds": round(t, 2), "result": r} for n, t, r in self.done],
            "total_seconds": round(self.total(), 2),
        }


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    logfile: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    what: str | None = None,
) -> str:
    """Run a command to completion within `timeout` seconds; return its output.

    Output goes to `logfile` (appended) as well, so a failed build can be read
    in full; the error carries its tail.
    """
    argv = [os.fspath(c) for c in cmd]
    label = what or " ".join(argv[:3])
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise LabError(f"{label}: command not found: {argv[0]}") from e
    except subprocess.TimeoutExpired as e:
        out = (e.output or b"").decode(errors="replace")
        _append(logfile, argv, out)
        raise LabError(f"{label}: still running after {timeout:.0f}s, stopped\n{tail(out)}") from e
    out = proc.stdout.decode(errors="replace")
    _append(logfile, argv, out)
    if proc.returncode != 0:
        where = f" (full log: {logfile})" if logfile else ""
        raise LabError(f"{label}: exit status {proc.returncode}{where}\n{tail(out)}")
    return out


def _append(logfile: Path | None, argv: list[str], out: str) -> None:
    if logfile is None:
        return
    with logfile.open("a") as f:
        f.write(f"$ {' '.join(argv)}\n{out}\n")


def is_root() -> bool:
    return os.geteuid() == 0


def die(msg: str, code: int = 2) -> None:
    print(f"[lab] ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)

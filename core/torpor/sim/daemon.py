"""``torpor sim start``'s daemon: one simulated host in its own process.

The parent (:func:`start`) spawns ``python -m torpor.sim.daemon`` in a new
session, hands it the write end of a pipe, and waits on the read end: the
daemon writes one JSON line (its guests) once every guest has booted, or the
reason it could not start.  No polling, no sleeps.  The daemon holds an
exclusive ``flock`` on ``DIR/sim.lock`` for its whole life: a second start on
the same DIR is refused, and :func:`stop` knows the host is gone when it can
take the lock.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from torpor.errors import BackendUnavailable, TorporError, UsageError
from torpor.sim.guest import Behaviour

__all__ = ["parse_guests", "parse_misbehaviours", "start", "stop"]

LOCK = "sim.lock"
PIDFILE = "sim.pid"
LOGFILE = "sim.log"


def parse_guests(spec: str) -> list[str]:
    """``pv:2,pvhvm:1,hvm:1`` -> ``["pv", "pv", "pvhvm", "hvm"]`` (domids 1, 2, ...)."""
    from torpor.sim.host import GUEST_KINDS

    kinds: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, count = part.partition(":")
        if kind not in GUEST_KINDS:
            raise UsageError(
                f"unknown guest type {kind!r} in --guests (known: {', '.join(GUEST_KINDS)})"
            )
        try:
            n = int(count or 1)
        except ValueError:
            raise UsageError(f"bad count {count!r} for {kind} in --guests") from None
        if not 0 <= n <= 4096:
            raise UsageError(f"guest count {n} out of range")
        kinds.extend([kind] * n)
    return kinds


def parse_misbehaviours(items: list[str]) -> dict[int, str]:
    """``["2=never_ack", "3=slow_ack=1.5"]`` -> ``{2: "never_ack", 3: "slow_ack=1.5"}``."""
    out: dict[int, str] = {}
    for item in items:
        domid_s, sep, what = item.partition("=")
        if not sep or not domid_s.isdigit():
            raise UsageError(f"--misbehave takes DOMID=NAME, not {item!r}")
        try:
            Behaviour.parse(what)
        except ValueError as e:
            raise UsageError(str(e)) from None
        out[int(domid_s)] = what
    return out


def _lock(directory: Path) -> int:
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = (directory / PIDFILE).read_text().strip() if (directory / PIDFILE).exists() else "?"
        raise UsageError(
            f"a simulated host is already running in {directory} (pid {pid}); "
            f"stop it with `torpor sim stop --dir {directory}`"
        ) from None
    return fd


def start(
    directory: str | os.PathLike[str],
    guests: list[str],
    misbehave: dict[int, str] | None = None,
    *,
    qemu: bool | None = None,
    freeze_time: float = 0.0,
    frontends: bool = True,
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """Start a simulated host daemon in ``directory``; return its guests once booted."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.close(_lock(d))  # refuse early, with the holder's pid, if one runs
    r, w = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "torpor.sim.daemon",
        "--dir",
        str(d),
        "--ready-fd",
        str(w),
        "--guests",
        ",".join(guests),
    ]
    for domid, what in (misbehave or {}).items():
        argv += ["--misbehave", f"{domid}={what}"]
    if qemu is not None:
        argv += ["--qemu" if qemu else "--no-qemu"]
    if freeze_time:
        argv += ["--freeze-time", str(freeze_time)]
    if not frontends:
        argv += ["--no-frontends"]
    with open(d / LOGFILE, "ab") as logf:
        proc = subprocess.Popen(
            argv,
            pass_fds=(w,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
    os.close(w)
    result: list[Any] = []
    done = threading.Event()

    def reader() -> None:
        with os.fdopen(r, "rb") as f:
            result.append(f.readline())
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(timeout):
        proc.kill()
        raise TorporError(f"simulated host did not come up within {timeout:g}s; see {d / LOGFILE}")
    line = result[0]
    if not line:
        proc.wait(10)
        tail = _tail(d / LOGFILE)
        raise TorporError(
            f"simulated host exited during start-up (status {proc.returncode}):\n{tail}"
        )
    msg = json.loads(line)
    if "error" in msg:
        raise UsageError(msg["error"])
    guests_out: list[dict[str, Any]] = msg["guests"]
    return guests_out


def stop(directory: str | os.PathLike[str], *, timeout: float = 30.0) -> bool:
    """Ask the daemon in ``directory`` to stop; wait until it has. False if none ran."""
    from torpor.hypervisor.remote import RemoteHypervisor

    d = Path(directory)
    try:
        hv = RemoteHypervisor(str(d / "hypervisor.sock"), timeout=timeout)
    except BackendUnavailable:
        return False
    with contextlib.closing(hv):
        hv.call("sim_stop")
    fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    got = threading.Event()

    def take() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the daemon exits
        got.set()

    threading.Thread(target=take, daemon=True).start()
    ok = got.wait(timeout)
    if ok:
        os.close(fd)
    if not ok:
        raise TorporError(f"simulated host in {d} did not stop within {timeout:g}s")
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torpor.sim.daemon")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--guests", default="")
    ap.add_argument("--misbehave", action="append", default=[])
    ap.add_argument("--qemu", dest="qemu", action="store_true", default=None)
    ap.add_argument("--no-qemu", dest="qemu", action="store_false")
    ap.add_argument("--freeze-time", type=float, default=0.0)
    ap.add_argument("--no-frontends", dest="frontends", action="store_false", default=True)
    args = ap.parse_args(argv)
    ready = os.fdopen(args.ready_fd, "w")
    d = Path(args.dir)

    def fail(message: str) -> int:
        ready.write(json.dumps({"error": message}) + "\n")
        ready.close()
        return 1

    try:
        lock_fd = _lock(d)
    except UsageError as e:
        return fail(str(e))
    (d / PIDFILE).write_text(f"{os.getpid()}\n")
    from torpor.sim.host import SimHost

    host = SimHost(d, qemu=args.qemu, name=d.name)
    stop_now = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_now.set())
    signal.signal(signal.SIGINT, lambda *_: stop_now.set())
    try:
        host.start()
        kinds = parse_guests(args.guests)
        misbehave = parse_misbehaviours(args.misbehave)
        base = {"freeze_time": args.freeze_time}
        if not args.frontends:
            base["frontends"] = ()
        for i, kind in enumerate(kinds, start=1):
            beh = Behaviour.parse(misbehave[i], **base) if i in misbehave else Behaviour(**base)
            domid = host.create_guest(kind, behaviour=beh)
            if domid != i:
                raise TorporError(f"guest {i} got domid {domid}")
        guests = [s.to_dict() for s in host.status()]
    except TorporError as e:
        host.stop()
        return fail(str(e))
    ready.write(json.dumps({"guests": guests}) + "\n")
    ready.close()

    # Wait for SIGTERM/SIGINT or a client's sim_stop, whichever comes first.
    def relay() -> None:
        host.stop_requested.wait()
        stop_now.set()

    threading.Thread(target=relay, daemon=True).start()
    stop_now.wait()
    host.stop()
    with contextlib.suppress(OSError):
        (d / PIDFILE).unlink()
    os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())

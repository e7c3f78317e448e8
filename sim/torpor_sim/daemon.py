"""``torpor sim start``'s daemon: one simulated host in its own process.

The parent (:func:`start`) spawns ``python -m torpor_sim.daemon`` in a new
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
from torpor_sim.guest import Behaviour

__all__ = [
    "MAX_GUESTS",
    "check_directory",
    "parse_guests",
    "parse_misbehaviour",
    "parse_misbehaviours",
    "parse_seconds",
    "start",
    "stop",
]

LOCK = "sim.lock"
PIDFILE = "sim.pid"
LOGFILE = "sim.log"


#: At most this many guests on one simulated host (domids 1..MAX_GUESTS).
MAX_GUESTS = 4096
#: Bounds of the seconds a misbehaviour (``slow_ack=SECONDS``) or ``--freeze-time`` take.
MAX_GUEST_SECONDS = 3600.0
#: The longest socket path under DIR (``xenstored/domain-32751.sock``); a Unix
#: socket path holds at most 107 bytes (108 with its NUL).
_LONGEST_SOCKET = "/xenstored/domain-32751.sock"
_SUN_PATH_MAX = 107
#: Virtual file systems no simulated host can live in.
_VIRTUAL = ("/proc", "/sys")


def parse_guests(spec: str) -> list[str]:
    """``pv:2,pvhvm:1,hvm:1`` -> ``["pv", "pv", "pvhvm", "hvm"]`` (domids 1, 2, ...).

    :raises UsageError: an unknown type, a malformed count, or more than
        :data:`MAX_GUESTS` guests in all.
    """
    from torpor_sim.host import GUEST_KINDS

    kinds: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, count = part.partition(":")
        if kind not in GUEST_KINDS:
            raise UsageError(
                f"unknown guest type {kind!r} in {spec!r} "
                f"(known: {', '.join(GUEST_KINDS)}; e.g. pv:2,hvm:1)"
            )
        if sep and not (count.isascii() and count.isdigit() and len(count) <= 5):
            raise UsageError(
                f"bad count {count!r} for {kind} in {spec!r}: a number from 0 to {MAX_GUESTS}"
            )
        n = int(count) if sep else 1
        if n > MAX_GUESTS:
            raise UsageError(
                f"bad count {n} for {kind} in {spec!r}: a number from 0 to {MAX_GUESTS}"
            )
        kinds.extend([kind] * n)
        if len(kinds) > MAX_GUESTS:
            raise UsageError(f"{spec!r} asks for more than {MAX_GUESTS} guests in all")
    return kinds


def parse_seconds(text: str, what: str, *, zero: bool, limit: float = MAX_GUEST_SECONDS) -> float:
    """A finite number of seconds from user input, ``0 < s <= limit`` (``0 <=`` if ``zero``)."""
    import math

    bounds = f"from 0 to {limit:g}" if zero else f"greater than 0 and at most {limit:g}"
    expected = f"{what} takes seconds, a finite number {bounds}"
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: {expected}") from None
    if not math.isfinite(value) or value > limit or value < 0 or (value == 0 and not zero):
        raise UsageError(f"invalid {what} {text!r}: {expected}")
    return value


def parse_misbehaviour(item: str) -> tuple[int, str]:
    """``"3=slow_ack=1.5"`` -> ``(3, "slow_ack=1.5")``; the name must be known."""
    from torpor_sim.guest import MISBEHAVIOURS

    domid_s, sep, what = item.partition("=")
    if not sep or not (domid_s.isascii() and domid_s.isdigit() and len(domid_s) <= 5):
        raise UsageError(f"{item!r} is not DOMID=NAME (e.g. 2=never_ack or 3=slow_ack=2)")
    domid = int(domid_s)
    if not 1 <= domid <= MAX_GUESTS:
        raise UsageError(f"{item!r}: domid {domid} is out of range 1..{MAX_GUESTS}")
    name, _, arg = what.partition("=")
    if name not in MISBEHAVIOURS:
        raise UsageError(
            f"{item!r}: unknown misbehaviour {name!r} (known: {', '.join(MISBEHAVIOURS)})"
        )
    if name == "slow_ack":
        if arg:
            parse_seconds(arg, "slow_ack", zero=False)
    elif arg:
        raise UsageError(f"{item!r}: {name} takes no argument")
    try:
        Behaviour.parse(what)
    except ValueError as e:
        raise UsageError(f"{item!r}: {e}") from None
    return domid, what


def parse_misbehaviours(items: list[str], guests: int | None = None) -> dict[int, str]:
    """``["2=never_ack", "3=slow_ack=1.5"]`` -> ``{2: "never_ack", 3: "slow_ack=1.5"}``.

    :param guests: how many guests the host starts with (domids 1..guests):
        a misbehaviour for another domid is refused.
    :raises UsageError: a malformed item, an unknown name, a bad ``slow_ack``,
        a domid given twice or not among the guests.
    """
    out: dict[int, str] = {}
    for item in items:
        domid, what = parse_misbehaviour(item)
        if domid in out:
            raise UsageError(f"--misbehave gives domain {domid} two misbehaviours")
        if guests is not None and domid > guests:
            have = f"domids 1..{guests}" if guests else "no guests"
            raise UsageError(
                f"--misbehave {item!r}: there is no guest {domid} (--guests starts {have})"
            )
        out[domid] = what
    return out


def check_directory(directory: str | os.PathLike[str]) -> Path:
    """The ``--dir`` of a host to start, checked without touching anything.

    It must be a directory or creatable as one (every existing ancestor a
    directory we may write in), not on /proc or /sys, and short enough for
    the Unix sockets that go in it.

    :raises UsageError: saying which of these it is not.
    """
    raw = os.fspath(directory)
    if not raw:
        raise UsageError("the directory is empty: give one for the host's sockets and state")
    path = Path(os.path.abspath(raw))
    real = os.path.realpath(path)
    for top in _VIRTUAL:
        if real == top or real.startswith(top + "/"):
            raise UsageError(
                f"cannot use {raw} for a simulated host: {real} is in the virtual file "
                f"system {top}; give a directory on a real file system (e.g. under /tmp)"
            )
    longest = len(os.fsencode(str(path))) + len(_LONGEST_SOCKET)
    if longest > _SUN_PATH_MAX:
        raise UsageError(
            f"cannot use {raw} for a simulated host: it is too long, its sockets' paths "
            f"would take {longest} bytes, "
            f"Unix sockets allow {_SUN_PATH_MAX}; use a directory of at most "
            f"{_SUN_PATH_MAX - len(_LONGEST_SOCKET)} bytes (e.g. mktemp -d /tmp/hXXXX)"
        )
    # The deepest part of the path that exists must be a directory we may write in.
    cur = path
    while not os.path.lexists(cur):
        cur = cur.parent
    if not cur.is_dir():
        what = "it is not" if cur == path else f"it would be below {cur}, which is not"
        raise UsageError(f"cannot use {raw} for a simulated host: {what} a directory")
    need = os.W_OK | os.X_OK
    if not os.access(cur, need):
        if cur == path:
            raise UsageError(f"cannot use {raw} for a simulated host: no permission to write in it")
        raise UsageError(
            f"cannot use {raw} for a simulated host: no permission to create it in {cur}"
        )
    return path


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
    dirty_rate: float = 0.0,
    dirty_pages: int = 256,
    shadow: bool = True,
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """Start a simulated host daemon in ``directory``; return its guests once booted.

    :raises UsageError: ``directory`` cannot hold a host (:func:`check_directory`),
        or one already runs there.
    """
    d = Path(directory)
    check_directory(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {d} for a simulated host: {e.strerror}") from None
    os.close(_lock(d))  # refuse early, with the holder's pid, if one runs
    r, w = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "torpor_sim.daemon",
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
    if dirty_rate:
        argv += ["--dirty-rate", str(dirty_rate), "--dirty-pages", str(dirty_pages)]
    if not shadow:
        argv += ["--no-shadow"]
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
    ap = argparse.ArgumentParser(prog="python -m torpor_sim.daemon")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--guests", default="")
    ap.add_argument("--misbehave", action="append", default=[])
    ap.add_argument("--qemu", dest="qemu", action="store_true", default=None)
    ap.add_argument("--no-qemu", dest="qemu", action="store_false")
    ap.add_argument("--freeze-time", type=float, default=0.0)
    ap.add_argument("--no-frontends", dest="frontends", action="store_false", default=True)
    ap.add_argument("--dirty-rate", type=float, default=0.0)
    ap.add_argument("--dirty-pages", type=int, default=256)
    ap.add_argument("--no-shadow", dest="shadow", action="store_false", default=True)
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
    from torpor_sim.host import SimHost

    host = SimHost(d, qemu=args.qemu, name=d.name, shadow=args.shadow)
    stop_now = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_now.set())
    signal.signal(signal.SIGINT, lambda *_: stop_now.set())
    try:
        host.start()
        kinds = parse_guests(args.guests)
        misbehave = parse_misbehaviours(args.misbehave, len(kinds))
        base: dict[str, Any] = {"freeze_time": args.freeze_time}
        if args.dirty_rate:
            base.update(dirty_rate=args.dirty_rate, dirty_pages=args.dirty_pages)
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

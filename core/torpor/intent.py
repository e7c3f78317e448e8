"""Intent records: what a torpor process is doing to a domain, kept in its lock file.

While an operation runs, torpor keeps a small JSON record in the domain's
lock file, ``<lock_dir>/domain-<domid>.lock`` (``/var/run/torpor`` in a
dom0: a directory of mode 0700, files of mode 0600, root's only), where a
restarted toolstack (or ``torpor status`` after torpor was killed) finds it::

    {"op": "suspend", "pid": 4242, "host": "dom0", "started": 1764169200.5,
     "method": "xenstore", "requested": true}

``requested`` says the guest was asked (a ``control/shutdown`` request or an
event-channel notification may be outstanding).  The record is cleared when
the operation ends -- unless an interrupted operation could not bring the
guest back, in which case it stays, saying so (``interrupted``, ``phase``,
``left``: the state observed).  One that outlives its process, or is kept
so, is what ``torpor recover`` acts on and then clears.  The truth about the domain
itself always comes from observing it (:meth:`Orchestrator.status`), never
from this record alone.

Why a file and not xenstore: the record is dom0's private bookkeeping, as
libxl keeps its per-domain userdata and lock files on dom0's disk, not in the
store guests share.  Each state change is one ``pwrite()`` on the descriptor
the operation already holds for its ``flock()`` -- no xenstore round trip
(two xenstore requests per operation before), and nothing a guest could
read.  A record is written whole, padded with spaces over a longer
predecessor (no truncation between two writes); a cleared record is
``{"pid": N}`` (who last held the lock, for another process's
:class:`~torpor.errors.DomainBusy` message).  The lock directory is a tmpfs
in a dom0 (``/var/run``): records do not outlive a reboot, as the domains
they describe do not.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["IntentLog", "pid_alive", "read_record", "record_path"]


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_path(lock_dir: str, domid: int) -> str:
    """The file holding domain ``domid``'s lock and intent record."""
    return os.path.join(lock_dir, f"domain-{domid}.lock")


def _parse(raw: bytes) -> dict[str, Any] | None:
    text = raw.decode(errors="replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"op": "unknown", "raw": text[:200]}
    if not isinstance(record, dict):
        return {"op": "unknown", "raw": text[:200]}
    return record if "op" in record else None


def read_record(lock_dir: str, domid: int) -> dict[str, Any] | None:
    """Domain ``domid``'s intent record, or None (no file, or no operation recorded).

    A reader can meet a record half-overwritten (a ``pwrite`` of another
    process is not atomic against ``read``): one that does not parse is read
    again, a few times, before it is reported as ``{"op": "unknown"}``.
    """
    path = record_path(lock_dir, domid)
    record: dict[str, Any] | None = None
    for _ in range(3):
        try:
            with open(path, "rb") as f:
                record = _parse(f.read())
        except FileNotFoundError:
            return None
        if record is None or record.get("op") != "unknown":
            return record
    return record


class IntentLog:
    """Reads and writes one host's intent records, in its per-domain lock files.

    :param lock_dir: the host's lock directory.
    :param lock_fd: the engine's descriptor for a domain's lock file (held open).
    """

    def __init__(self, lock_dir: str, lock_fd: Callable[[int], int]) -> None:
        self.lock_dir = lock_dir
        self._lock_fd = lock_fd
        self._records: dict[int, dict[str, Any]] = {}
        self._kept: set[int] = set()
        self._size: dict[int, int] = {}
        self._host = socket.gethostname()

    def _write(self, domid: int, record: dict[str, Any]) -> None:
        fd = self._lock_fd(domid)
        data = json.dumps(record, separators=(",", ":")).encode()
        size = self._size.get(domid)
        if size is None:
            size = os.fstat(fd).st_size
        # Spaces over what a longer record left (JSON ignores them): one
        # pwrite, never an empty file in between.
        os.pwrite(fd, data.ljust(size), 0)
        self._size[domid] = max(size, len(data))

    async def begin(self, domid: int, op: str, **fields: Any) -> None:
        """Record that ``op`` is about to touch the domain."""
        record = {
            "op": op,
            "pid": os.getpid(),
            "host": self._host,
            "started": round(time.time(), 3),
            **fields,
        }
        self._records[domid] = record
        self._write(domid, record)

    def update(self, domid: int, **fields: Any) -> None:
        record = self._records.get(domid)
        if record is None:
            return
        record.update(fields)
        self._write(domid, record)

    def keep(self, domid: int, **fields: Any) -> None:
        """The operation ends with the guest not back: leave its record, with ``fields``."""
        if domid not in self._records:
            return
        self._kept.add(domid)
        self.update(domid, **fields)

    def end(self, domid: int) -> None:
        """The operation is over: clear its record unless kept."""
        if self._records.pop(domid, None) is None:
            return
        if domid in self._kept:
            self._kept.discard(domid)
            return
        self.idle(domid)

    def idle(self, domid: int) -> None:
        """No operation recorded; this process holds (or last held) the lock."""
        self._write(domid, {"pid": os.getpid()})

    async def read(self, domid: int) -> dict[str, Any] | None:
        return read_record(self.lock_dir, domid)

"""Intent records: what a torpor process is doing to a domain, kept in xenstore.

While an operation runs, torpor keeps a small JSON record at
``/local/domain/0/torpor/intent/<domid>`` -- under dom0's own tree, readable
and writable by dom0 only, where a restarted toolstack (or ``torpor status``
after torpor was killed) finds it::

    {"op": "suspend", "pid": 4242, "host": "dom0", "started": 1764169200.5,
     "method": "xenstore", "requested": true}

``requested`` says the guest was asked (a ``control/shutdown`` request or an
event-channel notification may be outstanding).  The record is removed when
the operation ends, however it ends; one that outlives its process is what
``torpor recover`` acts on and then removes.  The truth about the domain
itself always comes from observing it (:meth:`Orchestrator.status`), never
from this record alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from torpor.errors import TorporError

if TYPE_CHECKING:
    from torpor.host import Host

__all__ = ["INTENT_ROOT", "IntentLog", "pid_alive"]

INTENT_ROOT = "/local/domain/0/torpor/intent"


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IntentLog:
    """Reads and writes intent records for one host's xenstore."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._records: dict[int, dict[str, Any]] = {}
        self._root_ready = False

    def path(self, domid: int) -> str:
        return f"{INTENT_ROOT}/{domid}"

    async def _ensure_root(self) -> None:
        if self._root_ready:
            return
        xs = self.host.xenstore.aio
        root = INTENT_ROOT.rsplit("/", 1)[0]
        await xs.mkdir(INTENT_ROOT)
        # dom0 only: a guest must neither read nor forge what torpor is doing.
        await xs.set_perms(root, ["n0"])
        self._root_ready = True

    async def begin(self, domid: int, op: str) -> None:
        await self._ensure_root()
        record = {
            "op": op,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": round(time.time(), 3),
            "requested": False,
        }
        self._records[domid] = record
        await self.host.xenstore.aio.write(self.path(domid), json.dumps(record))

    async def update(self, domid: int, **fields: Any) -> None:
        record = self._records.get(domid)
        if record is None:
            return
        record.update(fields)
        await self.host.xenstore.aio.write(self.path(domid), json.dumps(record))

    async def end(self, domid: int) -> None:
        self._records.pop(domid, None)
        with contextlib.suppress(TorporError):
            await self.host.xenstore.aio.rm(self.path(domid))

    async def read(self, domid: int) -> dict[str, Any] | None:
        raw = await self.host.xenstore.aio.read_or(self.path(domid), None)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return {"op": "unknown", "raw": raw}
        return record if isinstance(record, dict) else {"op": "unknown", "raw": raw}

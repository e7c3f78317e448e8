"""Intent records: what a torpor process is doing to a domain, kept in xenstore.

While an operation runs, torpor keeps a small JSON record at
``/local/domain/0/torpor/intent/<domid>`` -- under dom0's own tree, readable
and writable by dom0 only, where a restarted toolstack (or ``torpor status``
after torpor was killed) finds it::

    {"op": "suspend", "pid": 4242, "host": "dom0", "started": 1764169200.5,
     "method": "xenstore", "requested": true}

``requested`` says the guest was asked (a ``control/shutdown`` request or an
event-channel notification may be outstanding).  The record is removed when
the operation ends -- unless an interrupted operation could not bring the
guest back, in which case it stays, saying so (``interrupted``, ``phase``,
``left``: the state observed).  One that outlives its process, or is kept
so, is what ``torpor recover`` acts on and then removes.  The truth about the domain
itself always comes from observing it (:meth:`Orchestrator.status`), never
from this record alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from torpor.errors import TorporError

if TYPE_CHECKING:
    from torpor.host import Host

__all__ = ["INTENT_ROOT", "IntentLog", "pid_alive"]

log = logging.getLogger("torpor")

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
    """Reads and writes intent records for one host's xenstore.

    Writes are *sent* at once but not waited for: xenstored handles one
    connection's requests in order, so a record written before the guest is
    touched is in the store before anything that follows it -- and the
    operation does not pay a round trip for it.  Their replies are checked
    when the operation ends (:meth:`end`) or at :meth:`drain`.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self._records: dict[int, dict[str, Any]] = {}
        self._kept: set[int] = set()
        self._inflight: set[asyncio.Future[bytes]] = set()
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
        # Both nodes: xenstored checks a node's own permissions, not its
        # parents', and new records inherit the intent directory's.
        await xs.set_perms(root, ["n0"])
        await xs.set_perms(INTENT_ROOT, ["n0"])
        self._root_ready = True

    def _track(self, fut: asyncio.Future[bytes], what: str) -> None:
        self._inflight.add(fut)

        def done(f: asyncio.Future[bytes]) -> None:
            self._inflight.discard(f)
            if not f.cancelled() and f.exception() is not None:
                log.warning("intent record %s failed: %s", what, f.exception())

        fut.add_done_callback(done)

    async def begin(self, domid: int, op: str, **fields: Any) -> None:
        """Record that ``op`` is about to touch the domain (sent, not awaited)."""
        await self._ensure_root()
        record = {
            "op": op,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": round(time.time(), 3),
            **fields,
        }
        self._records[domid] = record
        self._track(
            self.host.xenstore.aio.write_nowait(self.path(domid), json.dumps(record)),
            f"of domain {domid}",
        )

    def update(self, domid: int, **fields: Any) -> None:
        record = self._records.get(domid)
        if record is None:
            return
        record.update(fields)
        self._track(
            self.host.xenstore.aio.write_nowait(self.path(domid), json.dumps(record)),
            f"of domain {domid}",
        )

    def keep(self, domid: int, **fields: Any) -> None:
        """The operation ends with the guest not back: leave its record, with ``fields``."""
        if domid not in self._records:
            return
        self._kept.add(domid)
        with contextlib.suppress(TorporError):
            self.update(domid, **fields)

    def end(self, domid: int) -> None:
        """The operation is over: remove its record (sent, not awaited) unless kept."""
        if self._records.pop(domid, None) is None:
            return
        if domid in self._kept:
            self._kept.discard(domid)
            return
        with contextlib.suppress(TorporError):
            self._track(
                self.host.xenstore.aio.rm_nowait(self.path(domid)), f"removal for domain {domid}"
            )

    async def drain(self) -> None:
        """Wait for every record write still in flight."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def read(self, domid: int) -> dict[str, Any] | None:
        raw = await self.host.xenstore.aio.read_or(self.path(domid), None)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return {"op": "unknown", "raw": raw}
        return record if isinstance(record, dict) else {"op": "unknown", "raw": raw}

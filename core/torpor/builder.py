"""Domain builders: what saves a suspended domain's state and builds a new domain from it.

This is libxl's and libxenguest's part of save / restore / migration
(``xc_domain_save`` / ``xc_domain_restore``, the xenstore tree, device
backends, the device model): torpor's orchestrator drives the protocol
around it (suspend first, resume after, destroy the source last), a
:class:`DomainBuilder` does the host-specific work.

* :class:`SimBuilder` -- a simulated host in this process;
* :class:`RemoteSimBuilder` -- a ``torpor sim`` daemon, through its
  ``hypervisor.sock`` (the image is streamed in chunks).
"""

from __future__ import annotations

import base64
import io
from typing import Any, Protocol, runtime_checkable

from torpor.image import SavedDomain, decode, encode

__all__ = ["CHUNK", "DomainBuilder", "RemoteSimBuilder", "SimBuilder"]

#: Bytes per chunk when an image crosses a control socket.
CHUNK = 512 * 1024


@runtime_checkable
class DomainBuilder(Protocol):
    """Save a suspended domain; build one from a save; destroy one with its devices."""

    name: str

    def save(self, domid: int) -> SavedDomain:
        """The state of a domain shut down for suspend (xc_domain_save's part)."""
        ...

    def restore(self, saved: SavedDomain) -> int:
        """A new domain from ``saved``: memory, xenstore tree, devices, device model,
        introduced to xenstored, left inside the guest's suspend hypercall so that a
        non-cooperative resume lets it rebuild.  Returns its domid."""
        ...

    def destroy(self, domid: int) -> None:
        """libxl_domain_destroy: the domain, its xenstore tree, backends and device model."""
        ...


class SimBuilder:
    """A :class:`torpor.sim.host.SimHost` in this process."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.name = f"sim:{host.dir}"

    def save(self, domid: int) -> SavedDomain:
        saved: SavedDomain = self.host.save_guest(domid)
        return saved

    def restore(self, saved: SavedDomain) -> int:
        domid: int = self.host.restore_guest(saved)
        return domid

    def destroy(self, domid: int) -> None:
        self.host.destroy_guest(domid)


class RemoteSimBuilder:
    """A ``torpor sim`` daemon; images travel the control socket in chunks."""

    def __init__(self, hypervisor: Any) -> None:
        self.hv = hypervisor
        self.name = f"sim-remote:{hypervisor.path}"

    def save(self, domid: int) -> SavedDomain:
        t = self.hv.call("sim_save", domid=domid)
        tid, size = t["transfer"], int(t["size"])
        buf = io.BytesIO()
        try:
            while buf.tell() < size:
                chunk = base64.b64decode(
                    self.hv.call("transfer_read", transfer=tid, offset=buf.tell(), length=CHUNK)
                )
                if not chunk:
                    break
                buf.write(chunk)
        finally:
            self.hv.call("transfer_close", transfer=tid)
        buf.seek(0)
        return decode(buf)

    def restore(self, saved: SavedDomain) -> int:
        tid = self.hv.call("transfer_open")
        try:
            pending = b""
            for piece in encode(saved):
                pending += piece
                while len(pending) >= CHUNK:
                    self._send(tid, pending[:CHUNK])
                    pending = pending[CHUNK:]
            if pending:
                self._send(tid, pending)
            domid: int = self.hv.call("sim_restore", transfer=tid)
            return domid
        finally:
            self.hv.call("transfer_close", transfer=tid)

    def _send(self, tid: int, data: bytes) -> None:
        self.hv.call("transfer_write", transfer=tid, data=base64.b64encode(data).decode())

    def destroy(self, domid: int) -> None:
        self.hv.call("destroy", domid=domid)

"""Domain builders: what saves a suspended domain's state and builds a new domain from it.

This is libxl's and libxenguest's part of save / restore / migration
(``xc_domain_save`` / ``xc_domain_restore``, the xenstore tree, device
backends, the device model): torpor's orchestrator drives the protocol
around it (suspend first, resume after, destroy the source last), a
:class:`DomainBuilder` does the host-specific work.

* :class:`RemoteSimBuilder` -- a ``torpor sim`` daemon, through its
  ``hypervisor.sock`` (the image is streamed in chunks);
* :class:`torpor.xl.XlBuilder` -- real Xen: a :class:`FileSaver` that writes
  xl's save format with ``xc_domain_save`` and builds domains with libxl.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the image format loads with the first save or restore
    from torpor.image import SavedDomain

__all__ = ["CHUNK", "DomainBuilder", "FileSaver", "RemoteSimBuilder"]

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
        introduced to xenstored, left **paused** with the guest inside its suspend
        hypercall (saved eax 0), as libxl leaves a restored domain.  Returns its domid."""
        ...

    def start(self, domid: int) -> None:
        """libxl_domain_unpause of a restored domain: device model first, then the
        vCPUs; the guest's suspend hypercall returns 0 and it rebuilds."""
        ...

    def destroy(self, domid: int) -> None:
        """libxl_domain_destroy: the domain, its xenstore tree, backends and device model."""
        ...


@runtime_checkable
class FileSaver(Protocol):
    """A builder that writes the save file itself, suspending the guest from inside.

    On real Xen the guest's memory is saved by ``xc_domain_save``, which calls
    the toolstack's suspend as a callback once it is ready for the memory:
    the orchestrator hands :meth:`write_save` a ``suspend`` callable that runs
    torpor's own suspend on its event loop and returns True only once the
    domain is shut down for suspend.
    """

    #: the file format written and read (``"xl"``)
    file_format: str

    def prepare_save(self, domid: int) -> Any:
        """Everything needed before the guest is touched (its configuration);
        fails without side effects."""
        ...

    def write_save(
        self,
        job: Any,
        fd: int,
        suspend: Callable[[], bool],
        device_model_state: Callable[[], bytes | None],
    ) -> None:
        """Write the whole file to ``fd``, calling ``suspend`` from this thread
        at the point the guest must stop; ``device_model_state`` then gives
        QEMU's saved state (HVM)."""
        ...

    def verify_save(self, path: str) -> dict[str, Any]:
        """Read ``path`` back and walk it to its end; ImageError if anything is off."""
        ...

    def restore_file(self, path: str, *, name: str | None = None) -> int:
        """A new domain from the file at ``path``, left paused; returns its domid.

        ``name``: build it under that name rather than the one in the file
        (a copy of the guest: it gets a fresh UUID too)."""
        ...

    def start(self, domid: int) -> None:
        """Unpause a domain :meth:`restore_file` built (device model first)."""
        ...

    def destroy(self, domid: int) -> None:
        """The domain, its xenstore tree, backends and device model."""
        ...


class RemoteSimBuilder:
    """A ``torpor sim`` daemon; images travel the control socket in chunks.

    Live saves read the daemon's memory through it
    (:class:`torpor.livesave.SimMemory`), and a live stream arrives at it
    chunk by chunk as it is produced (:meth:`incoming`).
    """

    def __init__(self, hypervisor: Any) -> None:
        self.hv = hypervisor
        self.name = f"sim-remote:{hypervisor.path}"

    def save(self, domid: int) -> SavedDomain:
        t = self.hv.call("sim_save", domid=domid)
        buf = self._read_transfer(t)
        buf.seek(0)
        from torpor.image import decode

        return decode(buf)

    # -- live saves (torpor.livesave.SimMemory) and arrivals

    def live_refusal(self, domid: int) -> str | None:
        why = self.hv.call("sim_live_refusal", domid=domid)
        return None if why is None else str(why)

    def describe(self, domid: int) -> dict[str, Any]:
        info: dict[str, Any] = self.hv.call("sim_describe", domid=domid)
        return info

    def logdirty(self, domid: int, enable: bool) -> None:
        self.hv.call("logdirty_enable" if enable else "logdirty_disable", domid=domid)

    def dirty_pages(self, domid: int) -> list[int]:
        return [int(p) for p in self.hv.call("logdirty_clean", domid=domid)]

    def pages(self, domid: int, pfns: list[int]) -> bytes:
        t = self.hv.call("sim_read_pages", domid=domid, pfns=pfns)
        return self._read_transfer(t).getvalue()

    def suspended_state(self, domid: int) -> dict[str, Any]:
        state: dict[str, Any] = self.hv.call("sim_suspended_state", domid=domid)
        return state

    def incoming(self) -> Any:
        """A live stream arriving at the daemon chunk by chunk
        (:class:`torpor.livesave.IncomingImage`)."""
        from torpor.livesave import IncomingImage

        tid = self.hv.call("transfer_open")

        def build() -> tuple[int, str, str]:
            got = self.hv.call("sim_restore_stream", transfer=tid)
            return int(got["domid"]), str(got["checksum"]), str(got["memory_checksum"])

        return IncomingImage(
            write_=lambda data: self._send(tid, data),
            build_=build,
            close_=lambda: self.hv.call("transfer_close", transfer=tid),
        )

    def _read_transfer(self, t: dict[str, Any]) -> io.BytesIO:
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
        return buf

    def restore(self, saved: SavedDomain) -> int:
        tid = self.hv.call("transfer_open")
        try:
            pending = b""
            from torpor.image import encode

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

    def start(self, domid: int) -> None:
        self.hv.call("sim_start", domid=domid)

    def destroy(self, domid: int) -> None:
        self.hv.call("destroy", domid=domid)

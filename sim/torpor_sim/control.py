"""The simulated host's hypervisor control socket (``DIR/hypervisor.sock``).

A separate process (torpor's CLI with ``--host sim:DIR``) drives the
simulated hypervisor through this socket, as a dom0 toolstack drives Xen
through ``/dev/xen/privcmd``.  The protocol is newline-delimited JSON:

request   ``{"id": 7, "op": "resume", "args": {"domid": 3, "fast": true}}``
reply     ``{"id": 7, "result": null}`` or
          ``{"id": 7, "error": {"type": "HypervisorError", "errno": 22, "message": "..."}}``

``op`` is a :class:`torpor.hypervisor.Hypervisor` method, or one of the
simulated host's own: ``sim_status`` (one record per guest), ``sim_guest``
(a guest's counters, memory checksum and kernel log), ``sim_stop``.

Event channels: a connection's first ``evtchn_*`` request gives it its own
event-channel handle (as ``xenevtchn_open`` would).  A second connection
that sends ``{"op": "evtchn_attach", "args": {"handle": N}}`` then receives
``{"port": P}`` lines as events arrive on that handle: its descriptor is what
:meth:`Hypervisor.evtchn_fileno` returns to the client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import io
import itertools
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from torpor.errors import HypervisorError, TorporError, UsageError
from torpor.image import decode, encode
from torpor.model import ShutdownReason
from torpor_sim.xen import EvtchnHandle

if TYPE_CHECKING:
    from torpor_sim.host import SimHost

__all__ = ["MAX_LINE", "ControlServer"]

log = logging.getLogger("torpor_sim.control")
#: A request line longer than this is refused and the client dropped
#: (an image chunk, base64, is the longest legitimate one).
MAX_LINE = 1024 * 1024


class ControlServer:
    """Serves ``DIR/hypervisor.sock`` for one :class:`SimHost` (in its loop)."""

    def __init__(self, host: SimHost, on_stop: Callable[[], None] | None = None) -> None:
        self.host = host
        self.on_stop = on_stop
        self.server: asyncio.AbstractServer | None = None
        self.path = ""
        self.handles: dict[int, EvtchnHandle] = {}
        self._ids = itertools.count(1)
        self._writers: set[asyncio.StreamWriter] = set()
        #: image transfers in progress (save images out, restore images in)
        self.transfers: dict[int, bytearray] = {}

    async def start(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.path = path
        self.server = await asyncio.start_unix_server(self._client, path, limit=MAX_LINE)
        os.chmod(path, 0o600)  # privileged operations: dom0's toolstack only

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self._writers):
            w.close()
        for h in list(self.handles.values()):
            self._drop_handle(h)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _drop_handle(self, handle: EvtchnHandle) -> None:
        with contextlib.suppress(Exception):
            self.host.loop.remove_reader(handle.fileno())
        for k, v in list(self.handles.items()):
            if v is handle:
                del self.handles[k]
        if not handle.closed:
            handle.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        handle: EvtchnHandle | None = None
        attached = False
        #: image transfers this client opened: dropped with it (a client killed
        #: mid-save would otherwise leave its image in memory for good)
        owned: set[int] = set()
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(
                        writer,
                        {"id": None, "error": _error_dict(UsageError("request line too long"))},
                    )
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                        raise ValueError("not an object with an 'op'")
                    args = req.get("args") or {}
                    if not isinstance(args, dict):
                        raise ValueError("'args' must be an object")
                except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
                    await self._send(
                        writer,
                        {"id": None, "error": _error_dict(UsageError(f"malformed request: {e}"))},
                    )
                    return
                op, rid = req["op"], req.get("id")
                if op == "evtchn_attach":
                    hid = args.get("handle")
                    target = self.handles.get(hid) if type(hid) is int else None
                    if target is None:
                        await self._send(
                            writer,
                            {
                                "id": rid,
                                "error": _error_dict(
                                    HypervisorError.from_errno(errno.EBADF, op=op)
                                ),
                            },
                        )
                        return
                    await self._send(writer, {"id": rid, "result": None})
                    attached = True
                    self._attach(target, writer)
                    continue
                if op.startswith("evtchn_") and handle is None:
                    handle = self.host.xen.open_evtchn_handle()
                    hid = next(self._ids)
                    self.handles[hid] = handle
                    handle.control_id = hid
                try:
                    result = await self._dispatch(op, args, handle)
                    if op == "transfer_open":
                        owned.add(result)
                    elif op in ("sim_save", "sim_read_pages"):
                        owned.add(result["transfer"])
                    reply: dict[str, Any] = {"id": rid, "result": result}
                except TorporError as e:
                    reply = {"id": rid, "error": _error_dict(e)}
                except (TypeError, ValueError, KeyError, binascii.Error) as e:
                    reply = {"id": rid, "error": _error_dict(UsageError(f"bad arguments: {e}"))}
                await self._send(writer, reply)
                if op == "sim_stop" and self.on_stop is not None:
                    self.on_stop()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            for tid in owned:
                self.transfers.pop(tid, None)
            if handle is not None and not attached:
                self._drop_handle(handle)
            writer.close()

    def _attach(self, handle: EvtchnHandle, writer: asyncio.StreamWriter) -> None:
        loop = self.host.loop

        def pump() -> None:
            while (port := handle.pending()) is not None:
                writer.write(json.dumps({"port": port}).encode() + b"\n")

        loop.add_reader(handle.fileno(), pump)
        pump()

    async def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(json.dumps(msg).encode() + b"\n")
        await writer.drain()

    async def _dispatch(self, op: str, a: dict[str, Any], handle: EvtchnHandle | None) -> Any:
        xen = self.host.xen
        if op == "domain_info_list":
            infos = xen.domain_info_list(
                int(a.get("first_domid", 0)), int(a.get("max_domains", 1024))
            )
            return [attrs.asdict(i) for i in infos]
        if op == "domain_info":
            return attrs.asdict(xen.domain_info(int(a["domid"])))
        if op == "pause":
            return xen.pause(int(a["domid"]))
        if op == "unpause":
            xen.unpause(int(a["domid"]))
            await xen.vcpus_ran()
            return None
        if op == "shutdown":
            return xen.shutdown(int(a["domid"]), ShutdownReason(int(a["reason"])))
        if op == "resume":
            xen.resume(int(a["domid"]), fast=bool(a["fast"]))
            await xen.vcpus_ran()  # the guest's kernel reacts before the reply
            return None
        if op == "destroy":
            return await self.host.destroy_guest_async(int(a["domid"]))
        if op == "get_hvm_param":
            return xen.get_hvm_param(int(a["domid"]), int(a["param"]))
        if op == "set_hvm_param":
            return xen.set_hvm_param(int(a["domid"]), int(a["param"]), int(a["value"]))
        if op == "evtchn_open":
            assert handle is not None
            return handle.control_id
        if op == "evtchn_bind_interdomain":
            assert handle is not None
            return xen.bind_interdomain(handle, int(a["domid"]), int(a["remote_port"]))
        if op == "evtchn_notify":
            assert handle is not None
            return xen.handle_notify(handle, int(a["local_port"]))
        if op == "evtchn_unbind":
            assert handle is not None
            return xen.handle_unbind(handle, int(a["local_port"]))
        if op == "evtchn_unmask":
            assert handle is not None
            return xen.handle_unmask(handle, int(a["local_port"]))
        if op == "evtchn_subscribe":
            return xen.subscribe(int(a["domid"]), int(a["port"]))
        if op == "virt_caps":
            return sorted(xen.virt_caps)
        if op == "sim_status":
            return [s.to_dict() for s in await self.host._status()]
        if op == "sim_guest":
            return await self.host.guest_report(int(a["domid"]))
        if op == "sim_stop":
            return None
        if op == "sim_save":
            saved = await self.host.save_guest_async(int(a["domid"]))
            data = b"".join(encode(saved))
            tid = next(self._ids)
            self.transfers[tid] = bytearray(data)
            return {"transfer": tid, "size": len(data)}
        if op == "transfer_open":
            tid = next(self._ids)
            self.transfers[tid] = bytearray()
            return tid
        if op == "transfer_read":
            buf = self._transfer(a)
            off, length = int(a["offset"]), min(int(a["length"]), MAX_LINE // 2)
            return base64.b64encode(bytes(buf[off : off + length])).decode()
        if op == "transfer_write":
            self._transfer(a).extend(base64.b64decode(a["data"], validate=True))
            return None
        if op == "transfer_close":
            self.transfers.pop(int(a["transfer"]), None)
            return None
        if op == "sim_restore":
            saved = decode(io.BytesIO(bytes(self._transfer(a))))
            return await self.host.restore_guest_async(saved)
        if op == "sim_describe":
            return await self.host.describe_async(int(a["domid"]))
        if op == "sim_live_refusal":
            return self.host.live_refusal(int(a["domid"]))
        if op == "logdirty_enable":
            return xen.logdirty_enable(int(a["domid"]))
        if op == "logdirty_disable":
            return xen.logdirty_disable(int(a["domid"]))
        if op == "logdirty_clean":
            return xen.logdirty_clean(int(a["domid"]))
        if op == "sim_read_pages":
            pfns = a["pfns"]
            if not isinstance(pfns, list) or not all(type(p) is int for p in pfns):
                raise UsageError("pfns must be a list of page numbers")
            data = xen.read_pages(int(a["domid"]), pfns)
            tid = next(self._ids)
            self.transfers[tid] = bytearray(data)
            return {"transfer": tid, "size": len(data)}
        if op == "sim_suspended_state":
            return self.host.suspended_state(int(a["domid"]))
        if op == "sim_restore_stream":
            saved = decode(io.BytesIO(bytes(self._transfer(a))))
            self.transfers.pop(int(a["transfer"]), None)
            domid = await self.host.restore_guest_async(saved)
            return {
                "domid": domid,
                "checksum": saved.checksum(),
                "memory_checksum": saved.memory_checksum(),
            }
        if op == "sim_start":
            await self.host.start_restored_async(int(a["domid"]))
            return None
        raise UsageError(f"unknown operation {op!r}")

    def _transfer(self, a: dict[str, Any]) -> bytearray:
        data = self.transfers.get(int(a["transfer"]))
        if data is None:
            raise UsageError(f"no transfer {a['transfer']!r}")
        return data


def _error_dict(e: TorporError) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(e).__name__, "message": e.message}
    code = getattr(e, "errno", None)
    if code is not None:
        out["errno"] = code
    op = getattr(e, "op", None)
    if op is not None:
        out["op"] = op
    if e.domid is not None:
        out["domid"] = e.domid
    return out

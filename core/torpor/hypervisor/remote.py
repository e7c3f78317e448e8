"""The :class:`~torpor.hypervisor.Hypervisor` Protocol over a simulated host's
``DIR/hypervisor.sock`` (see :mod:`torpor_sim.control` for the protocol).

This is what torpor's CLI uses with ``--host sim:DIR``: another process owns
the simulated hypervisor, as Xen owns the real one.  Every call has a
deadline; a dead or garbled socket is a clear error, never a hang.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import threading
import time
from collections import deque
from typing import Any

import attrs

from torpor.errors import BackendUnavailable, HypervisorError, TorporError, UsageError
from torpor.model import DomainInfo, ShutdownReason

__all__ = ["RemoteHypervisor"]

_MAX_REPLY = 16 * 1024 * 1024


class RemoteHypervisor:
    """A simulated host's hypervisor, driven from another process.

    :param path: the host's ``hypervisor.sock``.
    :param timeout: the deadline of every call, in seconds.
    """

    name = "sim-remote"

    def __init__(self, path: str, *, timeout: float = 10.0, lock_dir: str | None = None) -> None:
        self.path = path
        self.lock_dir = lock_dir
        self.timeout = timeout
        self._lock = threading.Lock()
        self._ids = 0
        self._sock = self._connect()
        self._buf = b""
        self._events: socket.socket | None = None
        self._event_buf = b""
        self._pending: deque[int] = deque()

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise BackendUnavailable(
                f"no simulated host answers at {self.path}: {e.strerror or e}"
                " (start one with `torpor sim start --dir DIR`)",
                cause=e,
            ) from e
        return s

    def _readline(self, sock: socket.socket, buf: bytes, deadline: float) -> tuple[bytes, bytes]:
        # The deadline is the whole reply's: a peer trickling a byte now and then
        # must not keep a per-recv() timeout from ever expiring.
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
            except TimeoutError as e:
                raise HypervisorError(
                    f"simulated host did not answer within {self.timeout:g}s",
                    errno=errno.ETIMEDOUT,
                    cause=e,
                ) from e
            except OSError as e:
                raise BackendUnavailable(f"simulated host connection failed: {e}", cause=e) from e
            if not chunk:
                raise BackendUnavailable(f"simulated host at {self.path} closed the connection")
            buf += chunk
            if len(buf) > _MAX_REPLY:
                raise HypervisorError("simulated host sent an oversized reply", errno=errno.EPROTO)
        line, _, rest = buf.partition(b"\n")
        return line, rest

    def call(self, op: str, **args: Any) -> Any:
        """One request/response exchange; raises the error the host reported."""
        with self._lock:
            self._ids += 1
            rid = self._ids
            msg = json.dumps({"id": rid, "op": op, "args": args}).encode() + b"\n"
            try:
                self._sock.sendall(msg)
            except OSError as e:
                raise BackendUnavailable(f"simulated host connection failed: {e}", cause=e) from e
            deadline = time.monotonic() + self.timeout
            while True:
                line, self._buf = self._readline(self._sock, self._buf, deadline)
                reply = _parse(line, op)
                got = reply.get("id")
                if type(got) is int and got < rid:
                    continue  # the late reply of an earlier call that timed out
                if got is None and "error" in reply:
                    raise _error_from(reply["error"], op)  # our request was refused as such
                if type(got) is not int or got != rid:
                    raise _garbled(f"reply {line[:200]!r} does not answer request {rid}", op)
                break
        err = reply.get("error")
        if err is not None:
            raise _error_from(err, op)
        return reply.get("result")

    # -- the Protocol --------------------------------------------------------

    def domain_info_list(self, first_domid: int = 0, max_domains: int = 1024) -> list[DomainInfo]:
        rows = self.call("domain_info_list", first_domid=first_domid, max_domains=max_domains)
        if not isinstance(rows, list):
            raise _garbled(f"domain_info_list answered {rows!r}"[:200], "domain_info_list")
        return [_domain_info(row, "domain_info_list") for row in rows]

    def domain_info(self, domid: int) -> DomainInfo:
        return _domain_info(self.call("domain_info", domid=domid), "domain_info")

    def pause(self, domid: int) -> None:
        self.call("pause", domid=domid)

    def unpause(self, domid: int) -> None:
        self.call("unpause", domid=domid)

    def shutdown(self, domid: int, reason: ShutdownReason) -> None:
        self.call("shutdown", domid=domid, reason=int(reason))

    def resume(self, domid: int, *, fast: bool) -> None:
        self.call("resume", domid=domid, fast=fast)

    def destroy(self, domid: int) -> None:
        self.call("destroy", domid=domid)

    def get_hvm_param(self, domid: int, param: int) -> int:
        return _u64(self.call("get_hvm_param", domid=domid, param=param), "get_hvm_param")

    def set_hvm_param(self, domid: int, param: int, value: int) -> None:
        self.call("set_hvm_param", domid=domid, param=param, value=value)

    def _event_socket(self) -> socket.socket:
        if self._events is None:
            handle = self.call("evtchn_open")
            s = self._connect()
            s.sendall(
                json.dumps({"id": 0, "op": "evtchn_attach", "args": {"handle": handle}}).encode()
                + b"\n"
            )
            try:
                line, self._event_buf = self._readline(s, b"", time.monotonic() + self.timeout)
                reply = _parse(line, "evtchn_attach")
            except TorporError:
                s.close()
                raise
            if reply.get("error"):
                s.close()
                raise _error_from(reply["error"], "evtchn_attach")
            s.setblocking(False)
            self._events = s
        return self._events

    def evtchn_bind_interdomain(self, domid: int, remote_port: int) -> int:
        self._event_socket()
        port = self.call("evtchn_bind_interdomain", domid=domid, remote_port=remote_port)
        return _port(port, "evtchn_bind_interdomain")

    def evtchn_notify(self, local_port: int) -> None:
        self.call("evtchn_notify", local_port=local_port)

    def evtchn_unbind(self, local_port: int) -> None:
        self.call("evtchn_unbind", local_port=local_port)

    def evtchn_subscribe(self, domid: int, port: int) -> None:
        self.call("evtchn_subscribe", domid=domid, port=port)

    def evtchn_fileno(self) -> int:
        return self._event_socket().fileno()

    def evtchn_pending(self) -> int | None:
        s = self._event_socket()
        # Bounded: a peer that never stops sending must not keep this call reading.
        for _ in range(16):
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                raise BackendUnavailable("simulated host closed the event-channel stream")
            self._event_buf += chunk
        while b"\n" in self._event_buf:
            line, _, self._event_buf = self._event_buf.partition(b"\n")
            event = _parse(line, "evtchn_pending")
            self._pending.append(_port(event.get("port"), "evtchn_pending"))
        if len(self._event_buf) > 65536:
            raise _garbled("event-channel line without an end", "evtchn_pending")
        return self._pending.popleft() if self._pending else None

    def evtchn_unmask(self, local_port: int) -> None:
        self.call("evtchn_unmask", local_port=local_port)

    def virt_caps(self) -> frozenset[str]:
        caps = self.call("virt_caps")
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise _garbled(f"virt_caps answered {caps!r}"[:200], "virt_caps")
        return frozenset(caps)

    def suspend_evtchn_lock(self, domid: int) -> Any:
        from torpor.hypervisor.xenctrl import SuspendEvtchnLock

        return SuspendEvtchnLock(domid, self.lock_dir)

    def close(self) -> None:
        for s in (self._sock, self._events):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._events = None


def _garbled(what: str, op: str) -> HypervisorError:
    return HypervisorError(f"garbled reply from simulated host: {what}", errno=errno.EPROTO, op=op)


def _parse(line: bytes, op: str) -> dict[str, Any]:
    """One JSON object, whatever the line holds (RecursionError: nested too deep)."""
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise _garbled(f"{line[:200]!r}", op) from e
    if not isinstance(msg, dict):
        raise _garbled(f"{line[:200]!r} is not an object", op)
    return msg


def _u64(value: Any, op: str) -> int:
    if type(value) is not int or not 0 <= value < 2**64:
        raise _garbled(f"{value!r} is not a 64-bit unsigned integer"[:200], op)
    return value


def _port(value: Any, op: str) -> int:
    if type(value) is not int or not 0 <= value < 2**32:
        raise _garbled(f"event-channel port {value!r}"[:200], op)
    return value


_INFO_FIELDS = {f.name for f in attrs.fields(DomainInfo)}


def _domain_info(row: Any, op: str) -> DomainInfo:
    """A DomainInfo from a reply row: known fields only, integers, a str uuid."""
    if not isinstance(row, dict) or not {"domid", "flags"} <= row.keys() <= _INFO_FIELDS:
        raise _garbled(f"domain info {row!r}"[:200], op)
    for key, value in row.items():
        if key == "uuid" and not isinstance(value, str):
            raise _garbled(f"domain info uuid {value!r}"[:200], op)
        if key != "uuid":
            _u64(value, op)
    return DomainInfo(**row)


def _error_from(err: Any, op: str) -> TorporError:
    if not isinstance(err, dict):
        return _garbled(f"error {err!r}"[:200], op)
    kind = err.get("type")
    message = str(err.get("message", "error"))
    domid = err.get("domid") if type(err.get("domid")) is int else None
    code = err.get("errno")
    if "errno" in err and type(code) is not int:
        return _garbled(f"error {err!r}"[:200], op)
    if code is not None and kind in ("HypervisorError", None):
        return HypervisorError(message, errno=code, op=str(err.get("op", op)), domid=domid)
    if kind == "UsageError":
        return UsageError(message, domid=domid)
    if code is not None:
        return HypervisorError(message, errno=code, op=op, domid=domid)
    return TorporError(message, domid=domid)

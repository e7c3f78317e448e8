"""The :class:`~torpor.hypervisor.Hypervisor` Protocol over a simulated host's
``DIR/hypervisor.sock`` (see :mod:`torpor.sim.control` for the protocol).

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
from collections import deque
from typing import Any

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

    def _readline(self, sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
        while b"\n" not in buf:
            try:
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
            line, self._buf = self._readline(self._sock, self._buf)
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict) or reply.get("id") != rid:
                raise ValueError(f"reply {reply!r} does not answer request {rid}")
        except ValueError as e:
            raise HypervisorError(
                f"garbled reply from simulated host: {e}", errno=errno.EPROTO, op=op
            ) from e
        err = reply.get("error")
        if err is not None:
            raise _error_from(err, op)
        return reply.get("result")

    # -- the Protocol --------------------------------------------------------

    def domain_info_list(self, first_domid: int = 0, max_domains: int = 1024) -> list[DomainInfo]:
        rows = self.call("domain_info_list", first_domid=first_domid, max_domains=max_domains)
        return [DomainInfo(**row) for row in rows]

    def domain_info(self, domid: int) -> DomainInfo:
        return DomainInfo(**self.call("domain_info", domid=domid))

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
        return int(self.call("get_hvm_param", domid=domid, param=param))

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
            line, self._event_buf = self._readline(s, b"")
            reply = json.loads(line)
            if reply.get("error"):
                s.close()
                raise _error_from(reply["error"], "evtchn_attach")
            s.setblocking(False)
            self._events = s
        return self._events

    def evtchn_bind_interdomain(self, domid: int, remote_port: int) -> int:
        self._event_socket()
        return int(self.call("evtchn_bind_interdomain", domid=domid, remote_port=remote_port))

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
        while True:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                raise BackendUnavailable("simulated host closed the event-channel stream")
            self._event_buf += chunk
        while b"\n" in self._event_buf:
            line, _, self._event_buf = self._event_buf.partition(b"\n")
            try:
                self._pending.append(int(json.loads(line)["port"]))
            except (ValueError, KeyError, TypeError) as e:
                raise HypervisorError(
                    f"garbled event from simulated host: {line!r}", errno=errno.EPROTO
                ) from e
        return self._pending.popleft() if self._pending else None

    def evtchn_unmask(self, local_port: int) -> None:
        self.call("evtchn_unmask", local_port=local_port)

    def suspend_evtchn_lock(self, domid: int) -> Any:
        from torpor.hypervisor.xenctrl import SuspendEvtchnLock

        return SuspendEvtchnLock(domid, self.lock_dir)

    def close(self) -> None:
        for s in (self._sock, self._events):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._events = None


def _error_from(err: dict[str, Any], op: str) -> TorporError:
    kind = err.get("type")
    message = str(err.get("message", "error"))
    domid = err.get("domid")
    if "errno" in err and kind in ("HypervisorError", None):
        return HypervisorError(message, errno=int(err["errno"]), op=err.get("op", op), domid=domid)
    if kind == "UsageError":
        return UsageError(message, domid=domid)
    if "errno" in err:
        return HypervisorError(message, errno=int(err["errno"]), op=op, domid=domid)
    return TorporError(message, domid=domid)

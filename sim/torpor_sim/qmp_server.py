"""Serving QMP (and qemu-ga) on Unix sockets, for the simulated host.

Three servers in the sim speak to torpor's QMP and qemu-ga clients: the
in-process device model's monitor (:mod:`torpor_sim.fake_qemu`), the guest
agent shim (:mod:`torpor_sim.guest_agent`) and the ordering proxy in front of
a real QEMU's monitor (:mod:`torpor_sim.hvm`).  They share:

* :func:`listening_socket`: a socket bound and listening before anything
  runs behind it, so a client can connect the moment the path exists (the
  kernel queues it); nothing sleeps and polls for a socket to appear;
* :class:`UnixServer`: a server on such a socket that keeps its connections
  and their handlers, so that closing it ends every one of them (cancelled
  quietly: only :meth:`UnixServer.close` cancels a handler) and
  :meth:`UnixServer.idle` can wait for clients that hung up;
* :class:`QmpServer`: QEMU 7.2's QMP monitor around a model's commands -- the
  greeting, one client at a time (a second waits, as with QEMU's socket
  chardev), capabilities negotiation, QEMU's JSON streamer
  (:class:`JsonStream`), argument checks against a schema, error replies,
  ``id``, and events to negotiated clients only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "NO_REPLY",
    "JsonStream",
    "QmpErrorReply",
    "QmpServer",
    "Schema",
    "UnixServer",
    "listening_socket",
]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
#: command -> (required arguments, optional arguments)
Schema = Mapping[str, tuple[frozenset[str], frozenset[str]]]
#: What a command returns when QEMU sends no reply to it.
NO_REPLY: Any = object()


def listening_socket(path: Path, backlog: int = 4) -> socket.socket:
    """A Unix socket bound at ``path`` (replacing a stale one) and listening."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class UnixServer:
    """A Unix-socket server that can end every connection it has.

    ``handler(reader, writer)`` serves one client; a connection that breaks
    (``OSError``, an incomplete read) or is cancelled by :meth:`close` ends
    quietly, and its writer is closed after the handler returns.
    """

    def __init__(self, path: str | os.PathLike[str], handler: Handler, *, backlog: int = 4):
        self.path = Path(path)
        self._handler = handler
        self._backlog = backlog
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Bind and listen (the socket exists when this returns)."""
        sock = listening_socket(self.path, self._backlog)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        try:
            await self._handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only close() cancels a connection; end it quietly (asyncio's stream server
            # would log a cancelled handler as an error in Python 3.11).
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    def close(self, *, abort: bool = False) -> None:
        """Stop listening, close (``abort``: drop, unsent data and all) every
        connection, cancel every handler, remove the socket."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            if abort:
                writer.transport.abort()
            else:
                writer.close()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def wait_closed(self, timeout: float = 2.0) -> None:
        """After :meth:`close`: wait (bounded) for the server and every handler to end."""
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout)
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout)

    async def idle(self) -> None:
        """Return once every client that has hung up is fully closed here too."""
        while self._handlers:
            await asyncio.wait(set(self._handlers))


class JsonStream:
    """Splits a byte stream into JSON texts the way QEMU's json-streamer does.

    QMP is not line-based: qemu.qmp sends each message with no newline.  A
    text ends when its brackets balance (outside strings); a bare scalar ends
    at whitespace; a 0xFF byte (invalid in JSON) discards what was pending.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        texts: list[bytes] = []
        while True:
            text = self._next()
            if text is None:
                return texts
            texts.append(text)

    def _next(self) -> bytes | None:
        buf = self._buf
        ff = buf.rfind(b"\xff")
        if ff >= 0:
            del buf[: ff + 1]
        start = 0
        while start < len(buf) and buf[start] in b" \t\r\n":
            start += 1
        del buf[:start]
        if not buf:
            return None
        if buf[0] not in b"{[":
            end = 0
            while end < len(buf) and buf[end] not in b" \t\r\n{[":
                end += 1
            if end == len(buf) or end == 0:
                if end == 0:  # a lone closing bracket and the like
                    text = bytes(buf[:1])
                    del buf[:1]
                    return text
                return None
            text = bytes(buf[:end])
            del buf[:end]
            return text
        depth, in_string, escaped = 0, False, False
        for i, byte in enumerate(buf):
            if in_string:
                if escaped:
                    escaped = False
                elif byte == 0x5C:  # backslash
                    escaped = True
                elif byte == 0x22:  # quote
                    in_string = False
            elif byte == 0x22:
                in_string = True
            elif byte in b"{[":
                depth += 1
            elif byte in b"}]":
                depth -= 1
                if depth == 0:
                    text = bytes(buf[: i + 1])
                    del buf[: i + 1]
                    return text
        return None


class QmpErrorReply(Exception):
    """A command's error reply: ``{"error": {"class": error_class, "desc": desc}}``."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")


class QmpServer:
    """QEMU's QMP monitor on a Unix socket, around a model's commands.

    ``execute(command, arguments)`` runs a command the client may run (it is
    in ``schema``, with its required arguments and no others, and the client
    negotiated) and returns its result, :data:`NO_REPLY`, or raises
    :class:`QmpErrorReply`.  ``qmp_capabilities`` is the server's own.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        execute: Callable[[str, dict[str, Any]], Any],
        *,
        schema: Schema,
        version: Mapping[str, Any],
    ) -> None:
        self._unix = UnixServer(path, self._serve)
        self._execute = execute
        self._schema = schema
        self._version = version
        self._conns: set[_Connection] = set()
        self._lock = asyncio.Lock()
        self._closed = False

    async def start(self) -> None:
        await self._unix.start()

    def close(self, *, abort: bool = True) -> None:
        """The monitor is gone: connections drop (``abort=False``: close after
        what was written, as a process that quits does)."""
        self._closed = True
        self._unix.close(abort=abort)

    async def wait_closed(self) -> None:
        await self._unix.wait_closed()

    def emit(self, name: str, data: Mapping[str, Any] | None = None) -> float:
        """Send event ``name`` to every negotiated client; returns its timestamp."""
        now = time.time()
        msg: dict[str, Any] = {
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
            "event": name,
        }
        if data is not None:
            msg["data"] = data
        for conn in self._conns:
            if conn.negotiated:
                conn.send(msg)
        return now

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        # QEMU's socket chardev takes one client at a time; others wait to be accepted.
        async with self._lock:
            if self._closed:
                return
            self._conns.add(conn)
            try:
                conn.send({"QMP": {"version": self._version, "capabilities": ["oob"]}})
                stream = JsonStream()
                while chunk := await reader.read(65536):
                    for text in stream.feed(chunk):
                        reply = self._dispatch(conn, text)
                        if reply is not None:
                            conn.send(reply)
                        if self._closed:
                            break
                    await writer.drain()
                    if self._closed:
                        break
            finally:
                self._conns.discard(conn)

    def _dispatch(self, conn: _Connection, line: bytes) -> dict[str, Any] | None:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as e:
            desc = f"JSON parse error, {e.msg.lower()}"
            return {"error": {"class": "GenericError", "desc": desc}}
        except ValueError:  # not UTF-8
            return {"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8"}}
        if not isinstance(msg, dict):
            return {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        out: dict[str, Any] = {}
        try:
            cmd = msg.get("execute")
            if not isinstance(cmd, str):
                raise QmpErrorReply("GenericError", "QMP input lacks member 'execute'")
            args = msg.get("arguments", {})
            if not isinstance(args, dict):
                raise QmpErrorReply(
                    "GenericError", "QMP input member 'arguments' must be an object"
                )
            if not conn.negotiated and cmd != "qmp_capabilities":
                raise QmpErrorReply(
                    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            if conn.negotiated and cmd == "qmp_capabilities":
                raise QmpErrorReply(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                )
            if cmd not in self._schema:
                raise QmpErrorReply("CommandNotFound", f"The command {cmd} has not been found")
            required, optional = self._schema[cmd]
            for name in sorted(required - args.keys()):
                raise QmpErrorReply("GenericError", f"Parameter '{name}' is missing")
            for name in sorted(args.keys() - required - optional):
                raise QmpErrorReply("GenericError", f"Parameter '{name}' is unexpected")
            if cmd == "qmp_capabilities":
                conn.negotiated = True
                result: Any = {}
            else:
                result = self._execute(cmd, args)
            if result is NO_REPLY:
                return None
            out["return"] = result
        except QmpErrorReply as e:
            out["error"] = {"class": e.error_class, "desc": e.desc}
        if "id" in msg:
            out["id"] = msg["id"]
        return out

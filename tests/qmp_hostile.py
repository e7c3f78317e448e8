"""A scriptable QMP (or qemu-ga) server for tests of torpor's QMP handling.

``serving(path, handler)`` listens on a Unix socket and runs
``await handler(peer)`` for each connection; a :class:`Peer` reads the
client's JSON objects (QMP has no framing) and writes whatever bytes the
script wants -- well-formed replies, junk, nothing at all.  Shared by
tests/test_qmp.py and tests/fuzz/test_fuzz_qmp.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
        "capabilities": [],
    }
}


class Peer:
    """The server's end of one connection: JSON objects in, bytes out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buf = ""
        self._dec = json.JSONDecoder()

    async def recv(self) -> dict[str, Any]:
        """The client's next object; EOFError once it hangs up."""
        while True:
            # qemu-ga clients send a 0xFF byte to reset the parser: not JSON.
            text = self._buf.lstrip().lstrip("\ufffd").lstrip()
            if text:
                try:
                    obj, end = self._dec.raw_decode(text)
                except ValueError:
                    pass
                else:
                    self._buf = text[end:]
                    assert isinstance(obj, dict), obj
                    return obj
            chunk = await self.reader.read(65536)
            if not chunk:
                raise EOFError
            self._buf += chunk.decode("utf-8", "replace")

    def send(self, msg: object) -> None:
        self.writer.write(json.dumps(msg).encode() + b"\r\n")

    def raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def handshake(self) -> None:
        """The greeting and the capabilities negotiation, as QEMU does them."""
        self.send(GREETING)
        cmd = await self.recv()
        assert cmd["execute"] == "qmp_capabilities"
        self.send({"return": {}, **({"id": cmd["id"]} if "id" in cmd else {})})


Handler = Callable[[Peer], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(path: str, handler: Handler) -> AsyncIterator[None]:
    """Serve ``handler`` on ``path`` until the block ends; then drop every client."""
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handler(Peer(reader, writer))
            await writer.drain()
        except (EOFError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4)
    # A large reader limit: the fuzzers send lines far past asyncio's 64 KiB.
    server = await asyncio.start_unix_server(serve, sock=sock, limit=1 << 22)
    try:
        yield
    finally:
        server.close()
        for w in writers:
            w.transport.abort()

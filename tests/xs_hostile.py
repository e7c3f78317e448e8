"""A scripted, misbehaving xenstore server for adapter tests.

Each test hands it a handler that receives the accepted socket and does
whatever a broken or hostile xenstored might: stall, answer with the wrong
req_id, send garbage, close mid-request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from torpor.xs_wire import HEADER, Op


def recv_request(conn: socket.socket) -> tuple[int, int, int, bytes] | None:
    """Read one request; None if the client went away."""
    head = b""
    while len(head) < HEADER.size:
        chunk = conn.recv(HEADER.size - len(head))
        if not chunk:
            return None
        head += chunk
    op, rq, tx, size = HEADER.unpack(head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return op, rq, tx, body


def reply(conn: socket.socket, op: int, rq: int, tx: int, payload: bytes) -> None:
    conn.sendall(HEADER.pack(op, rq, tx, len(payload)) + payload)


def ok_server(conn: socket.socket) -> bool:
    """Answer one request as a well-behaved server would, minimally."""
    req = recv_request(conn)
    if req is None:
        return False
    op, rq, tx, body = req
    if op == Op.READ:
        reply(conn, op, rq, tx, b"value")
    elif op == Op.WATCH:
        reply(conn, op, rq, tx, b"OK\0")
        path, token = body.split(b"\0")[:2]
        reply(conn, Op.WATCH_EVENT, 0, 0, path + b"\0" + token + b"\0")
    else:
        reply(conn, op, rq, tx, b"OK\0")
    return True


class HostileServer:
    """Listens on ``path``; runs ``handler(conn)`` for each connection in a thread.

    ``hang_up``: shut a connection down as soon as its handler returns (the
    client sees EOF); otherwise it stays open until :meth:`close`.
    """

    def __init__(
        self, path: str, handler: Callable[[socket.socket], None], *, hang_up: bool = False
    ) -> None:
        self.path = path
        self.handler = handler
        self.hang_up = hang_up
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.conns: list[socket.socket] = []
        self.release = threading.Event()  # handlers that stall wait on this
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)
        if self.hang_up:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop listening, end the accept thread, drop every client."""
        self.release.set()
        # shutdown() wakes the thread blocked in accept(); close() alone does not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self.thread.join(2)

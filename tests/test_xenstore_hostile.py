"""The adapter against a broken or hostile xenstored: an error, never a hang.

Each test names the pyxs 0.4.1 failure it proves the adapter survives.  Where
plain pyxs is shown misbehaving, it runs in a daemon thread that is allowed
to stay blocked: that *is* the bug.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyxs
from xs_hostile import HostileServer, ok_server, recv_request, reply

from torpor.errors import (
    BackendUnavailable,
    Timeout,
    UsageError,
    XenstoreConnectionLost,
    XenstoreError,
)
from torpor.xenstore import Xenstore
from torpor.xs_wire import HEADER, Op


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "xs.sock")


@pytest.fixture
def servers() -> Iterator[list[HostileServer]]:
    made: list[HostileServer] = []
    yield made
    for s in made:
        s.close()


def serve(servers: list[HostileServer], path: str, handler) -> HostileServer:  # type: ignore[no-untyped-def]
    s = HostileServer(path, handler)
    servers.append(s)
    return s


def test_connect_to_nothing_is_backend_unavailable(sock_path: str) -> None:
    with pytest.raises(BackendUnavailable, match="cannot connect to xenstored"):
        Xenstore(sock_path).connect()


def test_server_closing_mid_request_fails_pending_and_later_calls_fast(
    sock_path: str, servers: list[HostileServer]
) -> None:
    """pyxs: the router thread dies and the pending call waits forever."""

    def handler(conn: socket.socket) -> None:
        recv_request(conn)  # take the request, then die without answering
        conn.close()

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=30).connect()
    t0 = time.monotonic()
    with pytest.raises(XenstoreConnectionLost):
        xs.read("/local/domain/0/name")
    assert time.monotonic() - t0 < 1.0
    assert xs.lost is not None
    t0 = time.monotonic()
    with pytest.raises(XenstoreConnectionLost):
        xs.write("/a", "b")
    assert time.monotonic() - t0 < 1.0
    xs.close()


# The router thread dying of the reset, unhandled, *is* the bug shown here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_plain_pyxs_hangs_where_the_adapter_fails(
    sock_path: str, servers: list[HostileServer]
) -> None:
    """The bug the adapter exists for: pyxs's router thread dies on the reset
    and the pending read it owed an answer never returns."""

    def handler(conn: socket.socket) -> None:
        recv_request(conn)
        conn.close()

    serve(servers, sock_path, handler)
    client = pyxs.Client(unix_socket_path=sock_path)
    client.connect()
    outcome: list[object] = []
    t = threading.Thread(target=lambda: outcome.append(client.read(b"/x")), daemon=True)
    t.start()
    client.router.thread.join(10)  # the event: pyxs's reader is gone
    assert not client.router.thread.is_alive()
    t.join(0.5)  # a hang can only be shown by waiting a little past it
    assert t.is_alive() and not outcome  # still blocked: pyxs hangs


def test_unknown_req_id_is_connection_lost(sock_path: str, servers: list[HostileServer]) -> None:
    def handler(conn: socket.socket) -> None:
        op, rq, tx, _ = recv_request(conn)  # type: ignore[misc]
        reply(conn, op, rq + 1000, tx, b"surprise")
        servers[0].release.wait(10)

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=30).connect()
    t0 = time.monotonic()
    with pytest.raises(XenstoreConnectionLost):
        xs.read("/x")
    assert time.monotonic() - t0 < 1.0
    xs.close()


def test_reply_of_wrong_type_is_connection_lost(
    sock_path: str, servers: list[HostileServer]
) -> None:
    def handler(conn: socket.socket) -> None:
        _, rq, tx, _ = recv_request(conn)  # type: ignore[misc]
        reply(conn, Op.DIRECTORY, rq, tx, b"a\0")
        servers[0].release.wait(10)

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=30).connect()
    with pytest.raises(XenstoreConnectionLost, match="answered READ"):
        xs.read("/x")
    xs.close()


def test_error_without_trailing_nul_keeps_its_errno(
    sock_path: str, servers: list[HostileServer]
) -> None:
    """pyxs strips the last byte of every error reply: ``ENOENT`` became errno 0."""

    def handler(conn: socket.socket) -> None:
        while (req := recv_request(conn)) is not None:
            _, rq, tx, _ = req
            reply(conn, Op.ERROR, rq, tx, b"ENOENT")

    serve(servers, sock_path, handler)
    client = pyxs.Client(unix_socket_path=sock_path)
    with client:
        with pytest.raises(pyxs.PyXSError) as bug:
            client.read(b"/x")
        assert bug.value.args[0] == 0  # the pyxs bug
        with Xenstore(sock_path).connect() as xs, pytest.raises(XenstoreError) as fixed:
            xs.read("/x")
    assert fixed.value.errno == errno.ENOENT
    assert fixed.value.errname == "ENOENT"


def test_huge_length_is_refused_without_allocating(
    sock_path: str, servers: list[HostileServer]
) -> None:
    def handler(conn: socket.socket) -> None:
        op, rq, tx, _ = recv_request(conn)  # type: ignore[misc]
        conn.sendall(HEADER.pack(op, rq, tx, 0x7FFFFFFF))
        servers[0].release.wait(10)

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=30).connect()
    t0 = time.monotonic()
    with pytest.raises(XenstoreConnectionLost, match="payload"):
        xs.read("/x")
    assert time.monotonic() - t0 < 1.0
    xs.close()


def test_garbage_is_connection_lost(sock_path: str, servers: list[HostileServer]) -> None:
    def handler(conn: socket.socket) -> None:
        recv_request(conn)
        conn.sendall(b"\xff" * 7)  # a short header, then EOF
        conn.close()

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=30).connect()
    with pytest.raises(XenstoreConnectionLost):
        xs.read("/x")
    xs.close()


def test_malformed_watch_event_is_connection_lost(
    sock_path: str, servers: list[HostileServer]
) -> None:
    def handler(conn: socket.socket) -> None:
        ok_server(conn)  # the WATCH and its first event
        reply(conn, Op.WATCH_EVENT, 0, 0, b"only-one-field")
        servers[0].release.wait(10)

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=30).connect()
    with pytest.raises(XenstoreConnectionLost):
        xs.wait("/x", lambda v: v == "never", timeout=20)
    xs.close()


def test_stalled_server_hits_the_deadline(sock_path: str, servers: list[HostileServer]) -> None:
    def handler(conn: socket.socket) -> None:
        recv_request(conn)
        servers[0].release.wait(10)

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=0.3).connect()
    t0 = time.monotonic()
    with pytest.raises(Timeout) as err:
        xs.read("/x")
    assert 0.3 <= time.monotonic() - t0 < 1.0
    assert err.value.deadline == 0.3
    xs.close()


def test_late_reply_after_timeout_is_absorbed(sock_path: str, servers: list[HostileServer]) -> None:
    """A reply arriving after its caller gave up must not kill the connection."""
    go = threading.Event()

    def handler(conn: socket.socket) -> None:
        op, rq, tx, _ = recv_request(conn)  # type: ignore[misc]
        go.wait(10)
        reply(conn, op, rq, tx, b"late")
        while ok_server(conn):
            pass

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=0.2).connect()
    with pytest.raises(Timeout):
        xs.read("/x")
    go.set()
    xs.timeout = 5
    assert xs.read("/y") == "value"
    assert xs.lost is None
    xs.close()


def test_event_for_unknown_token_is_dropped(sock_path: str, servers: list[HostileServer]) -> None:
    """pyxs's Monitor spun at 100 % CPU on an event outside what it watched."""

    def handler(conn: socket.socket) -> None:
        reply(conn, Op.WATCH_EVENT, 0, 0, b"/elsewhere\0not-ours\0")
        while ok_server(conn):
            pass

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=5).connect()
    seen: list[str] = []
    w = xs.watch("/mine", lambda p, t: seen.append(p))
    assert xs.read("/mine") == "value"
    assert seen == ["/mine"]  # only the watch's own initial event
    assert xs.lost is None
    w.unwatch()
    xs.close()


def test_async_call_fails_fast_when_server_dies(
    sock_path: str, servers: list[HostileServer]
) -> None:
    import asyncio

    def handler(conn: socket.socket) -> None:
        recv_request(conn)
        conn.close()

    serve(servers, sock_path, handler)
    xs = Xenstore(sock_path, timeout=30).connect()

    async def go() -> None:
        with pytest.raises(XenstoreConnectionLost):
            await xs.aio.read("/x")

    t0 = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - t0 < 1.0
    xs.close()


@pytest.mark.parametrize("bad", ["relative/../x", "/trailing/", "/a//b", "/sp ace", "/ü"])
def test_invalid_paths_are_refused_before_sending(sock_path: str, bad: str) -> None:
    xs = Xenstore(sock_path)  # never connected: validation happens first
    with pytest.raises(UsageError):
        xs.read(bad)


def test_invalid_domid_is_refused(sock_path: str) -> None:
    xs = Xenstore(sock_path)
    for bad in (-1, 0x7FF0, True, "3"):
        with pytest.raises(UsageError):
            xs.resume(bad)  # type: ignore[arg-type]

"""One regression test per bug the fuzzers found, each reduced to its smallest case.

Every test here failed before its fix (the finding it names), with the
exception type or the hang the fuzzer reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from xs_hostile import HostileServer, recv_request, reply

from torpor.errors import DeviceModelError, Timeout, XenstoreError
from torpor.qmp import GuestAgent, QmpClient
from torpor.xenstore import Xenstore
from torpor.xs_wire import HEADER, Op


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="fzf", dir="/tmp")
    yield os.path.join(d, "s")
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


@contextlib.contextmanager
def xs_server(path: str, handler) -> Iterator[threading.Event]:  # type: ignore[no-untyped-def]
    release = threading.Event()
    server = HostileServer(path, lambda c: handler(c, release))
    try:
        yield release
    finally:
        release.set()
        with contextlib.suppress(OSError):
            server.sock.shutdown(socket.SHUT_RDWR)
        server.close()


# -- the xenstore adapter ---------------------------------------------------------


def test_close_returns_when_the_server_stalls_mid_frame(sock_path: str) -> None:
    """Finding: pyxs's Router.terminate() joined a router blocked in recv() on half
    a frame: Xenstore.close() (and Host.close()) hung forever."""

    def handler(conn: socket.socket, release: threading.Event) -> None:
        op, rq, tx, _ = recv_request(conn)  # type: ignore[misc]
        conn.sendall(HEADER.pack(op, rq, tx, 10) + b"val")  # 3 of 10 payload bytes
        release.wait(30)

    with xs_server(sock_path, handler):
        xs = Xenstore(sock_path, timeout=0.2).connect()
        router = xs._router
        assert router is not None
        with pytest.raises(Timeout):
            xs.read("/x")
        t0 = time.monotonic()
        xs.close()
        assert time.monotonic() - t0 < 1.0
        router.thread.join(1.0)
        assert not router.thread.is_alive()


@pytest.mark.parametrize(
    ("op", "payload", "call"),
    [
        (Op.TRANSACTION_START, b"", lambda xs: xs.transaction_start()),
        (Op.TRANSACTION_START, b"x1\0", lambda xs: xs.transaction_start()),
        (Op.TRANSACTION_START, b"0\0", lambda xs: xs.transaction_start()),
        # would have been accepted, then failed struct.pack on the next request
        (Op.TRANSACTION_START, b"99999999999\0", lambda xs: xs.transaction_start()),
        (Op.GET_DOMAIN_PATH, b"", lambda xs: xs.get_domain_path(1)),
        (Op.GET_DOMAIN_PATH, b"\0", lambda xs: xs.get_domain_path(1)),
        (Op.GET_PERMS, b"q1\0", lambda xs: xs.get_perms("/x")),
    ],
    ids=["tx-empty", "tx-garbage", "tx-zero", "tx-too-big", "path-empty", "path-nul", "perms"],
)
def test_unparsable_replies_are_xenstore_errors(
    sock_path: str, op: Op, payload: bytes, call
) -> None:  # type: ignore[no-untyped-def]
    """Finding: a garbage TRANSACTION_START reply was a ValueError, an empty
    GET_DOMAIN_PATH reply an IndexError (and both, in the async face too)."""

    def handler(conn: socket.socket, release: threading.Event) -> None:
        while (req := recv_request(conn)) is not None:
            _, rq, tx, _ = req
            reply(conn, op, rq, tx, payload)

    with xs_server(sock_path, handler), Xenstore(sock_path, timeout=5).connect() as xs:
        with pytest.raises(XenstoreError) as e:
            call(xs)
        assert e.value.errno == errno.EPROTO
        if op == Op.TRANSACTION_START:

            async def go() -> None:
                await xs.aio.transaction_start()

            with pytest.raises(XenstoreError):
                asyncio.run(go())
        assert xs.lost is None


# -- the guest agent and QMP ----------------------------------------------------------


async def _agent(path: str, script) -> asyncio.AbstractServer:  # type: ignore[no-untyped-def]
    return await asyncio.start_unix_server(script, path)


def test_agent_json_nested_too_deep_is_a_device_model_error(sock_path: str) -> None:
    """Finding: json.loads raised RecursionError (not a ValueError), which
    escaped GuestAgent as a bare RecursionError."""

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"}")
        writer.write(b"[" * 60_000 + b"\n")
        await reader.read()

    async def main() -> None:
        server = await _agent(sock_path, agent)
        async with server, GuestAgent(domid=6) as ga:
            await ga.connect(sock_path, timeout=5)
            with pytest.raises(DeviceModelError, match="nested too deep") as e:
                await ga.ping(timeout=5)
            assert e.value.domid == 6

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize(
    "answer",
    [b"[1, 2]\n", b"{garbage\n", b"x" * 100_000 + b"\n", b""],
    ids=["not-an-object", "garbage", "overlong-line", "eof"],
)
def test_agent_suspend_ram_bad_reply_is_a_device_model_error(sock_path: str, answer: bytes) -> None:
    """Finding: GuestAgent.suspend_ram() re-raised the reply reader's own
    exception: ValueError, JSONDecodeError, LimitOverrunError, EOFError."""

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"}")
        writer.write(answer)
        if not answer:
            writer.close()
            return
        await reader.read()

    async def main() -> None:
        server = await _agent(sock_path, agent)
        async with server, GuestAgent(domid=6) as ga:
            await ga.connect(sock_path, timeout=5)
            never = asyncio.get_running_loop().create_future()
            t0 = time.monotonic()
            with pytest.raises(DeviceModelError) as e:
                await ga.suspend_ram(never, timeout=5)
            assert not isinstance(e.value, Timeout)
            assert time.monotonic() - t0 < 1.0

    asyncio.run(asyncio.wait_for(main(), 30))


def test_agent_used_after_request_suspend_ram_is_a_device_model_error(sock_path: str) -> None:
    """Finding: after request_suspend_ram() (whose reply reader keeps the
    stream), any other command was a RuntimeError from asyncio's StreamReader."""

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readuntil(b"}}")
        token = json.loads(data.lstrip(b"\xff"))["arguments"]["id"]
        writer.write(b"\xff" + json.dumps({"return": token}).encode() + b"\n")
        await reader.read()  # guest-suspend-ram: qemu-ga answers nothing on success

    async def main() -> None:
        server = await _agent(sock_path, agent)
        async with server, GuestAgent(domid=6) as ga:
            await ga.connect(sock_path, timeout=5)
            await ga.request_suspend_ram(lambda e: None, timeout=5)
            with pytest.raises(DeviceModelError, match="close it first"):
                await ga.sync(timeout=5)
            with pytest.raises(DeviceModelError, match="close it first"):
                await ga.ping(timeout=5)

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("error", [None, 5, "x", {"class": 1}, {"desc": "d"}, [1]], ids=str)
def test_qmp_malformed_error_reply_fails_at_once_and_the_session_lives(
    sock_path: str, error: object
) -> None:
    """Finding: an error object without class/desc (qemu.qmp's BadReplyError) was
    reported as "connection lost" after waiting 1 s -- past the command's
    deadline -- for a connection that was in fact alive."""

    async def qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}
        greeting = {"QMP": {"version": version, "capabilities": []}}
        writer.write(json.dumps(greeting).encode() + b"\r\n")
        n = 0
        buf = ""
        dec = json.JSONDecoder()
        while chunk := await reader.read(4096):
            buf += chunk.decode()
            try:
                cmd, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                continue
            buf = buf.lstrip()[end:]
            if n == 1:
                reply_obj: dict[str, object] = {"error": error}
            else:
                reply_obj = {"return": {"status": "running", "running": True}}
            if "id" in cmd:
                reply_obj["id"] = cmd["id"]
            writer.write(json.dumps(reply_obj).encode() + b"\r\n")
            n += 1

    async def main() -> None:
        server = await asyncio.start_unix_server(qemu, sock_path)
        async with server:
            c = QmpClient(domid=2)
            await c.connect(sock_path, timeout=5)
            try:
                t0 = time.monotonic()
                with pytest.raises(DeviceModelError, match="bad reply") as e:
                    await c.stop(timeout=0.2)
                assert not isinstance(e.value, Timeout)
                assert time.monotonic() - t0 < 0.2 + 0.3
                assert c.connected
                assert await c.query_status(timeout=5) == "running"
            finally:
                await c.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# -- hypervisor.sock: RemoteHypervisor (client) and ControlServer (server) ----------------


@contextlib.contextmanager
def line_server(path: str, answer) -> Iterator[threading.Event]:  # type: ignore[no-untyped-def]
    """A hypervisor.sock server calling ``answer(conn, request, n)`` per request line."""

    def handler(conn: socket.socket, release: threading.Event) -> None:
        for n, line in enumerate(conn.makefile("rb")):
            answer(conn, json.loads(line), n)

    with xs_server(path, handler) as release:
        yield release


@pytest.mark.parametrize(
    ("raw", "call"),
    [
        (b"[" * 100_000, lambda hv: hv.domain_info(1)),  # RecursionError
        (b'{"id": 1, "error": "boom"}', lambda hv: hv.pause(1)),  # AttributeError
        (b'{"id": 1, "error": {"errno": "EINVAL"}}', lambda hv: hv.pause(1)),  # ValueError
        (b'{"id": 1, "result": "x"}', lambda hv: hv.domain_info(1)),  # TypeError
        (b'{"id": 1, "result": {"domid": 1, "flags": "0"}}', lambda hv: hv.domain_info(1)),
        (b'{"id": 1, "result": {"domid": 1, "flags": 0, "x": 1}}', lambda hv: hv.domain_info(1)),
        (b'{"id": 1, "result": 5}', lambda hv: hv.domain_info_list()),  # TypeError
        (b'{"id": 1, "result": "x"}', lambda hv: hv.get_hvm_param(1, 0)),  # ValueError
        (b'{"id": 1, "result": [1]}', lambda hv: hv.get_hvm_param(1, 0)),  # TypeError
    ],
    ids=[
        "deep",
        "error-not-object",
        "errno-not-int",
        "info-not-object",
        "info-flags-str",
        "info-unknown-field",
        "list-not-list",
        "param-str",
        "param-list",
    ],
)
def test_remote_hypervisor_garbled_replies_are_hypervisor_errors(
    sock_path: str,
    raw: bytes,
    call,  # type: ignore[no-untyped-def]
) -> None:
    """Finding: each of these escaped RemoteHypervisor as the exception named, or
    (flags "0") was accepted and failed later in the orchestrator."""
    from torpor.errors import HypervisorError
    from torpor.hypervisor.remote import RemoteHypervisor

    with line_server(sock_path, lambda conn, req, n: conn.sendall(raw + b"\n")):
        hv = RemoteHypervisor(sock_path, timeout=5)
        try:
            with pytest.raises(HypervisorError) as e:
                call(hv)
            assert e.value.errno == errno.EPROTO
        finally:
            hv.close()


def test_remote_hypervisor_deadline_is_per_call_not_per_recv(sock_path: str) -> None:
    """Finding: the socket timeout was per recv(): a server trickling a byte more
    often than that kept a call waiting forever."""
    from torpor.errors import HypervisorError
    from torpor.hypervisor.remote import RemoteHypervisor

    stop = threading.Event()

    def trickle(conn: socket.socket, req: dict[str, object], n: int) -> None:
        while not stop.wait(0.05):
            conn.sendall(b" ")

    with line_server(sock_path, trickle):
        hv = RemoteHypervisor(sock_path, timeout=0.3)
        try:
            t0 = time.monotonic()
            with pytest.raises(HypervisorError) as e:
                hv.pause(1)
            assert e.value.errno == errno.ETIMEDOUT
            assert time.monotonic() - t0 < 0.3 + 0.3
        finally:
            stop.set()
            hv.close()


def test_remote_hypervisor_recovers_from_a_late_reply(sock_path: str) -> None:
    """Finding: after a call timed out, its late reply was read as the next call's,
    which failed as garbled -- and every call after it, one reply behind."""
    from torpor.errors import HypervisorError
    from torpor.hypervisor.remote import RemoteHypervisor

    go = threading.Event()

    def late(conn: socket.socket, req: dict[str, object], n: int) -> None:
        if n == 0:
            go.wait(10)  # answer the first request only once it timed out
        conn.sendall(json.dumps({"id": req["id"], "result": n}).encode() + b"\n")

    with line_server(sock_path, late):
        hv = RemoteHypervisor(sock_path, timeout=0.3)
        try:
            with pytest.raises(HypervisorError):
                hv.get_hvm_param(1, 0)
            go.set()
            assert hv.get_hvm_param(1, 0) == 1
            assert hv.get_hvm_param(1, 0) == 2
        finally:
            hv.close()


@pytest.fixture
def control_host() -> Iterator[object]:
    from torpor_sim.host import SimHost

    d = tempfile.mkdtemp(prefix="fzh", dir="/tmp")
    h = SimHost(d, qemu=False)
    h.start()
    yield h
    h.stop()
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _exchange(path: str, lines: list[bytes]) -> list[dict[str, object]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(b"".join(line + b"\n" for line in lines))
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return [json.loads(x) for x in data.splitlines()]


@pytest.mark.parametrize(
    "line",
    [b"[" * 100_000, b'{"op": "evtchn_attach", "args": {"handle": "x"}}'],
    ids=["deep", "attach-handle-str"],
)
def test_control_server_answers_what_killed_its_handler(
    control_host,
    caplog: pytest.LogCaptureFixture,
    line: bytes,  # type: ignore[no-untyped-def]
) -> None:
    """Finding: a line nested too deep (RecursionError) and a non-integer
    evtchn_attach handle (ValueError) escaped the client handler: asyncio logged
    "Unhandled exception in client_connected_cb" and the client got no answer."""
    path = control_host.hypervisor_socket
    with caplog.at_level("ERROR"):
        replies = _exchange(path, [line])
    assert len(replies) == 1 and "error" in replies[0]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert _exchange(path, [b'{"id": 1, "op": "domain_info", "args": {"domid": 0}}'])[0]["id"] == 1


def test_control_server_drops_a_departed_clients_transfers(control_host) -> None:  # type: ignore[no-untyped-def]
    """Finding: image transfers (sim_save, transfer_open) outlived the client that
    opened them: a toolstack killed mid-save left its image in the daemon for good."""
    path = control_host.hypervisor_socket
    replies = _exchange(
        path,
        [
            b'{"id": 1, "op": "transfer_open"}',
            b'{"id": 2, "op": "transfer_write", "args": {"transfer": 0, "data": "AAAA"}}',
        ],
    )
    assert isinstance(replies[0]["result"], int)
    assert control_host.control.transfers == {}

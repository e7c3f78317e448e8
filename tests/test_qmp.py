"""torpor.qmp against broken and hostile QMP / qemu-ga servers: an error within
its deadline, never a hang.

Each test names the qemu.qmp behaviour (0.0.6) the adapter has to cover.  The
servers are asyncio servers on the test's own event loop, scripted per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from qmp_hostile import GREETING, Handler, Peer, serving

from torpor.errors import DeviceModelError, Timeout
from torpor.qmp import EVENT_HISTORY, GuestAgent, QmpClient, QmpCommandError, QmpEvent

T = TypeVar("T")
#: Slack allowed past a deadline before we call it a hang.
SLACK = 1.0


def arun(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="qmp", dir="/tmp")  # AF_UNIX paths are short
    yield os.path.join(d, "qmp.sock")
    for f in Path(d).iterdir():
        f.unlink()
    os.rmdir(d)


async def forever() -> None:
    await asyncio.Event().wait()


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"took {elapsed:.2f} s, allowed {seconds:.2f} s"


# ---------------------------------------------------------------------------- connect


def test_missing_socket_is_an_immediate_error(sock_path: str) -> None:
    """qemu.qmp's connect() does not retry; neither do we: no socket, no device model."""

    async def main() -> None:
        with within(0.5), pytest.raises(DeviceModelError, match="no QMP socket") as e:
            await QmpClient(domid=4).connect(sock_path, timeout=5)
        assert e.value.domid == 4 and isinstance(e.value.cause, FileNotFoundError)

    arun(main())


def test_stale_socket_file_is_an_immediate_error(sock_path: str) -> None:
    async def main() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(sock_path)  # the path of a device model that died: nobody listens
        s.close()
        with within(0.5), pytest.raises(DeviceModelError, match="nothing listens"):
            await QmpClient().connect(sock_path, timeout=5)

    arun(main())


def test_no_greeting_is_a_timeout(sock_path: str) -> None:
    """qemu.qmp waits for the greeting forever."""

    async def main() -> None:
        async def mute(peer: Peer) -> None:
            await forever()

        async with serving(sock_path, mute):
            with within(0.3 + SLACK), pytest.raises(Timeout) as e:
                await QmpClient(domid=2).connect(sock_path, timeout=0.3)
            assert e.value.deadline == 0.3 and e.value.domid == 2

    arun(main())


@pytest.mark.parametrize(
    "greeting",
    [b"garbage\r\n", b'{"QMP": 1}\r\n', b"[1, 2]\r\n", b'{"QMP": {"version": {}}', b""],
    ids=["garbage", "wrong-shape", "not-an-object", "truncated-then-close", "close"],
)
def test_bad_greeting_is_an_error_not_a_hang(sock_path: str, greeting: bytes) -> None:
    async def main() -> None:
        async def bad(peer: Peer) -> None:
            peer.raw(greeting)
            await peer.writer.drain()
            peer.writer.close()

        async with serving(sock_path, bad):
            with within(SLACK), pytest.raises(DeviceModelError) as e:
                await QmpClient().connect(sock_path, timeout=5)
            assert not isinstance(e.value, Timeout)

    arun(main())


def test_hang_up_right_after_the_handshake_is_an_error(sock_path: str) -> None:
    """qemu.qmp's connect() then fails its own runstate assertion."""

    async def main() -> None:
        async def rude(peer: Peer) -> None:
            await peer.handshake()
            peer.send({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}})
            await peer.writer.drain()
            peer.writer.close()

        async with serving(sock_path, rude):
            for _ in range(5):  # the race goes either way: an error at connect or at the next call
                c = QmpClient()
                with within(SLACK), pytest.raises(DeviceModelError) as e:
                    await c.connect(sock_path, timeout=5)
                    await c.query_status(timeout=5)
                assert not isinstance(e.value, Timeout)
                await c.close()

    arun(main())


def test_refused_negotiation_is_an_error(sock_path: str) -> None:
    async def main() -> None:
        async def refuse(peer: Peer) -> None:
            peer.send(GREETING)
            await peer.recv()
            peer.send({"error": {"class": "GenericError", "desc": "no"}})
            await forever()

        async with serving(sock_path, refuse):
            with within(SLACK), pytest.raises(DeviceModelError, match="handshake"):
                await QmpClient().connect(sock_path, timeout=5)

    arun(main())


# ---------------------------------------------------------------------------- commands


def run_session(
    sock_path: str, script: Handler, test: Callable[[QmpClient], Awaitable[None]], **kw: Any
) -> None:
    async def main() -> None:
        async def handler(peer: Peer) -> None:
            await peer.handshake()
            await script(peer)

        async with serving(sock_path, handler):
            client = QmpClient(**kw)
            await client.connect(sock_path, timeout=5)
            try:
                await test(client)
            finally:
                with within(3 + SLACK):
                    await client.close(timeout=1)

    arun(main())


def test_error_reply_is_a_command_error(sock_path: str) -> None:
    async def script(peer: Peer) -> None:
        cmd = await peer.recv()
        peer.send({"error": {"class": "GenericError", "desc": "nope"}, "id": cmd["id"]})
        await forever()

    async def test(c: QmpClient) -> None:
        with pytest.raises(QmpCommandError) as e:
            await c.execute("stop", timeout=5)
        assert (e.value.command, e.value.error_class, e.value.desc) == (
            "stop",
            "GenericError",
            "nope",
        )
        assert e.value.domid == 9 and "domain 9" in str(e.value)

    run_session(sock_path, script, test, domid=9)


def test_reply_with_a_wrong_id_is_a_timeout_and_the_session_survives(sock_path: str) -> None:
    """qemu.qmp drops a reply whose id matches nothing: the command would wait forever."""

    async def script(peer: Peer) -> None:
        await peer.recv()
        peer.send({"return": {"status": "running"}, "id": "someone-else"})
        cmd = await peer.recv()
        peer.send({"return": {"status": "paused", "running": False}, "id": cmd["id"]})
        await forever()

    async def test(c: QmpClient) -> None:
        with within(0.3 + SLACK), pytest.raises(Timeout):
            await c.query_status(timeout=0.3)
        assert await c.query_status(timeout=5) == "paused"

    run_session(sock_path, script, test)


def test_stalled_command_is_a_timeout(sock_path: str) -> None:
    async def script(peer: Peer) -> None:
        await peer.recv()
        await forever()

    async def test(c: QmpClient) -> None:
        with within(0.3 + SLACK), pytest.raises(Timeout, match="QMP cont"):
            await c.cont(timeout=0.3)

    run_session(sock_path, script, test)


@pytest.mark.parametrize(
    "tail",
    [b"", b'{"return": {}, "id": "__qmp#000', b"\xff\xfe garbage\r\n", b"[]\r\n", b"x" * 70000],
    ids=["close", "truncated", "garbage", "not-an-object", "overlong-line"],
)
def test_dead_or_hostile_connection_mid_command_fails_fast(sock_path: str, tail: bytes) -> None:
    """The reader dies; qemu.qmp interrupts the pending command; so do we, and
    every later call and event wait fails at once."""

    async def script(peer: Peer) -> None:
        await peer.recv()
        peer.raw(tail)
        await peer.writer.drain()
        peer.writer.close()

    async def test(c: QmpClient) -> None:
        waiter = asyncio.ensure_future(c.wait_event("SUSPEND", timeout=20))
        await asyncio.sleep(0)
        with within(SLACK), pytest.raises(DeviceModelError) as e:
            await c.stop(timeout=20)
        assert not isinstance(e.value, Timeout)
        with within(SLACK), pytest.raises(DeviceModelError) as w:
            await waiter
        assert not isinstance(w.value, Timeout)
        assert not c.connected
        with within(0.2), pytest.raises(DeviceModelError):
            await c.query_status(timeout=20)
        with within(0.2), pytest.raises(DeviceModelError):
            await c.wait_event("WAKEUP", timeout=20)

    run_session(sock_path, script, test)


def test_server_closing_while_a_waiter_waits_for_an_event(sock_path: str) -> None:
    """Nothing in qemu.qmp wakes an event waiter when the connection drops."""

    async def script(peer: Peer) -> None:
        cmd = await peer.recv()
        peer.send({"return": {}, "id": cmd["id"]})
        peer.send({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}})
        await peer.writer.drain()
        peer.writer.close()

    async def test(c: QmpClient) -> None:
        mark = c.event_mark()
        await c.stop(timeout=5)
        with within(SLACK), pytest.raises(DeviceModelError, match=r"closed|lost"):
            await c.wait_event("SUSPEND", timeout=20)
        assert [e.name for e in c.events_since(mark)] == ["STOP"]

    run_session(sock_path, script, test)


def test_close_does_not_hang_on_a_peer_that_never_reads(sock_path: str) -> None:
    """qemu.qmp's disconnect() drains the writer first."""

    async def script(peer: Peer) -> None:
        await forever()  # never reads again

    async def test(c: QmpClient) -> None:
        big = "x" * (8 * 1024 * 1024)  # more than any socket buffer
        with pytest.raises(Timeout):
            await c.human_monitor_command(big, timeout=0.3)

    run_session(sock_path, script, test)


def test_commands_are_asked_once_per_connection(sock_path: str) -> None:
    """A QEMU's commands are fixed for its life: one ``query-commands`` per
    connection, and a new connection (perhaps another QEMU) asks again."""
    asked: list[int] = []

    async def main() -> None:
        async def handler(peer: Peer) -> None:
            await peer.handshake()
            n = len(asked)
            while True:
                cmd = await peer.recv()
                assert cmd["execute"] == "query-commands"
                asked.append(n)
                peer.send({"return": [{"name": f"only-in-qemu-{n}"}], "id": cmd["id"]})

        async with serving(sock_path, handler):
            client = QmpClient()
            for n in (0, 1):
                await client.connect(sock_path, timeout=5)
                assert await client.commands(timeout=5) == {f"only-in-qemu-{n}"}
                assert await client.commands(timeout=5) == {f"only-in-qemu-{n}"}
                await client.close(timeout=1)

    arun(main())
    assert asked == [0, 1]


def test_not_connected_is_an_error() -> None:
    async def main() -> None:
        with pytest.raises(DeviceModelError, match="not connected"):
            await QmpClient().query_status()

    arun(main())


# ---------------------------------------------------------------------------- events


def test_events_marks_waits_and_subscriptions(sock_path: str) -> None:
    async def script(peer: Peer) -> None:
        cmd = await peer.recv()
        # An event before the reply is recorded before execute() returns.
        peer.send({"event": "SUSPEND", "timestamp": {"seconds": 10, "microseconds": 500000}})
        peer.send({"return": {}, "id": cmd["id"]})
        cmd = await peer.recv()
        peer.send({"return": {}, "id": cmd["id"]})
        peer.send({"event": "WAKEUP", "timestamp": {"seconds": 11, "microseconds": 0}})
        peer.send(
            {
                "event": "RESET",
                "data": {"guest": True},
                "timestamp": {"seconds": 12, "microseconds": 0},
            }
        )
        await forever()

    async def test(c: QmpClient) -> None:
        seen: list[str] = []
        unsubscribe = c.subscribe(lambda e: seen.append(e.name), {"SUSPEND", "WAKEUP"})

        def broken(ev: QmpEvent) -> None:
            raise RuntimeError("a subscriber's bug must not kill the connection")

        c.subscribe(broken)
        mark = c.event_mark()
        await c.execute("stop", timeout=5)
        assert [e.name for e in c.events_since(mark)] == ["SUSPEND"]
        ev = await c.wait_event("SUSPEND", since=mark, timeout=0.1)  # already here
        assert ev.timestamp == 10.5 and ev.seq == mark
        with within(0.2 + SLACK), pytest.raises(Timeout):
            await c.wait_event("SUSPEND", timeout=0.2)  # a *new* one never comes
        mark = c.event_mark()
        await c.execute("system_wakeup", timeout=5)
        reset = await c.wait_event(
            {"RESET"}, since=mark, timeout=5, match=lambda e: e.data["guest"]
        )
        assert reset.data == {"guest": True}
        unsubscribe()
        assert seen == ["SUSPEND", "WAKEUP"]
        assert c.connected

    run_session(sock_path, script, test)


def test_event_history_is_bounded_and_nothing_piles_up(sock_path: str) -> None:
    """qemu.qmp's default listener would queue and keep every event forever."""
    n = EVENT_HISTORY + 500

    async def script(peer: Peer) -> None:
        for i in range(n):
            peer.send(
                {
                    "event": "RTC_CHANGE",
                    "data": {"offset": i},
                    "timestamp": {"seconds": 0, "microseconds": 0},
                }
            )
        cmd = await peer.recv()
        peer.send({"return": {}, "id": cmd["id"]})
        await forever()

    async def test(c: QmpClient) -> None:
        await c.execute("query-status", timeout=5)
        assert c.event_mark() == n
        kept = c.events_since(0)
        assert len(kept) == EVENT_HISTORY and kept[-1].data == {"offset": n - 1}
        lib = c._client
        assert lib is not None and lib.events.empty() and lib.events.history == ()

    run_session(sock_path, script, test)


# ---------------------------------------------------------------------------- guest agent


@contextlib.asynccontextmanager
async def agent_server(
    path: str, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> AsyncIterator[None]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (EOFError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path=path)
    try:
        yield
    finally:
        server.close()


def test_agent_sync_discards_stale_output(sock_path: str) -> None:
    async def main() -> None:
        async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b'{"return": "stale from an earlier client"}\n{"ret')  # junk first
            data = await reader.readuntil(b"}}")
            assert data.startswith(b"\xff")  # the client reset our parser
            token = json.loads(data[1:])["arguments"]["id"]
            writer.write(b"\xff" + json.dumps({"return": token + 1}).encode() + b"\n")  # stale
            writer.write(json.dumps({"return": token}).encode() + b"\n")
            await reader.readuntil(b"}")
            writer.write(b'{"return": {}}\n')
            await forever()

        async with agent_server(sock_path, agent), GuestAgent() as ga:
            await ga.connect(sock_path, timeout=5)
            await ga.sync(timeout=5)
            await ga.ping(timeout=5)

    arun(main())


def test_agent_suspend_ram_error_timeout_and_death(sock_path: str) -> None:
    async def main() -> None:
        replies = [b'{"error": {"class": "GenericError", "desc": "no S3 here"}}\n', None, b"close"]

        async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await reader.readuntil(b"}")
                reply = replies.pop(0)
                if reply == b"close":
                    return
                if reply is not None:
                    writer.write(reply)

        async with agent_server(sock_path, agent), GuestAgent(domid=5) as ga:
            await ga.connect(sock_path, timeout=5)
            never = asyncio.get_running_loop().create_future()
            with within(SLACK), pytest.raises(QmpCommandError, match="no S3 here") as e:
                await ga.suspend_ram(never, timeout=5)
            assert e.value.domid == 5
            with within(0.3 + SLACK), pytest.raises(Timeout):
                await ga.suspend_ram(asyncio.get_running_loop().create_future(), timeout=0.3)
            with within(SLACK), pytest.raises(DeviceModelError) as d:
                await ga.ping(timeout=5)
            assert not isinstance(d.value, Timeout)

    arun(main())


def test_agent_missing_socket(sock_path: str) -> None:
    async def main() -> None:
        with within(0.5), pytest.raises(DeviceModelError, match="guest agent"):
            await GuestAgent().connect(sock_path, timeout=5)

    arun(main())

"""Fuzzing torpor's QMP client and qemu-ga client against hostile servers.

The QMP server's greeting, its answer to ``qmp_capabilities`` and its answer
to every later command are drawn by hypothesis: a correct reply, a return
value of the wrong shape, the wrong id or none, an error object (well formed
or not), garbage, JSON that is not an object, JSON nested deeper than
Python's recursion limit, an overlong line, an event with garbage fields
first, silence, a hang-up.  The guest agent likewise, around
``guest-sync-delimited``'s sentinel.  Whatever they do, every call of
:class:`torpor.qmp.QmpClient` / :class:`torpor.qmp.GuestAgent` returns a
value of the right type or raises a :class:`~torpor.errors.TorporError`
within its deadline, and ``close()`` never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given
from qmp_hostile import GREETING, Peer, serving

from torpor.errors import DeviceModelError, TorporError
from torpor.qmp import GuestAgent, QmpClient, QmpEvent

from . import budget

#: Deadline of every call in these tests; slack for the loop and for the adapter's
#: own bounded waits on a dying connection (up to 1 s for the watcher to name the cause).
T = 0.15
SLACK = 1.5

DEEP = b"[" * 100_000 + b"\r\n"  # json.loads: RecursionError, not a JSONDecodeError
HUGE = b'{"return": "' + b"x" * 300_000 + b'"}\r\n'

GREETINGS = ["ok", "ok", "ok", "garbage", "array", "no_qmp", "qmp_not_object", "deep", "stall"]
GREETINGS += ["close", "event_first"]
NEGOTIATION = ["ok", "ok", "ok", "error", "wrong_id", "garbage", "close", "stall", "deep"]
ACTIONS = ["ok", "ok", "ok", "wrong_shape", "wrong_id", "no_id", "error", "bad_error"]
ACTIONS += ["garbage", "not_object", "deep", "huge", "event_first", "bad_event_first"]
ACTIONS += ["silence", "close", "truncated"]
JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=6,
)


def good_return(cmd: str) -> Any:
    return {
        "query-status": {"status": "running", "running": True, "singlestep": False},
        "query-commands": [{"name": "stop"}, {"name": "cont"}],
        "query-current-machine": {"wakeup-suspend-support": True},
        "human-monitor-command": "output\r\n",
    }.get(cmd, {})


class QmpScript:
    def __init__(self, greeting: str, negotiation: str, actions: list[str], junk: list[Any]):
        self.greeting = greeting
        self.negotiation = negotiation
        self.actions = actions
        self.junk = junk or [None]

    def j(self, i: int) -> Any:
        return self.junk[i % len(self.junk)]

    async def __call__(self, peer: Peer) -> None:
        g = self.greeting
        if g == "stall":
            await asyncio.Event().wait()
        if g == "close":
            return
        if g == "event_first":
            peer.send({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}})
        peer.raw(
            {
                "garbage": b"\xff\xfe not json\r\n",
                "array": b"[1, 2]\r\n",
                "no_qmp": b'{"hello": 1}\r\n',
                "qmp_not_object": b'{"QMP": 5}\r\n',
                "deep": DEEP,
            }.get(g, json.dumps(GREETING).encode() + b"\r\n")
        )
        cmd = await peer.recv()
        if not await self.answer(peer, cmd, self.negotiation, 0):
            return
        i = 0
        while True:
            cmd = await peer.recv()
            action = self.actions[i] if i < len(self.actions) else "ok"
            i += 1
            if not await self.answer(peer, cmd, action, i):
                return

    async def answer(self, peer: Peer, cmd: dict[str, Any], action: str, i: int) -> bool:
        """Answer one command; False: the script ends (hang-up or stall)."""
        rid = cmd.get("id")
        ret = good_return(str(cmd.get("execute")))
        if action == "ok":
            peer.send({"return": ret, "id": rid})
        elif action == "wrong_shape":
            peer.send({"return": self.j(i), "id": rid})
        elif action == "wrong_id":
            peer.send({"return": ret, "id": f"{rid}-not"})
        elif action == "no_id":
            peer.send({"return": ret})
        elif action == "error":
            peer.send({"error": {"class": "GenericError", "desc": "refused"}, "id": rid})
        elif action == "bad_error":
            peer.send({"error": self.j(i), "id": rid})
        elif action == "garbage":
            peer.raw(b"\x00\xff{{]]\r\n")
        elif action == "not_object":
            peer.send([rid, self.j(i)])
        elif action == "deep":
            peer.raw(DEEP)
        elif action == "huge":
            peer.raw(HUGE)
        elif action == "event_first":
            peer.send({"event": "SUSPEND", "data": {}, "timestamp": {"seconds": 2}})
            peer.send({"return": ret, "id": rid})
        elif action == "bad_event_first":
            peer.send({"event": self.j(i), "data": self.j(i + 1), "timestamp": self.j(i + 2)})
            peer.send({"return": ret, "id": rid})
        elif action == "silence":
            return True
        elif action == "close":
            return False
        elif action == "truncated":
            peer.raw(json.dumps({"return": ret, "id": rid}).encode()[:7])
            await peer.writer.drain()
            await asyncio.Event().wait()
        elif action == "stall":
            await asyncio.Event().wait()
        await peer.writer.drain()
        return True


async def _q_ops(c: QmpClient, name: str) -> None:
    if name == "execute":
        await c.execute("stop", timeout=T)
    elif name == "query_status":
        assert isinstance(await c.query_status(timeout=T), str)
    elif name == "wakeup_supported":
        assert isinstance(await c.wakeup_supported(timeout=T), bool)
    elif name == "commands":
        cmds = await c.commands(timeout=T)
        assert isinstance(cmds, frozenset) and all(isinstance(x, str) for x in cmds)
    elif name == "hmp":
        assert isinstance(await c.human_monitor_command("info status", timeout=T), str)
    elif name == "wait_event":
        ev = await c.wait_event(["SUSPEND", "RESUME"], timeout=T, since=0)
        assert isinstance(ev, QmpEvent) and isinstance(ev.data, dict)
    elif name == "system_wakeup":
        await c.system_wakeup(timeout=T)


Q_OPS = ["execute", "query_status", "wakeup_supported", "commands", "hmp", "wait_event"]
Q_OPS += ["system_wakeup"]


@contextlib.contextmanager
def within(seconds: float, what: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    took = time.monotonic() - t0
    assert took < seconds, f"{what} took {took:.2f}s (allowed {seconds:.2f}s)"


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="fzq", dir="/tmp")
    yield os.path.join(d, "s")
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


def _outcome(key: str, fn: Callable[[], Awaitable[None]]) -> Awaitable[None]:
    async def run() -> None:
        try:
            await fn()
            budget.STATS[f"{key}: calls answered"] += 1
        except TorporError:
            budget.STATS[f"{key}: calls that raised a TorporError"] += 1

    return run()


@budget.fuzz(ci_examples=80)
@given(
    greeting=st.one_of(st.just("ok"), st.sampled_from(GREETINGS)),
    negotiation=st.one_of(st.just("ok"), st.sampled_from(NEGOTIATION)),
    actions=st.lists(st.sampled_from(ACTIONS), max_size=6),
    junk=st.lists(JSON_JUNK, max_size=3),
    ops=st.lists(st.sampled_from(Q_OPS), min_size=1, max_size=5),
)
def test_qmp_client_against_a_hostile_device_model(
    sock_path: str,
    greeting: str,
    negotiation: str,
    actions: list[str],
    junk: list[Any],
    ops: list[str],
) -> None:
    script = QmpScript(greeting, negotiation, actions, junk)
    if os.path.exists(sock_path):
        os.unlink(sock_path)

    async def main() -> None:
        async with serving(sock_path, script):
            c = QmpClient(domid=3)
            try:
                with within(T + SLACK, "connect"):
                    try:
                        await c.connect(sock_path, timeout=T)
                    except TorporError:
                        budget.STATS["qmp: connects refused"] += 1
                        return
                for name in ops:
                    with within(T + SLACK, name):
                        await _outcome("qmp", lambda name=name: _q_ops(c, name))
            finally:
                with within(2 * T + SLACK, "close"):
                    await c.close(timeout=T)

    asyncio.run(asyncio.wait_for(main(), 60))
    budget.STATS["qmp: examples"] += 1


# ---------------------------------------------------------------------- qemu-ga

AGENT_ACTIONS = ["ok", "ok", "ok", "stale_first", "error", "garbage", "not_object", "deep"]
AGENT_ACTIONS += ["huge_line", "no_sentinel", "silence", "close", "wrong_token"]


class AgentScript:
    def __init__(self, actions: list[str], junk: list[Any]) -> None:
        self.actions = actions
        self.junk = junk or [None]

    async def __call__(self, peer: Peer) -> None:
        i = 0
        while True:
            cmd = await peer.recv()
            action = self.actions[i] if i < len(self.actions) else "ok"
            i += 1
            name = cmd.get("execute")
            args = cmd.get("arguments") if isinstance(cmd.get("arguments"), dict) else {}
            token = args.get("id")  # type: ignore[union-attr]
            sync = name == "guest-sync-delimited"
            ok = {"return": token if sync else {}}
            head = b"\xff" if sync else b""
            if action == "ok":
                peer.raw(head + json.dumps(ok).encode() + b"\n")
            elif action == "stale_first":
                peer.raw(b'{"return": "stale"}\n' + head + b'{"return": 1}\n')
                peer.raw(json.dumps(ok).encode() + b"\n")
            elif action == "error":
                peer.raw(head + json.dumps({"error": self.junk[i % len(self.junk)]}).encode())
                peer.raw(b"\n")
            elif action == "garbage":
                peer.raw(head + b"\x01{{not json\n")
            elif action == "not_object":
                peer.raw(head + b"[1, 2]\n")
            elif action == "deep":
                peer.raw(head + b"[" * 60_000 + b"\n")
            elif action == "huge_line":
                peer.raw(head + b"x" * 200_000 + b"\n")
            elif action == "no_sentinel":
                peer.raw(b"x" * 100_000)
            elif action == "wrong_token":
                peer.raw(head + json.dumps({"return": "not the token"}).encode() + b"\n")
            elif action == "silence":
                continue
            elif action == "close":
                return
            await peer.writer.drain()


async def _a_ops(a: GuestAgent, name: str) -> None:
    if name == "sync":
        await a.sync(timeout=T)
    elif name == "ping":
        await a.ping(timeout=T)
    elif name == "execute":
        await a.execute("guest-info", timeout=T)
    elif name == "suspend_ram":
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await a.suspend_ram(never, timeout=T)
    elif name == "request_suspend_ram":
        errors: list[DeviceModelError] = []
        await a.request_suspend_ram(errors.append, timeout=T)
        await asyncio.sleep(0)
        assert all(isinstance(e, DeviceModelError) for e in errors)


A_OPS = ["sync", "ping", "execute", "suspend_ram", "request_suspend_ram"]


@budget.fuzz(ci_examples=50)
@given(
    actions=st.lists(st.sampled_from(AGENT_ACTIONS), max_size=6),
    junk=st.lists(JSON_JUNK, max_size=3),
    ops=st.lists(st.sampled_from(A_OPS), min_size=1, max_size=5),
)
def test_guest_agent_against_a_hostile_agent(
    sock_path: str, actions: list[str], junk: list[Any], ops: list[str]
) -> None:
    script = AgentScript(actions, junk)
    if os.path.exists(sock_path):
        os.unlink(sock_path)

    async def main() -> None:
        async with serving(sock_path, script):
            a = GuestAgent(domid=4)
            try:
                await a.connect(sock_path, timeout=T)
                for name in ops:
                    with within(T + SLACK, name):
                        await _outcome("qemu-ga", lambda name=name: _a_ops(a, name))
            finally:
                with within(1.0 + SLACK, "close"):
                    await a.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    budget.STATS["qemu-ga: examples"] += 1

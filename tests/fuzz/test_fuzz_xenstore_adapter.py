"""Fuzzing torpor's xenstore adapter against a hostile xenstored.

A scripted server answers each request the adapter sends with an action
hypothesis draws: a correct reply, a reply with a garbage payload, the wrong
req_id / type / tx_id, an error with any payload, a random watch event (well
formed or not) first, a frame cut short (then a hang-up or a stall), a huge
length, random bytes, no answer, a hang-up.  Whatever it does, every call of
the adapter (sync and asyncio) returns a value of the right type or raises a
:class:`~torpor.errors.TorporError`, within its deadline; once the
connection is lost every later call fails at once; and ``close()`` returns
promptly and ends the router thread, whatever state the stream is in.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given
from xs_hostile import HostileServer, recv_request, reply

from torpor.errors import TorporError, XenstoreConnectionLost
from torpor.xenstore import Perm, Transaction, Xenstore
from torpor.xs_wire import HEADER, PAYLOAD_MAX, Op

from . import budget

#: The adapter's per-request deadline in these tests, and the slack allowed past it.
TIMEOUT = 0.1
SLACK = 0.5

ACTIONS = [
    "ok",
    "ok",
    "ok",
    "garbage_payload",
    "wrong_req_id",
    "wrong_type",
    "wrong_tx",
    "error",
    "event_first",
    "bad_event_first",
    "truncated_close",
    "truncated_stall",
    "huge_len",
    "garbage_close",
    "no_answer",
    "close",
    "twice",
]


def ok_payload(op: int, body: bytes) -> bytes:
    if op == Op.READ:
        return b"value"
    if op == Op.DIRECTORY:
        return b"a\0b\0"
    if op == Op.TRANSACTION_START:
        return b"7\0"
    if op == Op.GET_PERMS:
        return b"n0\0r1\0"
    if op == Op.GET_DOMAIN_PATH:
        return b"/local/domain/" + body.rstrip(b"\0") + b"\0"
    if op == Op.IS_DOMAIN_INTRODUCED:
        return b"T\0"
    return b"OK\0"


class Script:
    """The server's behaviour: one action per request, then correct replies."""

    def __init__(self, actions: list[str], garbage: list[bytes]) -> None:
        self.actions = list(actions)
        self.garbage = garbage
        self.release = threading.Event()

    def g(self, i: int) -> bytes:
        return self.garbage[i % len(self.garbage)] if self.garbage else b""

    def __call__(self, conn: socket.socket) -> None:
        n = 0
        while (req := recv_request(conn)) is not None:
            op, rq, tx, body = req
            action = self.actions[n] if n < len(self.actions) else "ok"
            n += 1
            good = ok_payload(op, body)
            if action == "ok":
                reply(conn, op, rq, tx, good)
                if op == Op.WATCH:
                    path, token = body.split(b"\0")[:2]
                    reply(conn, Op.WATCH_EVENT, 0, 0, path + b"\0" + token + b"\0")
            elif action == "garbage_payload":
                reply(conn, op, rq, tx, self.g(n))
            elif action == "wrong_req_id":
                reply(conn, op, rq ^ 0x5A5A, tx, good)
            elif action == "wrong_type":
                reply(conn, (op + 1) % 23, rq, tx, good)
            elif action == "wrong_tx":
                reply(conn, op, rq, tx + 1, good)
            elif action == "error":
                reply(conn, Op.ERROR, rq, tx, self.g(n))
            elif action == "event_first":
                reply(conn, Op.WATCH_EVENT, 0, 0, b"/elsewhere\0torpor/1\0")
                reply(conn, op, rq, tx, good)
            elif action == "bad_event_first":
                reply(conn, Op.WATCH_EVENT, 0, 0, self.g(n))
                reply(conn, op, rq, tx, good)
            elif action in ("truncated_close", "truncated_stall"):
                frame = HEADER.pack(op, rq, tx, len(good)) + good
                conn.sendall(frame[: max(1, len(frame) // 2)])
                if action == "truncated_stall":
                    self.release.wait(30)
                return
            elif action == "huge_len":
                conn.sendall(HEADER.pack(op, rq, tx, PAYLOAD_MAX + 1 + len(self.g(n))))
                self.release.wait(30)
                return
            elif action == "garbage_close":
                conn.sendall(self.g(n) or b"\xff")
                return
            elif action == "no_answer":
                continue
            elif action == "close":
                return
            elif action == "twice":
                reply(conn, op, rq, tx, good)
                reply(conn, op, rq, tx, good)


GARBAGE = [
    *(b"", b"\0", b"x", b"-1\0", b"99999999999999999999\0", b"ENOENT", b"EAGAIN\0"),
    *(b"OK", b"q1\0", b"T", b"\xff\xfe\0", b"a\0b\0c\0", b"\0\0\0"),
]


# The client's side: each op is (name, call, how many requests it may send).
def _tx_ops(xs: Xenstore) -> None:
    tx = xs.transaction_start()
    assert isinstance(tx, Transaction)
    tx.read_or("/t/a", None)
    xs.transaction_end(tx, commit=True)


def _wait(xs: Xenstore) -> None:
    with pytest.raises(TorporError):
        xs.wait("/w", lambda v: v == "never", timeout=TIMEOUT)


def _aio(xs: Xenstore) -> None:
    async def go() -> None:
        await xs.aio.read_or("/a", None)
        tx = await xs.aio.transaction_start()
        await xs.aio.transaction_end(tx, commit=False)
        w = await xs.aio.watch("/w", lambda p, t: None)
        await xs.aio.unwatch(w)

    asyncio.run(asyncio.wait_for(go(), 30))


def _watch(xs: Xenstore) -> None:
    seen: list[str] = []
    w = xs.watch("/w", lambda p, t: seen.append(p))
    w.unwatch()


def _check_type(value: Any, kind: type | tuple[type, ...]) -> Any:
    assert isinstance(value, kind), (value, kind)
    return value


CLIENT_OPS: dict[str, tuple[Callable[[Xenstore], Any], int]] = {
    "read": (lambda xs: _check_type(xs.read("/a"), str), 1),
    "read_raw": (lambda xs: _check_type(xs.read("/a", raw=True), bytes), 1),
    "read_or": (lambda xs: xs.read_or("/a", None), 1),
    "write": (lambda xs: xs.write("/a", ""), 1),
    "mkdir": (lambda xs: xs.mkdir("/a"), 1),
    "rm": (lambda xs: xs.rm("/a"), 1),
    "ls": (lambda xs: [_check_type(n, str) for n in xs.ls("/a")], 1),
    "exists": (lambda xs: _check_type(xs.exists("/a"), bool), 1),
    "get_perms": (lambda xs: [_check_type(p, Perm) for p in xs.get_perms("/a")], 1),
    "set_perms": (lambda xs: xs.set_perms("/a", ["n0", "r1"]), 1),
    "get_domain_path": (lambda xs: _check_type(xs.get_domain_path(1), str), 1),
    "is_introduced": (lambda xs: _check_type(xs.is_introduced(1), bool), 1),
    "resume": (lambda xs: xs.resume(1), 1),
    "introduce": (lambda xs: xs.introduce(1, 5, 6), 1),
    "release": (lambda xs: xs.release(1), 1),
    "transaction": (_tx_ops, 3),
    "run_transaction": (lambda xs: xs.run_transaction(lambda tx: tx.ls("/a"), attempts=2), 6),
    "watch": (_watch, 2),
    "wait": (_wait, 4),
    "aio": (_aio, 6),
}


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="fza", dir="/tmp")
    yield os.path.join(d, "xs")
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


def run_client(path: str, ops: list[str]) -> tuple[int, int]:
    """Run ``ops``; return (calls that succeeded, calls that raised a TorporError)."""
    xs = Xenstore(path, timeout=TIMEOUT).connect()
    router = xs._router
    assert router is not None
    ok = failed = 0
    try:
        for name in ops:
            fn, requests = CLIENT_OPS[name]
            lost_before = xs.lost is not None
            t0 = time.monotonic()
            try:
                fn(xs)
                ok += 1
            except TorporError as e:
                failed += 1
                if lost_before:
                    assert isinstance(e, XenstoreConnectionLost), e
            elapsed = time.monotonic() - t0
            limit = (0.05 if lost_before else requests * TIMEOUT) + SLACK
            assert elapsed < limit, f"{name} took {elapsed:.2f}s (limit {limit:.2f}s)"
    finally:
        t0 = time.monotonic()
        xs.close()
        assert time.monotonic() - t0 < 2.0, "close() hung"
        router.thread.join(2.0)
        assert not router.thread.is_alive(), "the router thread outlived close()"
    return ok, failed


@budget.fuzz(ci_examples=50)
@given(
    actions=st.lists(st.sampled_from(ACTIONS), max_size=8),
    garbage=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(GARBAGE),
        ),
        max_size=4,
    ),
    ops=st.lists(st.sampled_from(sorted(CLIENT_OPS)), min_size=1, max_size=6),
)
def test_adapter_against_a_hostile_server(
    sock_path: str, actions: list[str], garbage: list[bytes], ops: list[str]
) -> None:
    script = Script(actions, garbage)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = HostileServer(sock_path, script)
    try:
        ok, failed = run_client(sock_path, ops)
    finally:
        script.release.set()
        server.close()
    budget.STATS["xenstore adapter: examples"] += 1
    budget.STATS["xenstore adapter: calls"] += ok + failed
    budget.STATS["xenstore adapter: calls that raised a TorporError"] += failed


@pytest.mark.slow
def test_adapter_against_random_byte_streams(sock_path: str) -> None:
    """A server answering every request with random bytes, for a time budget."""
    r = budget.rng()
    end = time.monotonic() + budget.seconds(2.0)
    streams = 0
    while time.monotonic() < end:
        chunks = [r.randbytes(r.randrange(0, 64)) for _ in range(r.randrange(1, 5))]
        # Sometimes a well-formed header with a plausible length around the chunk.
        if r.random() < 0.5:
            op, length = r.choice(list(Op)), r.randrange(0, 80)
            chunks.insert(0, HEADER.pack(op, r.randrange(4), 0, length))

        def handler(conn: socket.socket, chunks: list[bytes] = chunks) -> None:
            for c in chunks:
                if recv_request(conn) is None:
                    return
                conn.sendall(c)

        if os.path.exists(sock_path):
            os.unlink(sock_path)
        server = HostileServer(sock_path, handler)
        try:
            run_client(sock_path, [r.choice(sorted(CLIENT_OPS)) for _ in range(3)])
        finally:
            server.close()
        streams += 1
    budget.STATS["xenstore adapter random streams"] += streams
    assert streams > 0

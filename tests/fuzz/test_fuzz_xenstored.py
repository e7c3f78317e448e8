"""Fuzzing the simulated xenstored with mutated and random request streams.

Several clients at once send streams of requests -- well-formed ones from a
grammar of the protocol, then mutated (wrong lengths, types, transaction ids,
NULs moved, frames cut short or oversized, flipped bytes, junk) -- in
interleaved chunks, while two bystanders (dom0 with a watch, and guest 2)
keep doing round trips that must come back right.  For every stream
xenstored must answer each frame it can parse, in order, echoing req_id and
tx_id (or drop the connection exactly when a length exceeds the maximum),
hang up when the client does, log no internal error, and leave a consistent
store: one tree, accounting equal to what is stored, no transaction copy,
watch or connection left behind by a client that went.

Two families: hostile *guests* (domain 1's socket, unprivileged), after
which nothing a guest may not touch has changed; and *dom0* clients
(privileged: introduce, release, set_target, debug...).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given

from torpor.xs_wire import HEADER, Op
from torpor_sim.xenstored import Xenstored

from . import budget
from .xs_rig import CONN_DEADLINE, Rig, no_internal_errors, read_all
from .xs_streams import random_frames, server_view, stream_strategy

GUEST_PATHS = [
    "name",
    "data/x",
    "data",
    "control/shutdown",
    "device/suspend/event-channel",
    "device/vif/0/state",
    "/local/domain/1",
    "/local/domain/1/data/y",
    "/local/domain/1/control",
    "/local/domain/1/control/new",
    "/local/domain/2",
    "/local/domain/2/data/by",
    "/local/domain/2/name",
    "/local/domain/0",
    "/local/domain/0/backend/vif/1/0/state",
    "/local/domain/0/backend/vif/2/0/state",
    "/libxl/1",
    "/libxl/9",
    "/vm/00000000-0000-0000-0000-000000000001/name",
    "/tool/xenstored",
    "/",
]
DOM0_PATHS = [
    "/",
    "/fz",
    "/fz/a",
    "/fz/a/b",
    "/tool",
    "/tool/xenstored",
    "/local/domain/1",
    "/local/domain/1/data",
    "/local/domain/1/device/vif/0",
    "rel",
    "rel/a",
]
BYSTANDER_KEYS = {"/local/domain/2/data/by"}
#: What an unprivileged connection sends, privileged operations included (EACCES).
GUEST_OPS = [int(o) for o in Op]


@pytest.fixture(scope="module")
def guest_rig() -> Iterator[Rig]:
    r = Rig(introduce=(1, 2))
    yield r
    r.close()


@pytest.fixture(scope="module")
def dom0_rig() -> Iterator[Rig]:
    # Domain 2 (the bystander guest) is unknown to the hypervisor here, so no
    # fuzzed introduce/release can take the bystander's connection away.
    r = Rig(introduce=(1,))
    yield r
    r.close()


def _guarded_nodes(xs: Xenstored, hostile: int) -> dict[str, Any]:
    """Every node the hostile domain does not own (the bystanders' own keys aside),
    with what must not change."""
    return {
        path: (node.value, node.perms)
        for path, node in xs.tree_snapshot().items()
        if node.perms[0][1:] != str(hostile)
        and path not in BYSTANDER_KEYS
        and not path.startswith("/bystander/")
    }


def run_streams(
    rig: Rig, paths: list[str], streams: list[bytes], plan: list[tuple[int, int]]
) -> int:
    """Send ``streams`` on their own connections in the chunks ``plan`` says, with
    bystander round trips between; check every connection's answers.

    Returns the number of frames the server processed.
    """
    socks = []
    for path in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CONN_DEADLINE)
        s.connect(path)
        socks.append(s)
    sent = [0] * len(streams)
    broken = [False] * len(streams)

    def send(i: int, n: int) -> None:
        if broken[i] or sent[i] >= len(streams[i]):
            return
        chunk = streams[i][sent[i] : sent[i] + n]
        try:
            socks[i].sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            broken[i] = True
            return
        sent[i] += len(chunk)

    try:
        for k, (i, n) in enumerate(plan):
            send(i % len(streams), n)
            if k % 3 == 2:
                rig.bystanders_round_trip()
        for i in range(len(streams)):
            send(i, len(streams[i]))
            if not broken[i]:
                socks[i].shutdown(socket.SHUT_WR)
        processed = 0
        deadline = time.monotonic() + CONN_DEADLINE
        for i, s in enumerate(socks):
            frames, closed = read_all(s, deadline)
            assert closed, f"connection {i} not hung up on within {CONN_DEADLINE}s"
            expected, dropped = server_view(streams[i])
            if broken[i]:
                assert dropped, "the server hung up on a stream it should have kept reading"
            replies = [f for f in frames if f[0] != Op.WATCH_EVENT]
            events = [f for f in frames if f[0] == Op.WATCH_EVENT]
            assert [(r[1], r[2]) for r in replies] == [(e[1], e[2]) for e in expected], (
                f"connection {i}: replies do not answer the requests in order"
            )
            for (rtype, *_), (etype, *_) in zip(replies, expected, strict=True):
                assert rtype in (etype, Op.ERROR), (rtype, etype)
            for _t, rid, tx, data in events:
                assert rid == 0 and tx == 0
                assert data.count(b"\0") == 2 and data.endswith(b"\0"), data
            processed += len(expected)
        rig.bystanders_round_trip()
        return processed
    finally:
        for s in socks:
            s.close()


def chunk_plan() -> st.SearchStrategy[list[tuple[int, int]]]:
    return st.lists(st.tuples(st.integers(0, 3), st.integers(1, 600)), max_size=12)


@budget.fuzz(ci_examples=120)
@given(
    streams=st.lists(
        stream_strategy(GUEST_PATHS, GUEST_OPS),
        min_size=1,
        max_size=3,
    ),
    plan=chunk_plan(),
)
def test_hostile_guests_cannot_crash_hang_or_escape(
    guest_rig: Rig, caplog: Any, streams: list[bytes], plan: list[tuple[int, int]]
) -> None:
    rig = guest_rig
    before = rig.call(lambda x: _guarded_nodes(x, 1))
    specials = rig.call(lambda x: dict(x._special_perms))
    with no_internal_errors(caplog):
        n = run_streams(rig, [rig.guest_socks[1]] * len(streams), streams, plan)
        rig.settle()
    budget.STATS["xenstored guest streams: examples"] += 1
    budget.STATS["xenstored guest streams: frames processed"] += n
    budget.STATS["xenstored guest streams: bytes"] += sum(map(len, streams))
    rig.check_invariants()
    after = rig.call(lambda x: _guarded_nodes(x, 1))
    # A guest changes nothing it does not own, and owns nothing new outside its tree.
    assert after == before
    assert rig.call(lambda x: dict(x._special_perms)) == specials
    q = rig.xs.quotas
    assert rig.call(lambda x: x.entry_count(1)) < q.entries_per_domain
    assert len(rig.call(lambda x: x.watches())) == 1  # the bystander's


@budget.fuzz(ci_examples=100)
@given(
    streams=st.lists(
        stream_strategy(DOM0_PATHS, privileged=True),
        min_size=1,
        max_size=3,
    ),
    plan=chunk_plan(),
)
def test_mutated_dom0_streams_are_answered_or_dropped(
    dom0_rig: Rig, caplog: Any, streams: list[bytes], plan: list[tuple[int, int]]
) -> None:
    rig = dom0_rig
    with no_internal_errors(caplog):
        n = run_streams(rig, [rig.sock] * len(streams), streams, plan)
        rig.settle()
    budget.STATS["xenstored dom0 streams: examples"] += 1
    budget.STATS["xenstored dom0 streams: frames processed"] += n
    budget.STATS["xenstored dom0 streams: bytes"] += sum(map(len, streams))
    rig.check_invariants()
    assert len(rig.call(lambda x: x.watches())) == 1  # the bystander's


@pytest.mark.slow
@pytest.mark.parametrize("who", ["guest", "dom0"])
def test_random_streams_time_boxed(who: str, caplog: Any) -> None:
    """Random frames (random types, ids, payloads, rare bad lengths) for a time budget."""
    rig = Rig(introduce=(1, 2) if who == "guest" else (1,))
    r = budget.rng()
    seconds = budget.seconds(2.5)
    own = GUEST_PATHS if who == "guest" else DOM0_PATHS
    path = rig.guest_socks[1] if who == "guest" else rig.sock
    frames = 0
    try:
        before = rig.call(lambda x: _guarded_nodes(x, 1))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            streams = [
                random_frames(r, own, r.randrange(1, 60), privileged=who == "dom0")
                for _ in range(r.randrange(1, 4))
            ]
            plan = [(r.randrange(4), r.randrange(1, 2000)) for _ in range(r.randrange(6))]
            with no_internal_errors(caplog):
                frames += run_streams(rig, [path] * len(streams), streams, plan)
                rig.settle()
            rig.check_invariants()
            if who == "guest":
                assert rig.call(lambda x: _guarded_nodes(x, 1)) == before
            budget.STATS[f"xenstored random {who} streams: bytes"] += sum(map(len, streams))
        budget.STATS[f"xenstored random {who} streams: frames processed"] += frames
        budget.STATS[f"xenstored random {who} streams: seconds"] += seconds
        assert frames > 0
    finally:
        rig.close()


def test_clients_that_stall_or_never_read_do_not_block_others(guest_rig: Rig) -> None:
    """One client stops mid-frame, one floods requests and never reads a reply, one
    opens transactions and watches and goes: the bystanders are served throughout,
    and what the departed ones held is released."""
    rig = guest_rig
    path = rig.guest_socks[1]
    stall = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (stall, flood, holder):
        s.connect(path)
    try:
        stall.sendall(HEADER.pack(Op.READ, 1, 0, 100) + b"data/")  # 5 of 100 bytes
        read = HEADER.pack(Op.READ, 2, 0, 5) + b"name\0"
        flood.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 8 << 20:  # until our send buffer is full, replies unread
                sent += flood.send(read * 256)
        holder.sendall(HEADER.pack(Op.TRANSACTION_START, 3, 0, 1) + b"\0")
        holder.sendall(HEADER.pack(Op.WATCH, 4, 0, 11) + b"data\0tok-h\0")
        for _ in range(20):
            rig.bystanders_round_trip()
        assert rig.call(lambda x: x.transaction_count()) == 1
    finally:
        for s in (stall, flood, holder):
            s.close()
    rig.settle()
    rig.check_invariants()
    assert len(rig.call(lambda x: x.watches())) == 1  # the bystander's
    rig.bystanders_round_trip()

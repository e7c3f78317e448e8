"""Generators of xenstore request streams, well-formed and mutated, for the fuzzers.

A stream is a list of frames (``<IIII`` header + payload).  Frames are built
from a grammar of the requests a client can make (paths, values, tokens,
permissions, domids, in their valid and invalid forms), then some are
mutated the way a buggy or hostile client would: a wrong length field, a
NUL moved or removed, a frame cut short, an oversized payload, flipped bytes,
junk between frames.  :func:`server_view` says what xenstored must make of
the resulting byte stream: which frames it processes (and must answer, in
order) and whether it must drop the connection.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import hypothesis.strategies as st

from torpor.xs_wire import HEADER, PAYLOAD_MAX, REL_PATH_MAX, Op

U32 = 0xFFFFFFFF

SPECIAL = ["@releaseDomain", "@introduceDomain", "@other", "@"]
INVALID_PATHS = [
    "",
    "/fz//a",
    "/fz/",
    "/fz/a b",
    "/fz/\u00fc",
    "/fz/a\x01",
    "/local/domain/1/" + "x" * REL_PATH_MAX,  # at the limit (valid)
    "/local/domain/1/" + "x" * (REL_PATH_MAX + 1),
    "/" + "y" * (REL_PATH_MAX + 1),
    "x" * (REL_PATH_MAX + 1),
    "../x",
    "/fz/../..",
    "/local/domain/99999/x",
    "/local/domain/-1/x",
]
PERMS = [
    "n0",
    "r0",
    "b0",
    "w0",
    "n1",
    "r1",
    "b1",
    "n2",
    "r2",
    "b2",
    "w0x10",
    "r010",
    "n-1",
    "n4294967295",
    "r99999999999999999999",
    "q1",
    "n",
    "",
    "b 1",
]
DOMIDS = ["0", "1", "2", "3", "-1", "4294967295", "32752", "abc", "", " 1", "1x", "0x1"]
DEBUG_CMDS = ["check", "help", "log", "print", "quota", "memreport", "logfile", "bogus", ""]


def path_strategy(own: Sequence[str]) -> st.SearchStrategy[str]:
    """Paths a client may name: its own vocabulary, specials, invalid ones, and random."""
    segment = st.sampled_from(["a", "b", "c", "state", "x-y", "_", "@"])
    random_abs = st.lists(segment, min_size=1, max_size=4).map(lambda s: "/fz/" + "/".join(s))
    return st.one_of(
        st.sampled_from(list(own)),
        random_abs,
        st.sampled_from(SPECIAL),
        st.sampled_from(INVALID_PATHS),
        st.text(
            alphabet=st.characters(codec="latin-1", exclude_characters="\0"),
            max_size=12,
        ),
    )


def _enc(s: str) -> bytes:
    return s.encode("latin-1", "replace")


value_strategy = st.one_of(
    st.sampled_from([b"", b"x", b"suspend", b"4", b"0", b"../..", b"-1"]),
    st.binary(max_size=64),
    st.integers(min_value=0, max_value=PAYLOAD_MAX).map(lambda n: b"v" * n),
)
token_strategy = st.one_of(st.sampled_from([b"t", b"tok", b"", b"\xff\xfe"]), st.binary(max_size=8))


@st.composite
def payload_strategy(draw: st.DrawFn, op: int, own: Sequence[str], privileged: bool) -> bytes:
    paths = path_strategy(own)
    if privileged and op == Op.SET_PERMS:
        # dom0 giving "/" to a guest, then that guest's destruction, wipes the
        # whole store, in C xenstored as in the simulation (domain_tree_remove()
        # removes what the dead domain owns): dom0's own foot-gun, not fuzzed.
        paths = paths.filter(lambda p: p != "/")

    def p() -> bytes:
        return _enc(draw(paths)) + b"\0"

    if op in (Op.READ, Op.DIRECTORY, Op.GET_PERMS, Op.MKDIR, Op.RM):
        return p()
    if op == Op.WRITE:
        return p() + draw(value_strategy)
    if op in (Op.WATCH, Op.UNWATCH):
        return p() + draw(token_strategy).replace(b"\0", b"") + b"\0"
    if op == Op.SET_PERMS:
        perms = draw(st.lists(st.sampled_from(PERMS), min_size=0, max_size=7))
        return p() + b"".join(_enc(x) + b"\0" for x in perms)
    if op == Op.TRANSACTION_START:
        return draw(st.sampled_from([b"\0", b"", b"x\0"]))
    if op == Op.TRANSACTION_END:
        return draw(st.sampled_from([b"T\0", b"F\0", b"T", b"X\0", b"T\0F\0", b""]))
    if op in (Op.RELEASE, Op.RESUME, Op.IS_DOMAIN_INTRODUCED, Op.GET_DOMAIN_PATH):
        return _enc(draw(st.sampled_from(DOMIDS))) + b"\0"
    if op == Op.INTRODUCE:
        parts = draw(st.lists(st.sampled_from(DOMIDS), min_size=0, max_size=4))
        return b"".join(_enc(x) + b"\0" for x in parts)
    if op == Op.SET_TARGET:
        parts = draw(st.lists(st.sampled_from(DOMIDS), min_size=0, max_size=3))
        return b"".join(_enc(x) + b"\0" for x in parts)
    if op == Op.DIRECTORY_PART:
        off = draw(st.sampled_from(["0", "1", "5", "99999", "-1", "x", ""]))
        return p() + _enc(off) + b"\0"
    if op == Op.DEBUG:
        words = draw(st.lists(st.sampled_from(DEBUG_CMDS + DOMIDS), min_size=0, max_size=3))
        return b"".join(_enc(x) + b"\0" for x in words)
    if op == Op.RESET_WATCHES:
        return draw(st.sampled_from([b"", b"\0", b"x"]))
    return draw(st.binary(max_size=32))


#: The requests of a typical session, drawn as often as all the others together.
COMMON = [
    int(o)
    for o in (
        *(Op.TRANSACTION_START, Op.TRANSACTION_END, Op.READ, Op.WRITE, Op.MKDIR, Op.RM),
        *(Op.DIRECTORY, Op.WATCH, Op.SET_PERMS),
    )
]
OPS = [int(o) for o in Op if o != Op.INVALID] + [int(Op.INVALID), 23, 24, 0x7FFFFFFF, U32]


@st.composite
def frame_strategy(
    draw: st.DrawFn,
    own: Sequence[str],
    ops: Sequence[int] = OPS,
    *,
    privileged: bool = False,
    open_tx: Sequence[int] = (),
) -> bytes:
    """One request frame, well-formed, maybe mutated.

    ``open_tx``: the transaction ids the connection has likely opened, which
    requests name most of the time (else 0 or any id).
    """
    op = draw(st.one_of(st.sampled_from(COMMON), st.sampled_from(list(ops))))
    payload = draw(payload_strategy(op, own, privileged))
    req_id = draw(st.one_of(st.integers(0, 8), st.integers(0, U32)))
    if op == Op.TRANSACTION_START:
        tx_choices = [0, 0, 0, 1]
    else:
        tx_choices = [0, 0, *open_tx, *open_tx, *open_tx] if open_tx else [0, 0, 0, 1]
    tx_id = draw(st.one_of(st.sampled_from(tx_choices), st.integers(0, U32)))
    length = len(payload)
    mutation = draw(
        st.sampled_from(
            ["none"] * 40
            + ["length", "nul_drop", "nul_add", "truncate", "oversize", "flip", "junk"]
        )
    )
    if mutation == "length":
        length = draw(
            st.sampled_from(
                [
                    max(0, length - 1),
                    length + 1,
                    0,
                    PAYLOAD_MAX,
                    PAYLOAD_MAX + 1,
                    U32,
                    0x80000000,
                ]
            )
        )
    elif mutation == "nul_drop" and b"\0" in payload:
        i = draw(st.sampled_from([i for i, b in enumerate(payload) if b == 0]))
        payload = payload[:i] + payload[i + 1 :]
        length = len(payload)
    elif mutation == "nul_add":
        i = draw(st.integers(0, len(payload)))
        payload = payload[:i] + b"\0" + payload[i:]
        length = len(payload)
    elif mutation == "oversize":
        payload = b"o" * draw(st.integers(PAYLOAD_MAX + 1, PAYLOAD_MAX + 600))
        length = len(payload)
    frame = HEADER.pack(op & U32, req_id, tx_id, length & U32) + payload
    if mutation == "truncate":
        frame = frame[: draw(st.integers(0, max(0, len(frame) - 1)))]
    elif mutation == "flip":
        i = draw(st.integers(0, len(frame) - 1))
        frame = frame[:i] + bytes([draw(st.integers(0, 255))]) + frame[i + 1 :]
    elif mutation == "junk":
        frame += draw(st.binary(min_size=1, max_size=40))
    return frame


@st.composite
def stream_strategy(
    draw: st.DrawFn,
    own: Sequence[str],
    ops: Sequence[int] = OPS,
    *,
    privileged: bool = False,
    max_frames: int = 16,
) -> bytes:
    """A session: frames drawn in order, later ones naming the transactions that
    earlier TRANSACTION_STARTs (likely) opened -- 1, 2, ... on a fresh connection."""
    n = draw(st.integers(1, max_frames))
    frames = []
    started = 0
    for _ in range(n):
        frame = draw(frame_strategy(own, ops, privileged=privileged, open_tx=range(1, started + 1)))
        if (
            len(frame) >= 4
            and HEADER.unpack_from(frame.ljust(16, b"\0"))[0] == Op.TRANSACTION_START
        ):
            started += 1
        frames.append(frame)
    return b"".join(frames)


def server_view(stream: bytes) -> tuple[list[tuple[int, int, int]], bool]:
    """How xenstored frames ``stream``: the (type, req_id, tx_id) it must answer, in
    order, and whether it must drop the connection (a length over the maximum)."""
    out = []
    off = 0
    while len(stream) - off >= HEADER.size:
        mtype, req_id, tx_id, length = HEADER.unpack_from(stream, off)
        if length > PAYLOAD_MAX:
            return out, True
        end = off + HEADER.size + length
        if end > len(stream):
            break
        out.append((mtype, req_id, tx_id))
        off = end
    return out, False


def random_frames(r: random.Random, own: Sequence[str], n: int, *, privileged: bool) -> bytes:
    """For the time-boxed loops: ``n`` frames of random type/ids, grammar-ish payloads."""
    out = []
    for _ in range(n):
        op = r.choice(OPS)
        path = r.choice([*own, *SPECIAL, *INVALID_PATHS, "/fz/" + r.choice("abc")])
        if privileged and op == Op.SET_PERMS and path == "/":
            path = "/fz"  # see payload_strategy()
        kind = r.random()
        if kind < 0.6:
            payload = _enc(path) + b"\0"
            if op == Op.WRITE:
                payload += r.randbytes(r.randrange(0, 80))
            elif op in (Op.WATCH, Op.UNWATCH):
                payload += b"tok\0"
            elif op == Op.SET_PERMS:
                payload += b"".join(_enc(r.choice(PERMS)) + b"\0" for _ in range(r.randrange(4)))
        elif kind < 0.8:
            payload = b"".join(_enc(r.choice(DOMIDS)) + b"\0" for _ in range(r.randrange(4)))
        else:
            payload = r.randbytes(r.randrange(0, 200))
        length = len(payload)
        if r.random() < 0.03:
            length = r.choice([length + 1, max(0, length - 1), PAYLOAD_MAX + 1, U32])
        tx = 0 if r.random() < 0.7 else r.choice([1, 2, 3, r.randrange(U32)])
        frame = HEADER.pack(op & U32, r.randrange(U32), tx, length) + payload
        if r.random() < 0.02:
            frame = frame[: r.randrange(len(frame))]
        out.append(frame)
    return b"".join(out)

"""The simulated xenstored on the wire: framing, malformed input, ordering, sockets."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from torpor.xs_wire import HEADER, Op

from .conftest import Served
from .xs_helpers import RawXs, WireError


def errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except WireError as e:
        return e.errno
    raise AssertionError("succeeded")


def test_reply_echoes_type_req_id_and_tx_id(raw: Callable[..., RawXs]) -> None:
    c = raw()
    tx = c.tx_start()
    c.send(Op.WRITE, b"/e\0v", req_id=0xDEADBEEF, tx_id=tx)
    assert c.recv() == (Op.WRITE, 0xDEADBEEF, tx, b"OK\0")
    c.send(Op.READ, b"/nope\0", req_id=7)
    assert c.recv() == (Op.ERROR, 7, 0, b"ENOENT\0")


def test_empty_and_binary_values(raw: Callable[..., RawXs]) -> None:
    c = raw()
    c.write("/empty", b"")
    assert c.read("/empty") == b""
    c.write("/bin", b"\x00\xff\x80a\x00")
    assert c.read("/bin") == b"\x00\xff\x80a\x00"


@pytest.mark.parametrize("mtype", [Op.RESTRICT, Op.WATCH_EVENT, Op.ERROR, 23, 99, Op.INVALID])
def test_unknown_types_get_enosys_and_the_connection_lives(
    raw: Callable[..., RawXs], mtype: int
) -> None:
    c = raw()
    c.send(mtype, b"whatever\0", req_id=5)
    assert c.recv() == (Op.ERROR, 5, 0, b"ENOSYS\0")
    c.write("/alive", "yes")


@pytest.mark.parametrize(
    ("op", "payload"),
    [
        (Op.READ, b"/tool"),  # no NUL
        (Op.READ, b""),
        (Op.READ, b"/tool\0/x\0"),  # two strings
        (Op.WRITE, b"/x"),  # no NUL at all
        (Op.WATCH, b"/x\0"),
        (Op.WATCH, b"/x\0t\0extra\0"),
        (Op.SET_PERMS, b"/tool\0"),
        (Op.SET_PERMS, b"/tool\0q0\0"),
        (Op.TRANSACTION_END, b"T"),
        (Op.DIRECTORY_PART, b"/tool\0"),
        (Op.GET_DOMAIN_PATH, b"1"),
        (Op.READ, b"/a/\0"),
        (Op.READ, b"/a//b\0"),
        (Op.READ, b"/a b\0"),
        (Op.READ, "/caf\u00e9\0".encode()),
        (Op.READ, b"@releaseDomain\0"),
        (Op.DEBUG, b"nonsense\0"),
    ],
)
def test_malformed_requests_get_einval(raw: Callable[..., RawXs], op: Op, payload: bytes) -> None:
    c = raw()
    assert c.request(op, payload) == (Op.ERROR, b"EINVAL\0")
    assert c.read("/tool") == b""


def test_over_long_length_drops_only_that_client(served: Served, raw: Callable[..., RawXs]) -> None:
    bad, good = raw(), raw()
    good.write("/g", "1")
    base = served.call(served.xs.connection_count)
    bad.send_raw(HEADER.pack(Op.READ, 1, 0, 4097))
    assert bad.is_closed_by_peer()
    assert good.read("/g") == b"1"
    xs = served.xs
    served.call(xs.wait_until, lambda: xs.connection_count() == base - 1)


def test_payload_of_exactly_4096_is_fine(raw: Callable[..., RawXs]) -> None:
    c = raw()
    value = b"v" * (4096 - len(b"/big\0"))
    c.write("/big", value)
    assert c.read("/big") == value


def test_vanishing_client_mid_transaction_and_mid_header(
    served: Served, raw: Callable[..., RawXs]
) -> None:
    c, other = raw(), raw()
    tx = c.tx_start()
    c.write("/half", "x", tx)
    c.watch("/w", "t")
    c.send_raw(HEADER.pack(Op.READ, 1, 0, 10)[:7])  # half a header
    base = served.call(served.xs.connection_count)
    c.close()
    xs = served.xs
    served.call(xs.wait_until, lambda: xs.connection_count() == base - 1)
    assert served.call(served.xs.transaction_count) == 0
    assert served.call(served.xs.watches) == []
    assert errno_of(lambda: other.read("/half")) == errno.ENOENT


def test_watch_ack_precedes_first_event_and_own_events_precede_the_reply(
    raw: Callable[..., RawXs],
) -> None:
    c = raw()
    c.send(Op.WATCH, b"/o\0tok\0", req_id=1)
    assert c.recv() == (Op.WATCH, 1, 0, b"OK\0")
    assert c.recv() == (Op.WATCH_EVENT, 0, 0, b"/o\0tok\0")
    c.send(Op.WRITE, b"/o/x\0v", req_id=2)
    assert c.recv() == (Op.WATCH_EVENT, 0, 0, b"/o/x\0tok\0")
    assert c.recv() == (Op.WRITE, 2, 0, b"OK\0")


def test_guest_socket_acts_as_the_domain(served: Served, raw: Callable[..., RawXs]) -> None:
    d0 = raw()
    d0.mkdir("/local/domain/1")
    d0.set_perms("/local/domain/1", "n1")
    g = raw(1)
    g.write("rel", "v")  # relative to /local/domain/1
    assert d0.read("/local/domain/1/rel") == b"v"
    assert d0.get_perms("/local/domain/1/rel") == ["n1"]
    assert g.request(Op.INTRODUCE, b"5\x001\x001\x00") == (Op.ERROR, b"EACCES\0")
    assert g.request(Op.SET_PERMS, b"rel\0n0\0") == (Op.ERROR, b"EPERM\0")
    g.watch("rel", "t")
    assert g.next_event() == ("rel", "t")
    d0.write("/local/domain/1/rel", "w")
    assert g.next_event() == ("rel", "t")


def test_directory_part_and_e2big(raw: Callable[..., RawXs]) -> None:
    c = raw()
    names = [f"child-with-a-long-name-{i:04d}" for i in range(200)]  # > 4096 bytes listed
    tx = c.tx_start()
    for n in names:
        c.mkdir(f"/big/{n}", tx)
    c.tx_end(tx)
    assert c.request(Op.DIRECTORY, b"/big\0") == (Op.ERROR, b"E2BIG\0")
    got: list[str] = []
    off = 0
    gens = set()
    while True:
        data = c.call(Op.DIRECTORY_PART, b"/big\0" + str(off).encode() + b"\0")
        assert len(data) <= 4096
        gen, rest = data.split(b"\0", 1)
        gens.add(gen)
        if rest == b"\0":
            break
        part = rest.split(b"\0")
        last = part[-1] == b"" and part[-2] == b""  # the list ends with an empty string
        chunk = [p.decode() for p in part if p]
        got.extend(chunk)
        off += sum(len(p) + 1 for p in chunk)
        if last:
            break
    assert got == names
    assert len(gens) == 1


def test_control_commands(raw: Callable[..., RawXs]) -> None:
    c = raw()
    assert c.call(Op.DEBUG, b"check\0") == b"OK\0"
    assert c.call(Op.DEBUG, b"print\0hello\0") == b"OK\0"
    assert b"quota" in c.call(Op.DEBUG, b"help\0")
    assert c.call(Op.DEBUG, b"quota\x000\x00").startswith(b"Domain 0:\n")


def test_many_clients_interleaved(served: Served, raw: Callable[..., RawXs]) -> None:
    clients = [raw() for _ in range(20)]
    for i, c in enumerate(clients):
        c.send(Op.WRITE, f"/many/{i}\0{i}".encode(), req_id=i)
    for i, c in enumerate(clients):
        assert c.recv() == (Op.WRITE, i, 0, b"OK\0")
    assert clients[0].ls("/many") == [str(i) for i in range(20)]


def test_garbage_stream_never_hurts_the_server(raw: Callable[..., RawXs]) -> None:
    import random

    rng = random.Random(1234)
    good = raw()
    for _ in range(20):
        bad = raw()
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
        bad.send_raw(blob)
        bad.close()
        # Well-formed headers with random types and payloads get some answer.
        g = raw()
        mtype = rng.randrange(0, 30)
        if mtype in (Op.INTRODUCE, Op.RELEASE, Op.RESET_WATCHES):
            continue
        payload = bytes(rng.choice(b"/ab\0") for _ in range(rng.randrange(0, 12)))
        g.send(mtype, payload, req_id=9)
        reply = g.recv()
        if reply[0] == Op.WATCH_EVENT:
            reply = g.recv()
        assert reply[1] == 9
    good.write("/still/alive", "yes")
    assert good.read("/still/alive") == b"yes"

"""A simulated xenstored on real sockets, with guests' trees built the way libxl builds
them, bystander clients, and the invariants a fuzzer checks after each example."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sim.xs_helpers import FakeHypervisor, RawXs, WireError

from torpor.xs_wire import HEADER, PAYLOAD_MAX, Op
from torpor_sim.xenstore_tree import PERM_IGNORE, RECORD_HEADER_SIZE, get_parent
from torpor_sim.xenstored import Xenstored, XenstoredThread

#: A fuzzed connection must be answered and hung up on within this (seconds).
CONN_DEADLINE = 5.0


def set_perms(c: RawXs, path: str, perms: tuple[str, ...], tx: int = 0) -> None:
    c.call(Op.SET_PERMS, path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms), tx)


def libxl_tree(dom0: RawXs, domid: int, *, uuid: str | None = None) -> None:
    """What libxl__domain_make() and a vif device add write (as the sim host does)."""
    dompath = f"/local/domain/{domid}"
    vm = f"/vm/{uuid or f'00000000-0000-0000-0000-{domid:012d}'}"
    ro = ("n0", f"r{domid}")
    rw = (f"n{domid}",)
    tx = dom0.tx_start()
    for path, perms in (
        (dompath, ro),
        (vm, ro),
        (f"{dompath}/device", rw),
        (f"{dompath}/control", ro),
        (f"{dompath}/control/shutdown", rw),
        (f"{dompath}/control/feature-suspend", rw),
        (f"{dompath}/data", rw),
        (f"{dompath}/device/suspend/event-channel", rw),
    ):
        dom0.mkdir(path, tx)
        set_perms(dom0, path, perms, tx)
    for k, v in (("name", f"guest-{domid}"), ("domid", str(domid)), ("vm", vm)):
        dom0.write(f"{dompath}/{k}", v, tx)
    dom0.write(f"{vm}/name", f"guest-{domid}", tx)
    be = f"/local/domain/0/backend/vif/{domid}/0"
    fe = f"{dompath}/device/vif/0"
    dom0.mkdir(be, tx)
    set_perms(dom0, be, ("n0", f"r{domid}"), tx)
    dom0.mkdir(fe, tx)
    set_perms(dom0, fe, (f"n{domid}", "r0"), tx)
    for k, v in (("frontend", fe), ("frontend-id", str(domid)), ("online", "1"), ("state", "4")):
        dom0.write(f"{be}/{k}", v, tx)
    for k, v in (("backend", be), ("backend-id", "0"), ("state", "4")):
        dom0.write(f"{fe}/{k}", v, tx)
    dom0.tx_end(tx)


def dom0_private(dom0: RawXs) -> None:
    """dom0's own nodes a guest must not see: a toolstack's tree, as libxl's /libxl (n0)."""
    dom0.write("/libxl/1", '{"dm": "qemu-xen"}')
    dom0.set_perms("/libxl", "n0")
    dom0.set_perms("/libxl/1", "n0")


class Rig:
    """xenstored in its own thread: dom0's socket and one socket per guest domid.

    ``bystanders``: a dom0 connection (with a watch on its own subtree) and a
    guest-2 connection that keep doing checked round trips while others fuzz.
    """

    def __init__(self, *, introduce: tuple[int, ...], guests: tuple[int, ...] = (1, 2)) -> None:
        self.dir = tempfile.mkdtemp(prefix="fz", dir="/tmp")
        self.hv = FakeHypervisor()
        for d in introduce:
            self.hv.create(d)
        self.sock = os.path.join(self.dir, "xs")
        self.guest_socks = {d: os.path.join(self.dir, f"g{d}") for d in guests}
        self.thread = XenstoredThread(
            self.sock, domain_info=self.hv, guest_sockets=self.guest_socks, call_timeout=10
        )
        self.thread.start()
        self.dom0 = RawXs(self.sock)
        # A guest connection before its tree: the domain exists for xenstored.
        self.by2 = RawXs(self.guest_socks[2])
        for d in introduce:
            self.call(lambda x, d=d: x.introduce(d, 100 + d, 1))
        for d in guests:
            libxl_tree(self.dom0, d)
        dom0_private(self.dom0)
        self.dom0.write("/bystander/seed", "0")
        self.dom0.watch("/bystander", "by")
        assert self.dom0.next_event() == ("/bystander", "by")
        self.by2.write("data/by", "start")
        self.rounds = 0
        self.base_conns = self.call(lambda x: x.connection_count())

    @property
    def xs(self) -> Xenstored:
        return self.thread.xenstored

    def call(self, fn: Any) -> Any:
        return self.thread.call(lambda: fn(self.thread.xenstored))

    def close(self) -> None:
        self.dom0.close()
        self.by2.close()
        self.thread.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def bystanders_round_trip(self) -> None:
        """Both bystanders write and read back; dom0's watch reports exactly its write."""
        self.rounds += 1
        value = f"v{self.rounds}".encode()
        path = f"/bystander/k{self.rounds % 7}"
        self.dom0.events.clear()
        self.dom0.write(path, value)
        assert self.dom0.read(path) == value
        assert self.dom0.events == [(path, "by")], self.dom0.events
        self.by2.write("data/by", value)
        assert self.by2.read("/local/domain/2/data/by") == value
        assert self.by2.read("name") == b"guest-2"
        try:
            self.by2.read("/libxl/1")
        except WireError as e:
            assert e.errno == errno.EACCES
        else:
            raise AssertionError("guest 2 read dom0's intent record")

    def settle(self) -> None:
        """Wait (event-driven) until every fuzzed connection is gone."""
        base = self.base_conns
        self.call(lambda x: x.wait_until(lambda: x.connection_count() == base, CONN_DEADLINE))

    def check_invariants(self) -> None:
        self.call(check_store)


def check_store(xs: Xenstored) -> None:
    """The store is one consistent tree and its accounting matches it.

    Runs in xenstored's loop thread, with no transaction open.
    """
    assert xs.transaction_count() == 0
    db = xs._db
    for key, rec in db.items():
        assert key.startswith("/"), f"transaction copy {key!r} left behind"
        if key != "/":
            parent = db.get(get_parent(key))
            assert parent is not None, f"{key} has no parent"
            assert key.rsplit("/", 1)[1] in parent.children, f"{key} not listed by its parent"
        assert len(set(rec.children)) == len(rec.children), f"{key}: duplicate children"
        assert rec.childlen == sum(len(c) + 1 for c in rec.children), key
        for c in rec.children:
            child = f"/{c}" if key == "/" else f"{key}/{c}"
            assert child in db, f"{key} lists missing child {c}"
        assert rec.perms, f"{key} has no permissions"
        assert not rec.perms[0][1] & PERM_IGNORE, f"{key}: owner entry lapsed"
    mem: dict[int, int] = {}
    for key, rec in db.items():
        owner = rec.perms[0][0]
        mem[owner] = mem.get(owner, 0) + rec.size() + len(key)
        assert rec.size() >= RECORD_HEADER_SIZE
    watches: dict[int, int] = {}
    for conn in xs._conns.values():
        for w in conn.watches:
            mem[conn.domid] = mem.get(conn.domid, 0) + len(w.node) + len(w.token)
            watches[conn.domid] = watches.get(conn.domid, 0) + 1
    for domid, dom in xs._domains.items():
        assert dom.nbentry == xs.node_count(domid), (domid, dom.nbentry, xs.node_count(domid))
        assert dom.memory == mem.get(domid, 0), (domid, dom.memory, mem.get(domid, 0))
        assert dom.nbwatch == watches.get(domid, 0), (domid, dom.nbwatch)
    owners = {rec.perms[0][0] for rec in db.values()}
    assert owners <= set(xs._domains), f"nodes owned by unknown domains {owners - set(xs._domains)}"
    index = sum(len(v) for v in xs._watch_index.values())
    assert index == sum(len(c.watches) for c in xs._conns.values()), "watch index out of step"


def read_all(
    sock: socket.socket, deadline: float
) -> tuple[list[tuple[int, int, int, bytes]], bool]:
    """Every frame the server sends until it hangs up; (frames, hung_up).

    Frames must be well-formed: a header, at most PAYLOAD_MAX bytes, complete.
    """
    buf = b""
    closed = False
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        buf += chunk
    frames = []
    off = 0
    while len(buf) - off >= HEADER.size:
        mtype, rid, tx, length = HEADER.unpack_from(buf, off)
        assert length <= PAYLOAD_MAX, f"server sent a {length}-byte payload"
        end = off + HEADER.size + length
        assert end <= len(buf), "server sent a truncated frame"
        frames.append((mtype, rid, tx, buf[off + HEADER.size : end]))
        off = end
    assert off == len(buf), "server sent a partial header"
    return frames, closed


@contextmanager
def no_internal_errors(caplog: Any) -> Iterator[None]:
    """xenstored logs every bug it catches (EIO) and every corruption it finds."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="torpor_sim.xenstored"):
        yield
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, bad

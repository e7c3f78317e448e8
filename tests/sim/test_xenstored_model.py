"""Property test: the simulated xenstored against a small model of Xen's semantics.

The model knows the tree, Xen's permission rules (owner, ACL first match,
inheritance, EACCES for what may not be seen) and what a transaction must
guarantee: a commit either fails with EAGAIN, leaving the store as it was, or
is equivalent to running the transaction's requests at commit time; it cannot
fail if nobody else changed anything; it must fail if another connection
changed a node the transaction had read.
"""

from __future__ import annotations

import copy
import errno
import itertools
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from torpor.errors import XenstoreError

from .xs_helpers import LoopSim, SyncRing

R, W, OWNER = 1, 2, 8
LETTER = {"n": 0, "r": R, "w": W, "b": R | W}
NAMES = ("a", "b")
PATHS = ["/t/" + "/".join(p) for depth in (1, 2, 3) for p in itertools.product(NAMES, repeat=depth)]
DOMS = (0, 1, 2)

Perms = list[tuple[int, int]]
Result = tuple[str, Any]


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


class Node:
    def __init__(self, perms: Perms, value: bytes = b"") -> None:
        self.value = value
        self.perms = perms
        self.children: list[str] = []


class Model:
    """Xen's tree and permission rules, written plainly."""

    def __init__(self) -> None:
        # /t is the model's root; what lies above it is dom0's and closed (n0).
        self.nodes: dict[str, Node] = {"/t": Node([(0, 0), (1, R | W), (2, W)])}

    @staticmethod
    def perm(conn: int, perms: Perms) -> int:
        if conn == 0 or perms[0][0] == conn:
            return R | W | OWNER
        for dom, flags in perms[1:]:
            if dom == conn:
                return flags
        return perms[0][1]

    def nearest(self, path: str) -> Node | None:
        while path not in self.nodes:
            if not path.startswith("/t/"):
                return None  # above the model's root: "/" is dom0's, n0
            path = parent(path)
        return self.nodes[path]

    def hidden_errno(self, conn: int, path: str, err: int, want: int) -> int:
        """errno_from_parents(): the nearest existing ancestor decides ENOENT vs EACCES."""
        anc = self.nearest(parent(path))
        p = self.perm(conn, anc.perms) if anc is not None else (R | W | OWNER if conn == 0 else 0)
        return err if p & want else errno.EACCES

    def get(self, conn: int, path: str, want: int) -> Node | int:
        node = self.nodes.get(path)
        if node is None:
            return self.hidden_errno(conn, path, errno.ENOENT, want)
        if self.perm(conn, node.perms) & want != want:
            return self.hidden_errno(conn, path, errno.EACCES, want)
        return node

    def create(self, conn: int, path: str, value: bytes) -> None:
        missing = []
        p = path
        while p not in self.nodes:
            missing.append(p)
            p = parent(p)
        for new in reversed(missing):
            par = self.nodes[parent(new)]
            par.children.append(new.rsplit("/", 1)[1])
            perms = list(par.perms)
            if conn != 0:
                perms[0] = (conn, perms[0][1])
            self.nodes[new] = Node(perms)
        self.nodes[path].value = value

    # The operations: each returns ("ok", value) or ("err", errno).

    def read(self, conn: int, path: str) -> Result:
        n = self.get(conn, path, R)
        return ("err", n) if isinstance(n, int) else ("ok", n.value)

    def directory(self, conn: int, path: str) -> Result:
        n = self.get(conn, path, R)
        return ("err", n) if isinstance(n, int) else ("ok", list(n.children))

    def get_perms(self, conn: int, path: str) -> Result:
        n = self.get(conn, path, R)
        return ("err", n) if isinstance(n, int) else ("ok", fmt(n.perms))

    def write(self, conn: int, path: str, value: bytes) -> Result:
        n = self.get(conn, path, W)
        if n == errno.ENOENT:
            self.create(conn, path, value)
        elif isinstance(n, int):
            return ("err", n)
        else:
            n.value = value
        return ("ok", None)

    def mkdir(self, conn: int, path: str) -> Result:
        n = self.get(conn, path, W)
        if n == errno.ENOENT:
            self.create(conn, path, b"")
        elif isinstance(n, int):
            return ("err", n)
        return ("ok", None)

    def rm(self, conn: int, path: str) -> Result:
        n = self.get(conn, path, W)
        if n == errno.ENOENT:
            return ("ok", None) if parent(path) in self.nodes else ("err", errno.ENOENT)
        if isinstance(n, int):
            return ("err", n)
        for p in [p for p in self.nodes if p == path or p.startswith(path + "/")]:
            del self.nodes[p]
        self.nodes[parent(path)].children.remove(path.rsplit("/", 1)[1])
        return ("ok", None)

    def set_perms(self, conn: int, path: str, perms: Perms) -> Result:
        n = self.get(conn, path, W | OWNER)
        if isinstance(n, int):
            return ("err", n)
        if conn != 0 and perms[0][0] != n.perms[0][0]:
            return ("err", errno.EPERM)
        n.perms = list(perms)
        return ("ok", None)


def fmt(perms: Perms) -> list[str]:
    inv = {v: k for k, v in LETTER.items()}
    return [f"{inv[f]}{d}" for d, f in perms]


def server_call(ring: SyncRing, op: str, path: str, arg: Any, tx: int) -> Result:
    try:
        if op == "write":
            ring.write(path, arg.decode(), tx)
            return ("ok", None)
        if op == "set_perms":
            ring.set_perms(path, fmt(arg), tx)
            return ("ok", None)
        if op in ("mkdir", "rm"):
            getattr(ring, op)(path, tx)
            return ("ok", None)
        value = getattr(ring, op)(path, tx)
    except XenstoreError as e:
        return ("err", e.errno)
    if op == "read":
        return ("ok", value.encode())
    return ("ok", value)


def model_call(model: Model, conn: int, op: str, path: str, arg: Any) -> Result:
    fn = getattr(model, op)
    result: Result = fn(conn, path) if arg is None else fn(conn, path, arg)
    return result


READS = ("read", "directory", "get_perms")
perms_st = st.lists(
    st.tuples(st.sampled_from(DOMS), st.sampled_from(sorted(LETTER.values()))),
    min_size=1,
    max_size=3,
)
op_st = st.one_of(
    st.tuples(st.sampled_from((*READS, "mkdir", "rm")), st.sampled_from(PATHS), st.none()),
    st.tuples(st.just("write"), st.sampled_from(PATHS), st.sampled_from([b"", b"x", b"yy"])),
    st.tuples(st.just("set_perms"), st.sampled_from([*PATHS, "/t"]), perms_st),
)


class XenstoredMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim = LoopSim()
        self.rings = {d: self.sim.ring(d) for d in DOMS}
        self.model = Model()
        d0 = self.rings[0]
        d0.mkdir("/t")
        d0.set_perms("/t", fmt(self.model.nodes["/t"].perms))
        self.tx: tuple[int, int] | None = None  # (conn, tx id)
        self.tx_ops: list[tuple[str, str, Any, Result]] = []
        self.tx_read: set[str] = set()
        self.outside_modified = False
        self.must_conflict = False

    def teardown(self) -> None:
        self.sim.close()

    @rule(conn=st.sampled_from(DOMS), op=op_st)
    def outside(self, conn: int, op: tuple[str, str, Any]) -> None:
        name, path, arg = op
        before = copy.deepcopy(self.model.nodes)
        expected = model_call(self.model, conn, name, path, arg)
        got = server_call(self.rings[conn], name, path, arg, 0)
        assert got == expected, (conn, name, path, arg)
        if self.tx is not None and got[0] == "ok" and name not in READS:
            # Xen bumps a node's generation on every write, even of the same value.
            if name in ("write", "set_perms") or before.keys() != self.model.nodes.keys():
                self.outside_modified = True
            changed = {p for p in before.keys() ^ self.model.nodes.keys()}
            changed |= {
                p
                for p in before.keys() & self.model.nodes.keys()
                if vars(before[p]) != vars(self.model.nodes[p])
            }
            if name in ("write", "set_perms"):
                changed.add(path)
            if changed & self.tx_read:
                self.must_conflict = True

    @precondition(lambda self: self.tx is not None and bool(self.tx_read))
    @rule(data=st.data(), value=st.sampled_from([b"x", b"z"]))
    def interfere(self, data: st.DataObject, value: bytes) -> None:
        """Dom0 writes a node the open transaction has read (or found absent)."""
        path = data.draw(st.sampled_from(sorted(self.tx_read)))
        self.outside(0, ("write", path, value))

    @precondition(lambda self: self.tx is None)
    @rule(conn=st.sampled_from((0, 1)))
    def tx_start(self, conn: int) -> None:
        self.tx = (conn, self.rings[conn].transaction_start())
        self.tx_ops = []
        self.tx_read = set()
        self.outside_modified = False
        self.must_conflict = False

    @precondition(lambda self: self.tx is not None)
    @rule(op=op_st)
    def in_tx(self, op: tuple[str, str, Any]) -> None:
        assert self.tx is not None
        conn, tx = self.tx
        name, path, arg = op
        got = server_call(self.rings[conn], name, path, arg, tx)
        self.tx_ops.append((name, path, arg, got))
        if name in READS:
            self.tx_read.add(path)

    @precondition(lambda self: self.tx is not None)
    @rule(commit=st.booleans())
    def tx_end(self, commit: bool) -> None:
        assert self.tx is not None
        conn, tx = self.tx
        self.tx = None
        try:
            self.rings[conn].transaction_end(tx, commit)
            outcome = "ok"
        except XenstoreError as e:
            assert e.errno == errno.EAGAIN, e
            outcome = "EAGAIN"
        replay = copy.deepcopy(self.model)
        replayed = [model_call(replay, conn, n, p, a) for n, p, a, _ in self.tx_ops]
        observed = [r for *_, r in self.tx_ops]
        if not self.outside_modified:
            # Nobody interfered: the transaction saw (and, committed, made) a serial history.
            assert observed == replayed
        if not commit:
            assert outcome == "ok"
            return
        if self.must_conflict:
            assert outcome == "EAGAIN", "a node the transaction read changed"
        if outcome == "ok":
            assert observed == replayed, "committed, but not equivalent to a serial run"
            self.model = replay
        else:
            assert self.outside_modified, "EAGAIN though nobody else changed anything"

    @invariant()
    def tree_matches_model(self) -> None:
        snap = self.sim.xs.tree_snapshot()
        tree = {p: n for p, n in snap.items() if p == "/t" or p.startswith("/t/")}
        assert tree.keys() == self.model.nodes.keys()
        for path, node in self.model.nodes.items():
            s = tree[path]
            assert s.value == node.value, path
            assert list(s.perms) == fmt(node.perms), path
            assert list(s.children) == node.children, path

    @invariant()
    def accounting_matches_the_store(self) -> None:
        if self.tx is not None:
            return  # a transaction's private copies are accounted to its domain
        xs = self.sim.xs
        mem: dict[int, int] = {}
        for path, rec in xs._db.items():
            assert path.startswith("/"), "transaction copy left behind"
            owner = rec.perms[0][0]
            mem[owner] = mem.get(owner, 0) + rec.size() + len(path)
        for d in DOMS:
            assert xs.entry_count(d) == xs.node_count(d), d
            assert xs.domain_memory(d) == mem.get(d, 0), d


XenstoredMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestXenstoredModel = XenstoredMachine.TestCase

"""Xen 4.17 C xenstored semantics, through in-process rings (the same processing as sockets)."""

from __future__ import annotations

import errno

import pytest

from torpor.errors import XenstoreConnectionLost, XenstoreError
from torpor.model import ShutdownReason
from torpor.xs_wire import Op
from torpor_sim.xenstored import Quotas, WatchRecord

from .xs_helpers import FakeHypervisor, LoopSim, SyncRing


def home(d0: SyncRing, domid: int) -> str:
    """Make /local/domain/<domid> owned by the domain, as a toolstack does."""
    path = f"/local/domain/{domid}"
    d0.mkdir(path)
    d0.set_perms(path, [f"n{domid}"])
    return path


def req(ring: SyncRing, op: Op, payload: bytes, tx: int = 0) -> tuple[Op, bytes]:
    result: tuple[Op, bytes] = ring.sim.run(ring.conn.request(op, payload, tx))
    return result


# -- watches ------------------------------------------------------------------


def test_watch_fires_once_at_registration(sim: LoopSim) -> None:
    w = sim.ring(0)
    w.watch("/nothing/here", "tok")
    assert w.take_events() == [("/nothing/here", "tok")]


def test_write_fires_node_and_ancestors_not_children(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    d0.write("/a/b/c", "1")
    w = sim.ring(0)
    for p in ("/", "/a", "/a/b", "/a/b/c", "/a/b/c/d", "/a/bx"):
        w.watch(p, "t" + p)
    w.take_events()
    d0.write("/a/b", "x")
    assert w.take_events() == [("/a/b", "t/"), ("/a/b", "t/a"), ("/a/b", "t/a/b")]


def test_creating_intermediate_nodes_fires_once_for_the_target(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    w = sim.ring(0)
    w.watch("/n", "n")
    w.take_events()
    d0.write("/n/m/o", "v")
    assert w.take_events() == [("/n/m/o", "n")]
    d0.mkdir("/n/m")  # exists already: no change, no event
    assert w.take_events() == []


def test_rm_fires_each_removed_nodes_own_watches_and_ancestors_for_the_root(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    d0.write("/a/b/c", "1")
    d0.write("/a/b/d", "2")
    d0.write("/a/bx", "3")
    w = sim.ring(0)
    for p in ("/", "/a", "/a/b", "/a/b/c", "/a/b/d", "/a/bx"):
        w.watch(p, "t" + p)
    w.take_events()
    d0.rm("/a/b")
    # Children first (exact: only their own watches), then the root, whose
    # event goes to its own and its ancestors' watches -- once each.
    assert w.take_events() == [
        ("/a/b/c", "t/a/b/c"),
        ("/a/b/d", "t/a/b/d"),
        ("/a/b", "t/"),
        ("/a/b", "t/a"),
        ("/a/b", "t/a/b"),
    ]
    assert d0.directory("/a") == ["bx"]


def test_rm_of_absent_node_is_ok_if_parent_exists(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    d0.mkdir("/p")
    d0.rm("/p/absent")
    assert d0.errno_of("rm", "/q/absent") == errno.ENOENT
    assert d0.errno_of("rm", "/") == errno.EINVAL


def test_relative_watch_reports_relative_paths(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    g = sim.ring(1)
    g.watch("data", "t")
    assert g.take_events() == [("data", "t")]
    d0.write("/local/domain/1/data/x", "1")
    assert g.take_events() == [("data/x", "t")]
    g.unwatch("data", "t")  # relative unwatch matches the canonical watch
    assert sim.xs.watches() == []


def test_duplicate_watch_is_eexist_and_bad_paths_einval(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    g = sim.ring(1)
    g.watch("x", "t")
    assert g.errno_of("watch", "/local/domain/1/x", "t") == errno.EEXIST
    g.watch("x", "t2")
    assert g.errno_of("watch", "", "t") == errno.EINVAL
    assert g.errno_of("watch", "/a//b", "t") == errno.EINVAL
    assert g.errno_of("unwatch", "y", "t") == errno.ENOENT


def test_events_only_to_watchers_that_may_read(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 2)
    d0.write("/local/domain/2/secret", "s")
    g1 = sim.ring(1)
    g1.watch("/local/domain/2/secret", "t")
    assert g1.take_events() == [("/local/domain/2/secret", "t")]  # registration: always
    d0.write("/local/domain/2/secret", "s2")
    assert g1.take_events() == []
    d0.set_perms("/local/domain/2/secret", ["n2", "r1"])
    assert g1.take_events() == [("/local/domain/2/secret", "t")]
    d0.write("/local/domain/2/secret", "s3")
    assert g1.take_events() == [("/local/domain/2/secret", "t")]
    # Losing access still tells the watcher (the old permissions count).
    d0.set_perms("/local/domain/2/secret", ["n2"])
    assert g1.take_events() == [("/local/domain/2/secret", "t")]
    d0.write("/local/domain/2/secret", "s4")
    assert g1.take_events() == []
    # A readable parent is enough.
    d0.set_perms("/local/domain/2", ["n2", "r1"])
    g1.take_events()
    d0.write("/local/domain/2/secret", "s5")
    assert g1.take_events() == [("/local/domain/2/secret", "t")]


def test_special_watches_follow_special_permissions(sim: LoopSim, hv: FakeHypervisor) -> None:
    d0 = sim.ring(0)
    g1 = sim.ring(1)
    d0.watch("@introduceDomain", "i")
    d0.watch("@releaseDomain", "r")
    g1.watch("@releaseDomain", "r1")
    assert d0.take_events() == [("@introduceDomain", "i"), ("@releaseDomain", "r")]
    assert g1.take_events() == [("@releaseDomain", "r1")]
    hv.create(5)
    sim.xs.introduce(5, 0x1000, 7)
    sim.settle()
    assert d0.take_events() == [("@introduceDomain", "i")]
    sim.xs.introduce(5, 0x1000, 8)  # a re-introduction is not news
    sim.xs.release(5)
    sim.settle()
    assert d0.take_events() == [("@releaseDomain", "r")]
    assert g1.take_events() == []
    assert g1.errno_of("set_perms", "@releaseDomain", ["n1"]) == errno.EACCES
    assert d0.errno_of("set_perms", "@otherSpecial", ["n0"]) == errno.EINVAL
    d0.set_perms("@releaseDomain", ["n0", "r1"])
    sim.xs.introduce(5, 0x1000, 7)
    sim.xs.release(5)
    sim.settle()
    assert g1.take_events() == [("@releaseDomain", "r1")]
    assert d0.errno_of("get_perms", "@releaseDomain") == errno.EINVAL


# -- transactions ----------------------------------------------------------------


def test_transaction_events_fire_at_commit_and_not_on_abort(sim: LoopSim) -> None:
    a = sim.ring(0)
    w = sim.ring(0)
    w.watch("/tx", "t")
    w.take_events()
    tx = a.transaction_start()
    a.write("/tx/a", "1", tx)
    assert a.read("/tx/a", tx) == "1"
    assert a.errno_of("read", "/tx/a") == errno.ENOENT
    assert w.take_events() == []
    a.transaction_end(tx, True)
    assert w.take_events() == [("/tx/a", "t")]
    tx = a.transaction_start()
    a.write("/tx/b", "2", tx)
    a.transaction_end(tx, False)
    assert w.take_events() == []
    assert a.errno_of("read", "/tx/b") == errno.ENOENT
    assert sim.xs.transaction_count() == 0


def test_commit_conflicts_when_something_read_changed(sim: LoopSim) -> None:
    a, b = sim.ring(0), sim.ring(0)
    a.write("/c/x", "1")
    a.write("/c/z", "z")
    tx = a.transaction_start()
    assert a.read("/c/x", tx) == "1"
    b.write("/c/x", "2")
    a.write("/c/y", "3", tx)
    assert a.errno_of("transaction_end", tx, True) == errno.EAGAIN
    assert a.errno_of("read", "/c/y") == errno.ENOENT
    assert sim.xs.transaction_count() == 0
    # An unrelated change does not conflict.
    tx = a.transaction_start()
    a.read("/c/x", tx)
    b.write("/c/z", "zz")
    a.write("/c/y", "3", tx)
    a.transaction_end(tx, True)
    assert a.read("/c/y") == "3"


def test_conflict_on_absent_node_created_and_on_directory_change(sim: LoopSim) -> None:
    a, b = sim.ring(0), sim.ring(0)
    a.write("/c/x", "1")
    tx = a.transaction_start()
    assert a.errno_of("read", "/c/new", tx) == errno.ENOENT
    b.write("/c/new", "n")
    a.write("/c/x", "2", tx)
    assert a.errno_of("transaction_end", tx, True) == errno.EAGAIN
    tx = a.transaction_start()
    assert a.directory("/c", tx) == ["x", "new"]
    b.write("/c/w", "w")
    a.write("/c/x", "3", tx)
    assert a.errno_of("transaction_end", tx, True) == errno.EAGAIN
    assert a.read("/c/x") == "1"


def test_two_interfering_transactions(sim: LoopSim) -> None:
    # Example 4 of xenstored_transaction.c's notes.
    a, b = sim.ring(0), sim.ring(0)
    a.write("/A", "a")
    a.write("/B", "b")
    ta = a.transaction_start()
    tb = b.transaction_start()
    a.read("/A", ta)
    b.read("/B", tb)
    a.write("/B", "from-ta", ta)
    b.write("/A", "from-tb", tb)
    a.transaction_end(ta, True)
    assert b.errno_of("transaction_end", tb, True) == errno.EAGAIN
    assert (a.read("/A"), a.read("/B")) == ("a", "from-ta")


def test_transaction_rm_fires_at_commit(sim: LoopSim) -> None:
    a = sim.ring(0)
    a.write("/r/s/t", "1")
    w = sim.ring(0)
    w.watch("/r", "r")
    w.watch("/r/s/t", "t")
    w.take_events()
    tx = a.transaction_start()
    a.rm("/r/s", tx)
    assert a.directory("/r", tx) == []
    assert a.directory("/r") == ["s"]
    assert w.take_events() == []
    a.transaction_end(tx, True)
    assert w.take_events() == [("/r/s", "r"), ("/r/s/t", "t")]
    assert a.directory("/r") == []


def test_transaction_id_errors(sim: LoopSim) -> None:
    a = sim.ring(0)
    assert a.errno_of("read", "/tool", 77) == errno.ENOENT
    tx = a.transaction_start()
    assert req(a, Op.TRANSACTION_START, b"\0", tx) == (Op.ERROR, b"EBUSY\0")
    assert req(a, Op.TRANSACTION_END, b"X\0", tx) == (Op.ERROR, b"EINVAL\0")
    assert req(a, Op.TRANSACTION_END, b"T\0", 0) == (Op.ERROR, b"ENOENT\0")
    a.transaction_end(tx, True)
    assert a.errno_of("transaction_end", tx, True) == errno.ENOENT
    assert a.transaction_start() != tx


# -- permissions -------------------------------------------------------------------


def test_new_nodes_inherit_permissions_and_guest_owns_what_it_creates(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    g1, g2 = sim.ring(1), sim.ring(2)
    g1.write("data/x", "v")
    assert d0.get_perms("/local/domain/1/data/x") == ["n1"]
    d0.mkdir("/shared")
    d0.set_perms("/shared", ["n0", "b1"])
    g1.write("/shared/g", "v")
    assert d0.get_perms("/shared/g") == ["n1", "b1"]
    assert g2.errno_of("read", "/shared/g") == errno.EACCES
    d0.write("/local/domain/1/fromdom0", "v")  # dom0 creating keeps the parent's owner
    assert d0.get_perms("/local/domain/1/fromdom0") == ["n1"]
    # home, data, data/x, /shared/g, fromdom0
    assert sim.xs.node_count(1) == 5
    assert sim.xs.entry_count(1) == 5


def test_hidden_nodes_say_eacces_not_enoent(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    home(d0, 2)
    g1 = sim.ring(1)
    assert g1.errno_of("read", "/local/domain/2/nothere") == errno.EACCES
    assert g1.errno_of("read", "nothere") == errno.ENOENT
    assert g1.errno_of("read", "/") == errno.EACCES
    assert g1.errno_of("write", "/local/domain/2/x", "v") == errno.EACCES
    assert g1.errno_of("directory", "/local/domain/2") == errno.EACCES


def test_acl_first_match_owner_default_and_set_perms_rules(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    g1, g2 = sim.ring(1), sim.ring(2)
    d0.write("/acl", "v")
    d0.set_perms("/acl", ["r0", "w1", "b1"])
    assert g1.errno_of("read", "/acl") == errno.EACCES  # first entry for 1 is w
    g1.write("/acl", "by1")
    assert g2.read("/acl") == "by1"  # others get the owner entry's r
    assert g2.errno_of("write", "/acl", "x") == errno.EACCES
    assert g1.errno_of("set_perms", "/acl", ["r0"]) == errno.EACCES  # not the owner
    g1.write("mine", "v")
    g1.set_perms("mine", ["n1", "r2"])
    assert g2.read("/local/domain/1/mine") == "v"
    assert g1.errno_of("set_perms", "mine", ["n2"]) == errno.EPERM
    assert g1.errno_of("set_perms", "mine", ["x1"]) == errno.EINVAL
    assert g1.errno_of("set_perms", "mine", ["r"]) == errno.EINVAL
    assert d0.errno_of("set_perms", "/acl", ["n9"]) == errno.ENOENT  # no domain 9
    d0.set_perms("/acl", ["n0", "r9", "r0x1"])  # hex, as strtol(.., 0)
    assert d0.get_perms("/acl") == ["n0", "r9", "r1"]
    assert g1.read("/acl") == "by1"


def test_set_target_grants_the_targets_rights(sim: LoopSim, hv: FakeHypervisor) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    d0.write("/local/domain/1/dm", "v")
    sim.xs.introduce(1, 1, 1)
    sim.xs.introduce(2, 2, 2)
    g2 = sim.ring(2)
    assert g2.errno_of("read", "/local/domain/1/dm") == errno.EACCES
    assert req(d0, Op.SET_TARGET, b"2\x001\x00") == (Op.SET_TARGET, b"OK\0")
    assert g2.read("/local/domain/1/dm") == "v"
    g2.write("/local/domain/1/dm", "by-stubdom")
    assert req(d0, Op.SET_TARGET, b"2\x003\x00") == (Op.ERROR, b"ENOENT\0")


@pytest.mark.parametrize(
    ("op", "payload"),
    [
        (Op.INTRODUCE, b"3\x001\x001\x00"),
        (Op.RELEASE, b"1\x00"),
        (Op.RESUME, b"1\x00"),
        (Op.SET_TARGET, b"1\x002\x00"),
        (Op.IS_DOMAIN_INTRODUCED, b"1\x00"),
        (Op.DEBUG, b"check\x00"),
    ],
)
def test_privileged_ops_from_a_guest_are_eacces(sim: LoopSim, op: Op, payload: bytes) -> None:
    assert req(sim.ring(1), op, payload) == (Op.ERROR, b"EACCES\0")
    reply = req(sim.ring(0), Op.GET_DOMAIN_PATH, b"7\x00")
    assert reply == (Op.GET_DOMAIN_PATH, b"/local/domain/7\0")


def test_permission_of_a_dead_domain_lapses_for_its_successor(
    sim: LoopSim, hv: FakeHypervisor
) -> None:
    d0 = sim.ring(0)
    hv.create(8)
    d0.write("/lapse", "v")
    d0.set_perms("/lapse", ["n0", "r8"])
    sim.xs.introduce(8, 1, 1)
    assert sim.ring(8).read("/lapse") == "v"
    sim.xs.release(8)  # domain 8 is gone for xenstored; a new domain 8 comes
    # A toolstack writes while building the new domain.  (Without any write in
    # between, C xenstored too would take the new domain for the old one: its
    # generation would equal the node's.)
    d0.write("/local/domain/8/name", "new8")
    sim.xs.introduce(8, 1, 1)
    assert sim.ring(8).errno_of("read", "/lapse") == errno.EACCES
    assert d0.get_perms("/lapse") == ["n0", "r8"]


# -- domains ---------------------------------------------------------------------------


def test_release_domain_latch(sim: LoopSim, hv: FakeHypervisor) -> None:
    hv.create(3)
    sim.xs.introduce(3, 0x1234, 5)
    w = sim.ring(0)
    w.watch("@releaseDomain", "r")
    w.take_events()
    sim.xs.domain_exc()  # running: nothing to tell
    sim.settle()
    assert w.take_events() == []
    hv.shutdown(3, ShutdownReason.SUSPEND)
    sim.xs.domain_exc()
    sim.settle()
    assert w.take_events() == [("@releaseDomain", "r")]
    assert sim.xs.is_latched(3)
    sim.xs.domain_exc()  # still shut down, but latched: no second event
    sim.settle()
    assert w.take_events() == []
    assert req(w, Op.RESUME, b"3\x00") == (Op.RESUME, b"OK\0")  # re-arms
    sim.xs.domain_exc()
    sim.settle()
    assert w.take_events() == [("@releaseDomain", "r")]
    hv.run(3)
    sim.xs.resume(3)
    sim.xs.domain_exc()
    sim.settle()
    assert w.take_events() == []
    hv.shutdown(3, ShutdownReason.CRASH)
    sim.xs.domain_exc()
    sim.settle()
    assert w.take_events() == [("@releaseDomain", "r")]
    assert req(w, Op.RESUME, b"0\x00") == (Op.ERROR, b"EINVAL\0")
    assert req(w, Op.RESUME, b"42\x00") == (Op.ERROR, b"ENOENT\0")


@pytest.mark.parametrize("how", ["dying", "gone"])
def test_dead_domain_is_cleaned_up(sim: LoopSim, hv: FakeHypervisor, how: str) -> None:
    d0 = sim.ring(0)
    hv.create(3)
    home(d0, 3)
    sim.xs.introduce(3, 1, 1)
    g3 = sim.ring(3)
    g3.write("state", "up")
    g3.watch("state", "mine")
    tx = g3.transaction_start()
    d0.watch("@releaseDomain", "r")
    d0.watch("/local/domain/3", "home")
    d0.take_events()
    (hv.dying if how == "dying" else hv.destroy)(3)
    sim.xs.domain_exc()
    sim.settle()
    # The removed child fires only watches on itself (exact); its home's watch
    # fires for the home once.
    assert d0.take_events() == [("/local/domain/3", "home"), ("@releaseDomain", "r")]
    assert d0.errno_of("read", "/local/domain/3") == errno.ENOENT
    assert not sim.xs.is_introduced(3)
    assert [w.token for w in sim.xs.watches()] == ["r", "home"]
    assert sim.xs.transaction_count() == 0
    with pytest.raises(XenstoreConnectionLost):
        g3.read("state", tx)
    sim.xs.domain_exc()
    sim.settle()
    assert d0.take_events() == []


def test_unintroduced_domain_nodes_removed_silently_when_it_vanishes(
    sim: LoopSim, hv: FakeHypervisor
) -> None:
    d0 = sim.ring(0)
    hv.create(7)
    home(d0, 7)
    d0.watch("@releaseDomain", "r")
    d0.take_events()
    hv.destroy(7)
    sim.xs.domain_exc()
    sim.settle()
    assert d0.take_events() == []
    assert d0.errno_of("read", "/local/domain/7") == errno.ENOENT


def test_introduce_and_release_errors(sim: LoopSim, hv: FakeHypervisor) -> None:
    d0 = sim.ring(0)
    with pytest.raises(XenstoreError) as e:
        sim.xs.introduce(1, 1, 0)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(XenstoreError) as e:
        sim.xs.introduce(99, 1, 1)  # no such domain
    assert e.value.errno == errno.EINVAL
    assert req(d0, Op.INTRODUCE, b"1\x00") == (Op.ERROR, b"EINVAL\0")
    assert req(d0, Op.INTRODUCE, b"1\x00123\x004\x00") == (Op.INTRODUCE, b"OK\0")
    assert req(d0, Op.IS_DOMAIN_INTRODUCED, b"1\x00") == (Op.IS_DOMAIN_INTRODUCED, b"T\0")
    assert req(d0, Op.IS_DOMAIN_INTRODUCED, b"2\x00") == (Op.IS_DOMAIN_INTRODUCED, b"F\0")
    assert req(d0, Op.IS_DOMAIN_INTRODUCED, b"32752\x00") == (Op.IS_DOMAIN_INTRODUCED, b"T\0")
    with pytest.raises(XenstoreError) as e:
        sim.xs.release(0)
    assert e.value.errno == errno.EINVAL
    assert req(d0, Op.RELEASE, b"2\x00") == (Op.ERROR, b"ENOENT\0")
    assert req(d0, Op.RELEASE, b"1\x00") == (Op.RELEASE, b"OK\0")


def test_reintroduce_resets_the_domains_watches_and_transactions(
    sim: LoopSim, hv: FakeHypervisor
) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    sim.xs.introduce(1, 1, 1)
    g = sim.ring(1)
    g.watch("x", "t")
    g.transaction_start()
    sim.xs.introduce(1, 1, 2)
    assert sim.xs.watches() == []
    assert sim.xs.transaction_count() == 0


# -- quotas ------------------------------------------------------------------------------


@pytest.fixture
def qsim(request: pytest.FixtureRequest, hv: FakeHypervisor) -> LoopSim:
    s = LoopSim(quotas=request.param, domain_info=hv)
    request.addfinalizer(s.close)
    return s


@pytest.mark.parametrize("qsim", [Quotas(entries_per_domain=5)], indirect=True)
def test_entries_quota_enospc(qsim: LoopSim) -> None:
    d0 = qsim.ring(0)
    home(d0, 1)
    g = qsim.ring(1)
    for name in "abcd":
        g.write(name, "v")
    assert qsim.xs.entry_count(1) == 5
    assert g.errno_of("write", "e", "v") == errno.ENOSPC
    d0.write("/local/domain/1/bydom0", "v")  # the check is on the writer's domain
    g.rm("d")
    g.rm("bydom0")
    # In a transaction the commit checks the final count with >=: 5 is too many.
    tx = g.transaction_start()
    g.write("d", "v", tx)
    assert g.errno_of("transaction_end", tx, True) == errno.ENOSPC
    g.write("d", "v")  # outside a transaction the 5th fits
    assert qsim.xs.node_count(1) == qsim.xs.entry_count(1) == 5


def test_entry_size_quota_counts_the_whole_record(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    g = sim.ring(1)
    limit = Quotas().max_value_size(n_perms=1)
    assert limit == 2015
    g.write("big", "x" * limit)
    assert g.errno_of("write", "big", "x" * (limit + 1)) == errno.ENOSPC
    d0.write("/local/domain/1/big", "x" * 3000)  # dom0 is not limited
    assert len(g.read("big")) == 3000


@pytest.mark.parametrize("qsim", [Quotas(watches_per_domain=3)], indirect=True)
def test_watch_quota_e2big(qsim: LoopSim) -> None:
    g = qsim.ring(1)
    for i in range(4):  # do_watch() checks "> quota": one more than the quota fits
        g.watch(f"/w{i}", "t")
    assert g.errno_of("watch", "/w9", "t") == errno.E2BIG
    d0 = qsim.ring(0)
    for i in range(10):
        d0.watch(f"/w{i}", "t")


@pytest.mark.parametrize("qsim", [Quotas(transactions_per_domain=2)], indirect=True)
def test_transaction_quota_enospc(qsim: LoopSim) -> None:
    g = qsim.ring(1)
    for _ in range(3):
        g.transaction_start()
    assert g.errno_of("transaction_start") == errno.ENOSPC
    assert qsim.xs.transaction_count() == 3


def test_perms_quota_enospc(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    g = sim.ring(1)
    g.write("p", "v")
    g.set_perms("p", ["n1", "r0", "r2", "r3", "r4"])
    assert g.errno_of("set_perms", "p", ["n1", "r0", "r2", "r3", "r4", "r5"]) == errno.ENOSPC
    d0.set_perms("/local/domain/1/p", ["n1", "r0", "r2", "r3", "r4", "r5"])


@pytest.mark.parametrize("qsim", [Quotas(transaction_nodes=3)], indirect=True)
def test_transaction_nodes_quota(qsim: LoopSim) -> None:
    d0 = qsim.ring(0)
    home(d0, 1)
    for n in "abcd":
        d0.write(f"/local/domain/1/{n}", n)
    g = qsim.ring(1)
    tx = g.transaction_start()
    for n in "abc":
        g.read(n, tx)
    assert g.errno_of("read", "d", tx) == errno.ENOSPC
    assert g.errno_of("transaction_end", tx, True) == errno.ENOMEM


def test_path_length_quota_einval(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    g = sim.ring(1)
    assert g.errno_of("write", "a" * 2049, "v") == errno.EINVAL
    # A 2048-character child name makes the parent's record exceed the entry
    # size quota: the guest's write fails on that, not on the path.
    assert g.errno_of("write", "a" * 2048, "v") == errno.ENOSPC
    d0.write("/local/domain/1/" + "a" * 2048, "v")  # /local/domain/1/ does not count
    d0.write("/" + "b" * 2047, "v")
    assert d0.errno_of("write", "/" + "b" * 2048, "v") == errno.EINVAL


@pytest.mark.parametrize("qsim", [Quotas(memory_per_domain=3000)], indirect=True)
def test_memory_quota_enomem(qsim: LoopSim) -> None:
    d0 = qsim.ring(0)
    home(d0, 1)
    g = qsim.ring(1)
    base = qsim.xs.domain_memory(1)
    codes = []
    for i in range(10):
        try:
            g.write(f"n{i}", "v" * 500)
        except XenstoreError as e:
            codes.append(e.errno)
    assert codes and set(codes) == {errno.ENOMEM}
    for name in g.directory("/local/domain/1"):
        g.rm(name)
    assert qsim.xs.domain_memory(1) == base


# -- introspection, lifecycle of connections ---------------------------------------------


def test_introspection_and_reset_watches(sim: LoopSim) -> None:
    d0 = sim.ring(0)
    home(d0, 1)
    g = sim.ring(1)
    before = sim.xs.connection_count()
    g.watch("a", "ta")
    g.transaction_start()
    assert sim.xs.watches() == [WatchRecord(1, g.conn.id, "/local/domain/1/a", "ta")]
    assert sim.xs.transaction_count() == 1
    g.reset_watches()
    assert sim.xs.watches() == []
    assert sim.xs.transaction_count() == 0
    g.conn.close()
    assert sim.xs.connection_count() == before - 1
    with pytest.raises(XenstoreConnectionLost):
        g.read("a")
    snap = sim.xs.tree_snapshot()
    assert snap["/local/domain/1"].perms == ("n1",)
    assert "/tool/xenstored" in snap


def test_oversized_ring_request_drops_only_that_ring(sim: LoopSim) -> None:
    g, other = sim.ring(1), sim.ring(0)
    with pytest.raises(XenstoreConnectionLost):
        req(g, Op.WRITE, b"/x\0" + b"v" * 4096)
    other.write("/still", "fine")
    assert other.read("/still") == "fine"

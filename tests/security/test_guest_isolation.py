"""A hostile guest, through its own xenstore connection, against a real SimHost.

The guests' trees are the ones the simulated host builds the way libxl does
(``/local/domain/<d>`` and ``control/`` dom0's, read-only to the guest;
``device/``, ``data/``, ``control/shutdown`` the guest's; backends under
``/local/domain/0/backend/<type>/<d>/<devid>`` readable by their guest only)
plus a dom0-only tree as libxl keeps one (``/libxl/<domid>``, mode ``n0``).
torpor's own intent records are not in xenstore at all (dom0's lock files,
mode 0600 in a 0700 directory: checked here too).  Guest 1
talks through the per-domain socket SimHost serves
(``DIR/xenstored/domain-1.sock``, which xenstored treats exactly as domain 1's
ring) with pyxs, and with Debian's C tools (``XENSTORED_PATH``).
"""

from __future__ import annotations

import asyncio
import copy
import errno
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pyxs

from torpor.errors import XenstoreError
from torpor.facade import Torpor
from torpor.intent import IntentLog, read_record
from torpor.xenstore import Xenstore
from torpor_sim.host import SimHost

HOSTILE, OTHER = 1, 2
#: a dom0-only tree, as libxl's /libxl/<domid>
PRIVATE_ROOT = "/libxl"


def _host() -> tuple[SimHost, str]:
    d = tempfile.mkdtemp(prefix="sec", dir="/tmp")
    h = SimHost(d, qemu=False)
    h.start()
    assert h.create_guest("pv") == HOSTILE
    assert h.create_guest("pv") == OTHER
    h.run(_settled(h))  # frontends and backends Connected: nothing changes under the tests
    return h, d


async def _settled(h: SimHost) -> None:
    xsd = h.xenstored
    assert xsd is not None

    def connected() -> bool:
        states = [
            n.value
            for p, n in xsd.tree_snapshot().items()
            if p.endswith("/state") and ("/device/" in p or "/backend/" in p)
        ]
        return len(states) == 8 and set(states) == {b"4"}  # 2 guests x 2 devices x 2 ends

    await xsd.wait_until(connected, timeout=10)


@pytest.fixture(scope="module")
def host() -> Iterator[SimHost]:
    h, d = _host()
    with Xenstore(h.xenstore_socket).connect() as xs:
        xs.write(f"{PRIVATE_ROOT}/{OTHER}", '{"dm": "qemu-xen"}')
        xs.set_perms(PRIVATE_ROOT, ["n0"])
        xs.set_perms(f"{PRIVATE_ROOT}/{OTHER}", ["n0"])
    yield h
    h.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fresh_host() -> Iterator[SimHost]:
    """A host of its own, for tests that exhaust a guest's quotas."""
    h, d = _host()
    yield h
    h.stop()
    shutil.rmtree(d, ignore_errors=True)


def guest(host: SimHost, domid: int = HOSTILE) -> Any:
    c = pyxs.Client(unix_socket_path=host.guest_xenstore_socket(domid))
    c.SU = True  # send privileged requests too: xenstored must refuse them, not pyxs
    c.connect()
    return c


def errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except pyxs.PyXSError as e:
        return int(e.args[0])
    raise AssertionError("the guest was allowed to do it")


def uuid_of(host: SimHost, domid: int) -> str:
    with Xenstore(host.xenstore_socket).connect() as xs:
        return xs.read(f"/local/domain/{domid}/vm").rsplit("/", 1)[1]


def dom0_read(host: SimHost, path: str) -> str | None:
    with Xenstore(host.xenstore_socket).connect() as xs:
        return xs.read_or(path, None)


# -- reading ------------------------------------------------------------------------

OTHER_PATHS = [
    f"/local/domain/{OTHER}",
    f"/local/domain/{OTHER}/name",
    f"/local/domain/{OTHER}/control/shutdown",
    f"/local/domain/{OTHER}/device/vif/0/state",
    f"/local/domain/{OTHER}/data",
    f"/local/domain/0/backend/vif/{OTHER}/0/state",
    "/local/domain/0",
    "/local/domain/0/name",
    "/local/domain/0/backend",
    PRIVATE_ROOT,
    f"{PRIVATE_ROOT}/{OTHER}",
    "/local",
    "/local/domain",
    "/",
    "/tool/xenstored",
]


@pytest.mark.parametrize("path", OTHER_PATHS)
def test_guest_cannot_read_or_list_what_is_not_its_own(host: SimHost, path: str) -> None:
    c = guest(host)
    try:
        assert errno_of(lambda: c.read(path.encode())) == errno.EACCES
        assert errno_of(lambda: c.list(path.encode())) == errno.EACCES
        assert errno_of(lambda: c.get_perms(path.encode())) == errno.EACCES
    finally:
        c.close()


def test_guest_cannot_learn_whether_hidden_nodes_exist(host: SimHost) -> None:
    """EACCES for a present and for an absent node alike (errno_from_parents)."""
    c = guest(host)
    try:
        for path in (f"{PRIVATE_ROOT}/{OTHER}", f"{PRIVATE_ROOT}/999", "/local/domain/0/nope"):
            assert errno_of(lambda p=path: c.read(p.encode())) == errno.EACCES
    finally:
        c.close()


def test_guest_reads_its_own_tree_and_backends(host: SimHost) -> None:
    """The positive control: what libxl lets a guest read, it reads."""
    c = guest(host)
    try:
        assert c.read(b"name") == b"pv-guest-1"
        assert c.read(b"/local/domain/1/domid") == b"1"
        assert c.read(f"/local/domain/0/backend/vif/{HOSTILE}/0/frontend-id".encode()) == b"1"
        assert c.read(f"/vm/{uuid_of(host, HOSTILE)}/name".encode()) == b"pv-guest-1"
        assert errno_of(lambda: c.read(f"/vm/{uuid_of(host, OTHER)}/name".encode())) == (
            errno.EACCES
        )
    finally:
        c.close()


def test_intent_records_are_dom0s_files_not_in_xenstore(host: SimHost) -> None:
    """torpor's records: a file of mode 0600 in a lock directory of mode 0700,
    written the way torpor writes them; no guest-visible trace in xenstore."""
    th = host.toolstack_host()
    fds: dict[int, int] = {}

    def lock_fd(domid: int) -> int:
        if domid not in fds:
            os.makedirs(th.lock_dir, mode=0o700, exist_ok=True)
            path = os.path.join(th.lock_dir, f"domain-{domid}.lock")
            fds[domid] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return fds[domid]

    try:
        asyncio.run(IntentLog(th.lock_dir, lock_fd).begin(OTHER, "suspend"))
        assert (read_record(th.lock_dir, OTHER) or {}).get("op") == "suspend"
        assert os.stat(th.lock_dir).st_mode & 0o777 == 0o700
        assert os.fstat(fds[OTHER]).st_mode & 0o777 == 0o600
        paths = host.xenstored.tree_snapshot() if host.xenstored else {}
        assert not [p for p in paths if "torpor" in p]
    finally:
        for fd in fds.values():
            os.close(fd)
        th.close()


# -- writing ------------------------------------------------------------------------

FORBIDDEN_WRITES = [
    "name",  # its own, but dom0's (r1)
    "domid",
    "control/new-node",  # under dom0's control/
    "/local/domain/1/vm",
    f"/local/domain/{OTHER}/data/x",
    f"/local/domain/{OTHER}/control/shutdown",
    f"/local/domain/0/backend/vif/{HOSTILE}/0/state",  # its own backend: read-only
    f"/local/domain/0/backend/vif/{HOSTILE}/0/new",
    f"{PRIVATE_ROOT}/{HOSTILE}",  # forge a toolstack's record
    f"{PRIVATE_ROOT}/{OTHER}",
    "/local/domain/0/name",
    "/tool/xenstored/x",
    "/new-top-level-node",
]


@pytest.mark.parametrize("path", FORBIDDEN_WRITES)
def test_guest_cannot_write_create_or_remove_what_is_not_its_own(host: SimHost, path: str) -> None:
    before = dom0_read(host, path if path.startswith("/") else f"/local/domain/1/{path}")
    c = guest(host)
    try:
        assert errno_of(lambda: c.write(path.encode(), b"pwned")) == errno.EACCES
        assert errno_of(lambda: c.mkdir(path.encode())) == errno.EACCES
        if before is not None:
            assert errno_of(lambda: c.delete(path.encode())) == errno.EACCES
    finally:
        c.close()
    after = dom0_read(host, path if path.startswith("/") else f"/local/domain/1/{path}")
    assert after == before


def test_guest_cannot_remove_dom0_trees(host: SimHost) -> None:
    c = guest(host)
    try:
        for path in (f"/local/domain/{OTHER}", "/local/domain/0/backend", PRIVATE_ROOT, "control"):
            assert errno_of(lambda p=path: c.delete(p.encode())) == errno.EACCES
    finally:
        c.close()
    assert dom0_read(host, f"{PRIVATE_ROOT}/{OTHER}") is not None


def test_guest_writes_what_libxl_gives_it(host: SimHost) -> None:
    """The positive control: control/shutdown (the ack), data/, device/."""
    c = guest(host)
    try:
        c.write(b"data/mine", b"ok")
        c.write(b"device/suspend/event-channel", b"0")  # (pyxs refuses an empty value)
        assert dom0_read(host, "/local/domain/1/data/mine") == "ok"
        assert c.get_perms(b"data/mine")[0] == b"n1"  # what it creates, it owns
    finally:
        c.close()


# -- ownership and permissions -------------------------------------------------------


def test_guest_cannot_give_its_nodes_away_or_take_others(host: SimHost) -> None:
    c = guest(host)
    try:
        c.write(b"data/owned", b"v")
        # changing the owner: EPERM (it would move the node out of its quota)
        assert errno_of(lambda: c.set_perms(b"data/owned", [b"n0"])) == errno.EPERM
        assert errno_of(lambda: c.set_perms(b"data/owned", [b"b2"])) == errno.EPERM
        # dom0's nodes, even its own name: not the owner, no write -> EACCES
        for path in (b"name", f"/local/domain/{OTHER}/name".encode(), PRIVATE_ROOT.encode()):
            assert errno_of(lambda p=path: c.set_perms(p, [b"n1"])) == errno.EACCES
            assert errno_of(lambda p=path: c.set_perms(p, [b"n0", b"b1"])) == errno.EACCES
        # the special nodes: only their owner (dom0)
        assert errno_of(lambda: c.set_perms(b"@releaseDomain", [b"n0", b"r1"])) == (errno.EACCES)
        # granting others access to its own node is allowed (owner unchanged)
        c.set_perms(b"data/owned", [b"n1", b"r2"])
    finally:
        c.close()
    with Xenstore(host.xenstore_socket).connect() as xs:
        assert [str(p) for p in xs.get_perms("/local/domain/1/name")] == ["n0", "r1"]


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("introduce_domain", (3, 1, 1)),
        ("release_domain", (OTHER,)),
        ("resume_domain", (OTHER,)),
        ("set_target", (HOSTILE, 0)),
        ("is_domain_introduced", (OTHER,)),
    ],
)
def test_guest_cannot_make_privileged_requests(host: SimHost, call: str, args: tuple) -> None:  # type: ignore[type-arg]
    c = guest(host)
    try:
        assert errno_of(lambda: getattr(c, call)(*args)) == errno.EACCES
    finally:
        c.close()
    assert host.xenstored is not None and host.xenstored.is_introduced(OTHER)


def test_guest_gets_no_watch_events_for_what_it_cannot_read(host: SimHost) -> None:
    """A watch may be set on any path (it fires once at once, revealing nothing);
    later events come only for nodes the watcher may read."""
    events: list[str] = []
    seen_sync = threading.Event()

    def on_event(path: str, _token: str) -> None:
        events.append(path)
        if path.endswith("/data/sync"):
            seen_sync.set()

    with Xenstore(host.guest_xenstore_socket(HOSTILE)).connect() as g:
        watches = [
            g.watch(p, on_event)
            for p in (f"/local/domain/{OTHER}/name", PRIVATE_ROOT, "/local/domain/1/data/sync")
        ]
        with Xenstore(host.xenstore_socket).connect() as dom0:
            dom0.write(f"/local/domain/{OTHER}/name", "renamed")
            dom0.write(f"{PRIVATE_ROOT}/{OTHER}", '{"dm": "none"}')
            dom0.write(f"/local/domain/{OTHER}/name", "pv-guest-2")
        # xenstored serves requests in order: by the time the guest's own write is
        # answered, any event of dom0's writes has been queued before its own.
        events.clear()
        g.write("/local/domain/1/data/sync", "x")
        assert seen_sync.wait(5)
        for w in watches:
            w.unwatch()
    assert events == ["/local/domain/1/data/sync"]


# -- quotas ---------------------------------------------------------------------------


def test_quotas_bound_a_hostile_guest_and_only_it(fresh_host: SimHost) -> None:
    host = fresh_host
    xsd = host.xenstored
    assert xsd is not None
    q = xsd.quotas
    c = guest(host)
    try:
        # nodes: ENOSPC at the quota, never past it (spread over directories: a
        # directory's child names count towards its own entry size, as in C)
        err = 0
        for i in range(q.entries_per_domain + 5):
            try:
                c.write(f"data/d{i // 100}/n{i % 100}".encode(), b"x")
            except pyxs.PyXSError as e:
                err = int(e.args[0])
                break
        assert err == errno.ENOSPC
        assert i > q.entries_per_domain - 50  # all fit, the guest's own few and the dirs aside
        assert host.run(_entry_count(host, HOSTILE)) <= q.entries_per_domain
        # ...nor by creating them in a transaction and committing
        t = copy.copy(c)
        t.transaction()
        with pytest.raises(pyxs.PyXSError) as tx_err:
            t.write(b"data/in-tx-1", b"x")
            t.write(b"data/in-tx-2", b"x")
            t.commit()
        assert tx_err.value.args[0] == errno.ENOSPC
        # one entry's size
        c2 = guest(host, HOSTILE)
        c2.delete(b"data/d0/n0")
        too_big = b"v" * (q.entry_size + 1)
        assert errno_of(lambda: c2.write(b"data/d0/n0", too_big)) == errno.ENOSPC
        # path length (beyond /local/domain/<id>/)
        assert errno_of(lambda: c2.read(b"data/" + b"p" * q.path_max)) == errno.EINVAL
        # permissions per node
        c2.write(b"data/d0/n0", b"x")
        many = [b"n1"] + [f"r{d}".encode() for d in range(q.perms_per_node + 1)]
        assert errno_of(lambda: c2.set_perms(b"data/d0/n0", many)) == errno.ENOSPC
        # transactions per connection
        txs = []
        with pytest.raises(pyxs.PyXSError) as tx_quota:
            for _ in range(q.transactions_per_domain + 2):
                t = copy.copy(c2)
                t.transaction()
                txs.append(t)
        assert tx_quota.value.args[0] == errno.ENOSPC
        assert len(txs) == q.transactions_per_domain + 1
        c2.close()
        # watches (the guest kernel's own watches count too)
        with Xenstore(host.guest_xenstore_socket(HOSTILE)).connect() as g:
            with pytest.raises(XenstoreError) as w_quota:
                for i in range(q.watches_per_domain + 2):
                    g.watch(f"/local/domain/1/data/w{i}", lambda p, t: None)
            assert w_quota.value.errno == errno.E2BIG
        # Guest 2, dom0 and torpor are unaffected: guest 2 writes, torpor suspends
        # and resumes it -- and guest 1 too (its ack rewrites an existing node).
        g2 = guest(host, OTHER)
        g2.write(b"data/fine", b"yes")
        g2.close()
        with Torpor(host.toolstack_host(), own_host=True) as t:
            for d in (OTHER, HOSTILE):
                assert t.suspend(d).outcome == "suspended"
                assert t.resume(d).state == "running"
    finally:
        c.close()


async def _entry_count(host: SimHost, domid: int) -> int:
    assert host.xenstored is not None
    return host.xenstored.entry_count(domid)


# -- the same through Debian's C tools --------------------------------------------------


def ctool(host: SimHost, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XENSTORED_PATH=host.guest_xenstore_socket(HOSTILE))
    return subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=10, check=False
    )


ctools = pytest.mark.skipif(
    shutil.which("xenstore-read") is None,
    reason="Debian's xenstore-utils is not installed (apt-get install xenstore-utils)",
)


@pytest.mark.ctools
@ctools
@pytest.mark.parametrize("path", OTHER_PATHS)
def test_c_tools_as_the_guest_cannot_read(host: SimHost, path: str) -> None:
    r = ctool(host, "xenstore-read", path)
    assert r.returncode != 0 and r.stdout == ""
    r = ctool(host, "xenstore-ls", path)
    assert r.returncode != 0
    assert "Permission denied" in r.stderr or r.stdout == ""


@pytest.mark.ctools
@ctools
@pytest.mark.parametrize("path", FORBIDDEN_WRITES)
def test_c_tools_as_the_guest_cannot_write(host: SimHost, path: str) -> None:
    absolute = path if path.startswith("/") else f"/local/domain/1/{path}"
    before = dom0_read(host, absolute)
    r = ctool(host, "xenstore-write", path, "pwned")
    assert r.returncode != 0
    assert dom0_read(host, absolute) == before


@pytest.mark.ctools
@ctools
def test_c_tools_as_the_guest_owner_and_positive_controls(host: SimHost) -> None:
    assert ctool(host, "xenstore-read", "name").stdout == "pv-guest-1\n"
    assert ctool(host, "xenstore-write", "data/c", "1").returncode == 0
    r = ctool(host, "xenstore-chmod", "data/c", "n0")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr  # EPERM
    r = ctool(host, "xenstore-chmod", "name", "n1")
    assert r.returncode != 0 and "Permission denied" in r.stderr  # EACCES
    r = ctool(host, "xenstore-rm", PRIVATE_ROOT)
    assert r.returncode != 0
    assert dom0_read(host, f"{PRIVATE_ROOT}/{OTHER}") is not None


@pytest.mark.ctools
@ctools
def test_c_tools_as_the_guest_hit_the_quotas(fresh_host: SimHost) -> None:
    assert fresh_host.xenstored is not None
    q = fresh_host.xenstored.quotas
    r = ctool(fresh_host, "xenstore-write", "data/big", "v" * (q.entry_size + 1))
    assert r.returncode != 0  # ENOSPC (xenstore-write does not print the errno)
    assert dom0_read(fresh_host, "/local/domain/1/data/big") is None
    assert ctool(fresh_host, "xenstore-write", "data/small", "v").returncode == 0
    perms = ["n1", *(f"r{d}" for d in range(q.perms_per_node + 1))]
    r = ctool(fresh_host, "xenstore-chmod", "data/small", *perms)
    assert r.returncode != 0 and "No space left on device" in r.stderr
    r = ctool(fresh_host, "xenstore-read", "data/" + "p" * q.path_max)
    assert r.returncode != 0

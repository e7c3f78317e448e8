"""Plain pyxs 0.4.1 against the simulated xenstored, as against Xen's C daemon."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from pyxs.exceptions import PyXSError

from torpor.model import ShutdownReason

from .conftest import Served
from .xs_helpers import FakeHypervisor


def pyxs_errno(fn: Callable[[], object]) -> int:
    with pytest.raises(PyXSError) as e:
        fn()
    code: int = e.value.args[0]
    return code


def test_basic_tree_operations(pyxs_client: Callable[..., Any]) -> None:
    c = pyxs_client()
    c.write(b"/vm/1/name", b"guest")
    assert c.read(b"/vm/1/name") == b"guest"
    assert c.list(b"/vm/1") == [b"name"]
    assert c.exists(b"/vm/1")
    assert not c.exists(b"/vm/2")
    c.mkdir(b"/vm/1/device")
    assert sorted(c.list(b"/vm/1")) == [b"device", b"name"]
    c.delete(b"/vm")
    assert not c.exists(b"/vm")
    assert pyxs_errno(lambda: c.read(b"/vm/1/name")) == errno.ENOENT
    assert c.get_perms(b"/tool") == [b"n0"]
    c.write(b"/p", b"v")
    c.set_perms(b"/p", [b"n0", b"r1"])
    assert c.get_perms(b"/p") == [b"n0", b"r1"]


def test_transactions_commit_and_conflict(pyxs_client: Callable[..., Any]) -> None:
    a, b = pyxs_client(), pyxs_client()
    a.write(b"/t/x", b"1")
    a.transaction()
    assert a.read(b"/t/x") == b"1"
    a.write(b"/t/y", b"2")
    assert b.exists(b"/t/y") is False
    assert a.commit() is True
    assert b.read(b"/t/y") == b"2"
    a.transaction()
    a.read(b"/t/x")
    b.write(b"/t/x", b"changed")
    a.write(b"/t/y", b"3")
    assert a.commit() is False  # EAGAIN
    assert b.read(b"/t/y") == b"2"


def test_monitor_gets_initial_and_change_events(pyxs_client: Callable[..., Any]) -> None:
    c, w = pyxs_client(), pyxs_client()
    with w.monitor() as m:
        m.watch(b"/mon", b"tok")
        events = m.wait()
        assert tuple(next(events)) == (b"/mon", b"tok")
        c.write(b"/mon/a/b", b"1")
        assert tuple(next(events)) == (b"/mon/a/b", b"tok")
        c.delete(b"/mon/a")
        assert tuple(next(events)) == (b"/mon/a", b"tok")


def test_domain_ops_and_release_latch(
    served: Served, hv: FakeHypervisor, pyxs_client: Callable[..., Any]
) -> None:
    c = pyxs_client(su=True)
    w = pyxs_client()
    assert c.get_domain_path(5) == b"/local/domain/5"
    hv.create(5)
    with w.monitor() as m:
        m.watch(b"@introduceDomain", b"i")
        m.watch(b"@releaseDomain", b"r")
        events = m.wait()
        assert {tuple(next(events)), tuple(next(events))} == {
            (b"@introduceDomain", b"i"),
            (b"@releaseDomain", b"r"),
        }
        c.introduce_domain(5, 0x1234, 9)
        assert tuple(next(events)) == (b"@introduceDomain", b"i")
        assert c.is_domain_introduced(5) is True
        hv.shutdown(5, ShutdownReason.SUSPEND)
        served.call(served.xs.domain_exc)
        assert tuple(next(events)) == (b"@releaseDomain", b"r")
        served.call(served.xs.domain_exc)  # latched: no event
        w.read(b"/tool")  # a round trip on w: any event sent before is queued now
        assert m.events.qsize() == 0
        c.resume_domain(5)  # re-arms; pyxs needs SU for it
        served.call(served.xs.domain_exc)
        assert tuple(next(events)) == (b"@releaseDomain", b"r")
        c.release_domain(5)
        assert tuple(next(events)) == (b"@releaseDomain", b"r")
        assert c.is_domain_introduced(5) is False
        w.read(b"/tool")
        assert m.events.qsize() == 0


def test_guest_connection_permissions(pyxs_client: Callable[..., Any]) -> None:
    d0 = pyxs_client()
    d0.mkdir(b"/local/domain/1")
    d0.set_perms(b"/local/domain/1", [b"n1"])
    d0.write(b"/local/domain/2/secret", b"s")
    g = pyxs_client(1, su=True)
    g.write(b"/local/domain/1/mine", b"v")
    assert d0.get_perms(b"/local/domain/1/mine") == [b"n1"]
    assert pyxs_errno(lambda: g.read(b"/local/domain/2/secret")) == errno.EACCES
    assert pyxs_errno(lambda: g.set_perms(b"/local/domain/1/mine", [b"n0"])) == errno.EPERM
    assert pyxs_errno(lambda: g.resume_domain(1)) == errno.EACCES

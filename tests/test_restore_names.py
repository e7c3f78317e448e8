"""A restore never makes a second domain with a live domain's name (issue 12, seen item 6).

Restoring the same image twice would give two domains running one guest --
on real Xen, two copies writing one disk.  xl refuses a duplicate name
(libxl__domain_rename: "Domain with name ... already exists"); torpor
refuses it too, *before building anything*, with
:class:`~torpor.errors.NameInUse` naming the domain that holds the name, and
restores under another name on request (``restore(..., name=NEW)``,
``torpor restore FILE --name NEW``): a copy, with a fresh UUID.  A
migration checks the destination before it touches the guest; on the same
host it builds ``NAME--incoming`` and renames it once the source is gone, as
``xl migrate`` to localhost does.

The same on real Xen: tests/xen/test_xl_save_real.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from torpor.cli import EXIT_ALL_FAILED, EXIT_OK, EXIT_USAGE, main
from torpor.errors import HypervisorError, NameInUse, UsageError
from torpor.facade import Torpor
from torpor.image import read_image
from torpor.model import Phase
from torpor_sim.host import SimHost

#: counters a restore next to the guest must leave alone (ticks go on by themselves)
UNTOUCHED = ("boots", "cooperative_resumes", "new_domain_resumes", "suspends")


def report(host: SimHost, domid: int) -> dict[str, Any]:
    return host.run(host.guest_report(domid))


def untouched(host: SimHost, domid: int) -> dict[str, Any]:
    r = report(host, domid)
    return {
        "state": r["state"],
        "last_hypercall_return": r["last_hypercall_return"],
        **{k: r["counters"][k] for k in UNTOUCHED},
    }


def xs_read(host: SimHost, path: str) -> str | None:
    xs = host.toolstack_host().xenstore
    try:
        return xs.read_or(path, None)
    finally:
        xs.close()


class BuilderSpy:
    """Counts the builder's restores; optionally holds the first one until released."""

    def __init__(self, t: Torpor, monkeypatch: pytest.MonkeyPatch, *, hold: bool = False) -> None:
        builder = t.host.builder
        assert builder is not None
        self.real = builder.restore
        self.calls = 0
        self.hold = hold
        self.entered = threading.Event()
        self.release = threading.Event()
        monkeypatch.setattr(builder, "restore", self)

    def __call__(self, saved: Any) -> int:
        self.calls += 1
        if self.hold and self.calls == 1:
            self.entered.set()
            assert self.release.wait(30), "the test never released the first restore"
        domid: int = self.real(saved)
        return domid


@pytest.fixture
def saved_then_restored(sim_host: SimHost, torpor: Torpor, short_dir: str) -> tuple[str, int, str]:
    """A PV guest saved to a file and restored from it once: (file, domid, name)."""
    domid = sim_host.create_guest("pv")
    name = xs_read(sim_host, f"/local/domain/{domid}/name")
    assert name == f"pv-guest-{domid}"
    path = os.path.join(short_dir, "guest.img")
    torpor.save(domid, path)
    first = torpor.restore(path)
    assert first.state == "running" and dict(first.details)["name"] == name
    assert xs_read(sim_host, f"/local/domain/{first.domid}/name") == name
    return path, first.domid, name


def test_restoring_an_image_twice_is_refused_before_anything_is_built(
    sim_host: SimHost,
    torpor: Torpor,
    saved_then_restored: tuple[str, int, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, running, name = saved_then_restored
    before = untouched(sim_host, running)
    domains = sorted(sim_host.xen.domains)
    spy = BuilderSpy(torpor, monkeypatch)
    with pytest.raises(NameInUse) as ei:
        torpor.restore(path)
    err = ei.value
    assert err.name == name and err.holder == running
    assert err.state == "not created" and err.phase == Phase.VALIDATE
    assert f"domain {running} (running) is already named {name!r}" in str(err)
    assert "--name" in str(err)
    assert err.to_dict()["holder"] == running and err.to_dict()["name"] == name
    assert spy.calls == 0  # refused before the builder was asked for anything
    assert sorted(sim_host.xen.domains) == domains
    # The running guest was not touched: never asked, never paused, same name.
    assert untouched(sim_host, running) == before
    assert xs_read(sim_host, f"/local/domain/{running}/control/shutdown") == ""
    assert xs_read(sim_host, f"/local/domain/{running}/name") == name
    assert sim_host.xen.domain_info(running).running


def test_a_suspended_domain_holds_its_name_too(
    sim_host: SimHost, torpor: Torpor, saved_then_restored: tuple[str, int, str]
) -> None:
    """Shut down for suspend is not gone: resuming it would make a second copy."""
    path, running, _name = saved_then_restored
    torpor.suspend(running)
    with pytest.raises(NameInUse, match=rf"domain {running} \(suspended\)") as ei:
        torpor.restore(path)
    assert ei.value.holder == running
    torpor.resume(running)


def test_restore_under_a_new_name_is_a_copy_beside_the_guest(
    sim_host: SimHost, torpor: Torpor, saved_then_restored: tuple[str, int, str]
) -> None:
    path, running, name = saved_then_restored
    before = untouched(sim_host, running)
    copy = torpor.restore(path, name="the-copy")
    assert copy.state == "running" and copy.domid != running
    assert dict(copy.details)["name"] == "the-copy"
    assert xs_read(sim_host, f"/local/domain/{copy.domid}/name") == "the-copy"
    assert xs_read(sim_host, f"/local/domain/{running}/name") == name
    # A copy: its own UUID, so the two do not share /vm/<uuid>.
    vm_copy = xs_read(sim_host, f"/local/domain/{copy.domid}/vm")
    vm_first = xs_read(sim_host, f"/local/domain/{running}/vm")
    assert vm_copy and vm_first and vm_copy != vm_first
    assert sim_host.xen.domain_info(copy.domid).uuid != sim_host.xen.domain_info(running).uuid
    assert xs_read(sim_host, f"{vm_copy}/name") == "the-copy"
    assert report(sim_host, copy.domid)["last_hypercall_return"] == 0  # rebuilt, new domain
    assert untouched(sim_host, running) == before
    # The new name is held now as well.
    with pytest.raises(NameInUse) as ei:
        torpor.restore(path, name="the-copy")
    assert ei.value.holder == copy.domid


def test_a_restore_under_the_images_own_name_keeps_its_uuid(
    sim_host: SimHost, torpor: Torpor, short_dir: str
) -> None:
    domid = sim_host.create_guest("pv")
    uuid = sim_host.xen.domain_info(domid).uuid
    path = os.path.join(short_dir, "g.img")
    torpor.save(domid, path)
    back = torpor.restore(path, name=read_image(path).domain["name"])  # no copy: the guest
    assert sim_host.xen.domain_info(back.domid).uuid == uuid


def test_a_second_restore_under_a_name_being_restored_is_refused(
    sim_host: SimHost,
    torpor: Torpor,
    short_dir: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two restores of one image at once: the second is refused while the first builds."""
    domid = sim_host.create_guest("pv")
    path = os.path.join(short_dir, "g.img")
    torpor.save(domid, path)
    spy = BuilderSpy(torpor, monkeypatch, hold=True)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(torpor.restore(path)))
    first.start()
    try:
        assert spy.entered.wait(30), "the first restore never reached the builder"
        with pytest.raises(NameInUse, match="another restore under the name") as ei:
            torpor.restore(path)
        assert ei.value.holder is None and ei.value.state == "not created"
    finally:
        spy.release.set()
        first.join(30)
    assert spy.calls == 1
    assert results and results[0].state == "running"


def test_the_sim_builder_refuses_a_taken_name_as_libxl_does(
    sim_host: SimHost, torpor: Torpor, saved_then_restored: tuple[str, int, str]
) -> None:
    """Behind the orchestrator's check, the simulated libxl refuses too (a race's
    loser): the domain it had created is destroyed again."""
    path, _running, name = saved_then_restored
    domains = sorted(sim_host.xen.domains)
    with pytest.raises(HypervisorError, match=f'Domain with name "{name}" already exists') as ei:
        sim_host.restore_guest(read_image(path))
    assert ei.value.errno == errno.EINVAL
    assert sorted(sim_host.xen.domains) == domains


@pytest.mark.parametrize("bad", ["", " padded", "line\nbreak", "12", "x" * 256])
def test_an_invalid_name_is_a_usage_error(
    torpor: Torpor, saved_then_restored: tuple[str, int, str], bad: str
) -> None:
    path, _running, _name = saved_then_restored
    with pytest.raises(UsageError, match="invalid domain name"):
        torpor.restore(path, name=bad)


# -- migration -------------------------------------------------------------------


@pytest.fixture
def other_host() -> Iterator[SimHost]:
    d = tempfile.mkdtemp(prefix="tn", dir="/tmp")
    host = SimHost(d, qemu=False, name="other")
    host.start()
    yield host
    host.stop()
    shutil.rmtree(d, ignore_errors=True)


def test_migration_to_a_host_with_a_domain_of_that_name_is_refused_untouched(
    sim_host: SimHost, torpor: Torpor, other_host: SimHost
) -> None:
    domid = sim_host.create_guest("pv", name="web")
    taken = other_host.create_guest("pv", name="web")
    before = untouched(sim_host, domid)
    domains = sorted(other_host.xen.domains)
    with Torpor(other_host.toolstack_host(), own_host=True) as dest:
        with pytest.raises(NameInUse) as ei:
            torpor.migrate(domid, dest)
    err = ei.value
    assert err.holder == taken and err.name == "web" and err.domid == domid
    assert err.state == "running" and err.phase == Phase.VALIDATE
    # Refused before the guest was asked: not suspended, nothing built there.
    assert untouched(sim_host, domid) == before
    assert xs_read(sim_host, f"/local/domain/{domid}/control/shutdown") == ""
    assert sorted(other_host.xen.domains) == domains


def test_migration_on_the_same_host_builds_name_incoming_then_renames_it(
    sim_host: SimHost, torpor: Torpor
) -> None:
    domid = sim_host.create_guest("pv", name="web")
    uuid = sim_host.xen.domain_info(domid).uuid
    res = torpor.migrate(domid, torpor)
    assert res.outcome == "migrated" and res.state == "running" and res.domid != domid
    assert domid not in sim_host.xen.domains
    assert xs_read(sim_host, f"/local/domain/{res.domid}/name") == "web"
    assert sim_host.xen.domain_info(res.domid).uuid == uuid  # the same guest, moved
    rows = [r for r in torpor.list_domains() if r["name"].startswith("web")]
    assert [(r["domid"], r["name"]) for r in rows] == [(res.domid, "web")]


def test_migration_on_the_same_host_refuses_a_stale_incoming_name(
    sim_host: SimHost, torpor: Torpor
) -> None:
    domid = sim_host.create_guest("pv", name="web")
    stale = sim_host.create_guest("pv", name="web--incoming")
    before = untouched(sim_host, domid)
    with pytest.raises(NameInUse) as ei:
        torpor.migrate(domid, torpor)
    assert ei.value.holder == stale and ei.value.name == "web--incoming"
    assert untouched(sim_host, domid) == before


def test_a_migrated_guest_is_saved_under_the_name_it_has(
    sim_host: SimHost, torpor: Torpor, short_dir: str
) -> None:
    domid = sim_host.create_guest("pv", name="web")
    moved = torpor.migrate(domid, torpor)
    path = os.path.join(short_dir, "web.img")
    torpor.save(moved.domid, path)
    assert read_image(path).domain["name"] == "web"


# -- the CLI ------------------------------------------------------------------------


def cli(host: SimHost, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["--host", f"sim:{host.dir}", *args])
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    return code, out


def test_cli_restore_twice_is_refused_and_name_restores_a_copy(
    sim_host: SimHost, torpor: Torpor, short_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    domid = sim_host.create_guest("pv")
    path = os.path.join(short_dir, "g.img")
    torpor.save(domid, path)
    name = f"pv-guest-{domid}"
    code, (line,) = cli(sim_host, capsys, "--json", "restore", path)
    assert code == EXIT_OK
    first = json.loads(line)["domid"]
    domains = sorted(sim_host.xen.domains)

    code, (line,) = cli(sim_host, capsys, "restore", path)
    assert code == EXIT_ALL_FAILED
    assert line.startswith(f"restore of {path} FAILED: ")
    assert f"domain {first} (running) is already named {name!r}" in line
    code, (line,) = cli(sim_host, capsys, "--json", "restore", path)
    assert code == EXIT_ALL_FAILED
    out = json.loads(line)
    assert out["ok"] is False and out["error"] == "NameInUse"
    assert out["holder"] == first and out["name"] == name and out["state"] == "not created"
    assert sorted(sim_host.xen.domains) == domains

    code, (line,) = cli(sim_host, capsys, "--json", "restore", path, "--name", "copy")
    assert code == EXIT_OK
    out = json.loads(line)
    assert out["outcome"] == "restored" and out["name"] == "copy"
    assert xs_read(sim_host, f"/local/domain/{out['domid']}/name") == "copy"


def test_cli_restore_with_an_invalid_name_is_bad_usage(
    sim_host: SimHost, capsys: pytest.CaptureFixture[str], short_dir: str
) -> None:
    image = os.path.join(short_dir, "any.img")
    with open(image, "wb"):
        pass
    code = main(["--host", f"sim:{sim_host.dir}", "restore", image, "--name", "7"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid domain name '7'" in err and len(err.strip().splitlines()) == 1

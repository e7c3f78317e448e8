"""Save, restore and migration on simulated hosts: a new domain, rebuilt; nothing lost.

Every injected failure must leave exactly one running copy of the guest:
the source (resumed cooperatively) or the destination, never neither.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from torpor.errors import ImageError, MigrationFailed, UnexpectedShutdown
from torpor.facade import Torpor
from torpor.image import encode, read_image
from torpor.model import Phase, Timeouts
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost

KINDS = ("pv", "pvhvm", "pvh")
NEEDS_QEMU = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
)


@pytest.fixture
def dest_host() -> Iterator[SimHost]:
    d = tempfile.mkdtemp(prefix="tq", dir="/tmp")
    host = SimHost(d, qemu=False, name="destination")
    host.start()
    # So the destination's domids differ from the source's; named apart, as a
    # name is unique on a host (the source's first guest is pv-guest-1 too).
    host.create_guest("pv", name="destination-guest")
    yield host
    host.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def dest(dest_host: SimHost) -> Iterator[Torpor]:
    t = Torpor(dest_host.toolstack_host(), own_host=True)
    yield t
    t.close()


def report(host: SimHost, domid: int) -> dict[str, Any]:
    return host.run(host.guest_report(domid))


def running_copies(src: SimHost, dst: SimHost, src_domid: int) -> int:
    n = 0
    if src_domid in src.xen.domains and src.xen.domain_info(src_domid).running:
        n += 1
    n += sum(1 for d in dst.guests if d != 1 and dst.xen.domain_info(d).running)
    return n


@pytest.mark.parametrize(
    ("live", "phases"),
    [
        (False, [
            "validate", "request", "ack", "shutdown", "save", "transfer",
            "restore", "resume", "guest-resume", "verify", "cleanup",
        ]),
        (True, [
            "precopy", "validate", "request", "ack", "shutdown", "save",
            "restore", "resume", "guest-resume", "verify", "cleanup",
        ]),
    ],
)  # fmt: skip
def test_migration_phases_in_the_order_they_ran_each_counted_once(
    sim_host: SimHost, torpor: Torpor, dest: Torpor, live: bool, phases: list[str]
) -> None:
    domid = sim_host.create_guest("pv")
    t0 = time.perf_counter()
    res = torpor.migrate(domid, dest, live=live)
    wall = time.perf_counter() - t0
    assert [str(t.phase) for t in res.timings] == phases
    # Phases do not overlap: together they cannot outlast the call.
    assert res.seconds <= wall


@pytest.mark.parametrize("kind", KINDS)
def test_migrate_keeps_counting_with_equal_memory(
    sim_host: SimHost, dest_host: SimHost, torpor: Torpor, dest: Torpor, kind: str
) -> None:
    domid = sim_host.create_guest(kind)
    before = report(sim_host, domid)["counters"]
    res = torpor.migrate(domid, dest)
    assert res.outcome == "migrated" and res.state == "running"
    details = dict(res.details)
    assert details["source_domid"] == domid and res.domid != domid
    assert domid not in sim_host.xen.domains  # the source is gone, after the copy ran
    after = report(dest_host, res.domid)
    assert after["last_hypercall_return"] == 0  # a new domain: the full rebuild path
    assert after["checksum_at_resume"] == details["memory_checksum"]
    assert after["counters"]["ticks"] >= before["ticks"]
    assert after["counters"]["boots"] == before["boots"]
    assert after["counters"]["new_domain_resumes"] == 1
    # Frontends renegotiated with the destination's backends.
    assert after["frontends"] == {"vif/0": 4, "vbd/51712": 4}
    xs = dest_host.toolstack_host().xenstore
    try:
        for be in ("vif/{d}/0", "vbd/{d}/51712"):
            assert xs.read(f"/local/domain/0/backend/{be.format(d=res.domid)}/state") == "4"
    finally:
        xs.close()
    for step in ("xen_vcpu_restore", "gnttab_resume", "irq_resume", "timer_resume", "xs_resume"):
        assert step in after["log"]


def test_save_then_restore_on_another_host(
    sim_host: SimHost, dest_host: SimHost, torpor: Torpor, dest: Torpor, short_dir: str
) -> None:
    domid = sim_host.create_guest("pv")
    path = os.path.join(short_dir, "guest.img")
    res = torpor.save(domid, path)
    assert res.outcome == "saved" and res.state == "destroyed"
    assert domid not in sim_host.xen.domains
    assert read_image(path).kind == "pv"
    back = dest.restore(path)
    assert back.outcome == "restored" and back.state == "running"
    assert (
        report(dest_host, back.domid)["checksum_at_resume"] == dict(back.details)["memory_checksum"]
    )


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], "CRC-32|checksum"),
        (lambda b: b"Xen saved domain, xl format\n \0 \r" + b[32:], "not a torpor save image"),
        (lambda b: b[:8] + (99).to_bytes(4, "big") + b[12:], "version 99"),
        (lambda b: b"", "shorter than its header"),
        (lambda b: b + b"trailing", "after the END"),
    ],
)
def test_damaged_images_are_refused_before_anything_is_built(
    sim_host: SimHost,
    torpor: Torpor,
    dest_host: SimHost,
    dest: Torpor,
    short_dir: str,
    damage: Any,
    match: str,
) -> None:
    domid = sim_host.create_guest("pv")
    path = os.path.join(short_dir, "guest.img")
    torpor.save(domid, path)
    with open(path, "rb") as f:
        data = f.read()
    bad = os.path.join(short_dir, "bad.img")
    with open(bad, "wb") as f:
        f.write(damage(data))
    domains = sorted(dest_host.xen.domains)
    with pytest.raises(ImageError, match=match):
        dest.restore(bad)
    assert sorted(dest_host.xen.domains) == domains  # nothing was created


def test_destination_refuses(
    sim_host: SimHost,
    dest_host: SimHost,
    torpor: Torpor,
    dest: Torpor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    domid = sim_host.create_guest("pvhvm")

    def refuse(saved: Any) -> int:
        raise ImageError("destination refused the guest (no room)")

    monkeypatch.setattr(dest.host.builder, "restore", refuse)
    with pytest.raises(MigrationFailed) as e:
        torpor.migrate(domid, dest)
    assert e.value.state == "running"
    assert running_copies(sim_host, dest_host, domid) == 1
    assert report(sim_host, domid)["counters"]["cooperative_resumes"] == 1


def test_stream_cut(
    sim_host: SimHost,
    dest_host: SimHost,
    torpor: Torpor,
    dest: Torpor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    domid = sim_host.create_guest("pv")

    def cut(saved: Any) -> Iterator[bytes]:
        data = b"".join(encode(saved))
        yield data[: len(data) // 3]  # the connection dropped here

    monkeypatch.setattr("torpor.image.encode", cut)
    with pytest.raises(MigrationFailed, match="truncated") as e:
        torpor.migrate(domid, dest, live=False)
    assert e.value.state == "running" and e.value.phase == Phase.TRANSFER
    assert running_copies(sim_host, dest_host, domid) == 1


def _save_dir(short_dir: str) -> str:
    d = os.path.join(short_dir, "saves")
    os.mkdir(d)
    return d


def _disk_fills_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write to a file opened for writing by descriptor fails with ENOSPC."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *a: object) -> None:
            self.f.close()

    def full_fdopen(fd: int, mode: str = "r", *a: Any, **kw: Any) -> Any:
        f = real_fdopen(fd, mode, *a, **kw)
        return Full(f) if "w" in mode else f

    monkeypatch.setattr("os.fdopen", full_fdopen)


def test_disk_full_during_save(
    sim_host: SimHost, torpor: Torpor, short_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    domid = sim_host.create_guest("pv")
    saves = _save_dir(short_dir)
    path = os.path.join(saves, "guest.img")
    _disk_fills_up(monkeypatch)
    with pytest.raises(MigrationFailed, match="No space left") as e:
        torpor.save(domid, path)
    monkeypatch.undo()
    assert e.value.state == "running"
    assert os.listdir(saves) == []  # no image, no partial file
    assert sim_host.xen.domain_info(domid).running


def _read_back_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The written image cannot be read back (an I/O error on the new file)."""

    def unreadable(p: Any) -> Any:
        raise ImageError(f"cannot read save file {p}: Input/output error")

    monkeypatch.setattr("torpor.image.read_image", unreadable)


def _rename_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The finished file cannot take the target's place."""

    def no_replace(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr("os.replace", no_replace)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (_disk_fills_up, "No space left"),
        (_read_back_fails, "Input/output error"),
        (_rename_fails, "cannot write save file .*: Invalid cross-device link"),
    ],
    ids=["disk-full", "read-back-fails", "rename-fails"],
)
def test_a_failed_save_leaves_a_file_already_at_the_target_as_it_was(
    sim_host: SimHost,
    torpor: Torpor,
    short_dir: str,
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[pytest.MonkeyPatch], None],
    message: str,
) -> None:
    domid = sim_host.create_guest("pv")
    saves = _save_dir(short_dir)
    path = os.path.join(saves, "guest.img")
    with open(path, "wb") as f:
        f.write(b"yesterday's image")
    fault(monkeypatch)
    with pytest.raises(MigrationFailed, match=message) as e:
        torpor.save(domid, path)
    monkeypatch.undo()
    assert e.value.state == "running"
    with open(path, "rb") as f:
        assert f.read() == b"yesterday's image"
    assert os.listdir(saves) == ["guest.img"]
    assert sim_host.xen.domain_info(domid).running


@pytest.mark.parametrize("where", ["missing-dir/guest.img", "."], ids=["no-such-dir", "a-dir"])
def test_a_save_file_torpor_cannot_write_is_refused_before_the_guest_is_asked(
    sim_host: SimHost, torpor: Torpor, short_dir: str, where: str
) -> None:
    domid = sim_host.create_guest("pv")
    saves = _save_dir(short_dir)
    before = report(sim_host, domid)["counters"]
    with pytest.raises(ImageError, match="cannot write save file"):
        torpor.save(domid, os.path.join(saves, where))
    after = report(sim_host, domid)["counters"]
    assert after["cooperative_resumes"] == before["cooperative_resumes"]  # never suspended
    xs = sim_host.toolstack_host().xenstore
    assert xs.read(f"/local/domain/{domid}/control/shutdown") == ""  # never asked
    assert os.listdir(saves) == []


def test_destination_guest_fails_to_resume(
    sim_host: SimHost, dest_host: SimHost, torpor: Torpor, dest: Torpor
) -> None:
    domid = sim_host.create_guest("pv")
    dest_host.xen.fail_ops["unpause"] = errno.EIO  # libxl_domain_unpause of the new domain
    try:
        with pytest.raises(MigrationFailed) as e:
            torpor.migrate(domid, dest)
    finally:
        del dest_host.xen.fail_ops["unpause"]
    assert e.value.state == "running"
    assert running_copies(sim_host, dest_host, domid) == 1
    assert sorted(dest_host.guests) == [1]  # the half-built copy was destroyed


def test_source_guest_crashes_mid_save(sim_host: SimHost, torpor: Torpor, short_dir: str) -> None:
    """A guest that crashes by itself while being saved is reported as crashed, no file."""
    domid = sim_host.create_guest("pv", behaviour=Behaviour.parse("crash_during_suspend"))
    path = os.path.join(short_dir, "guest.img")
    with Torpor(sim_host.toolstack_host(), own_host=True, timeouts=Timeouts(suspend=2)) as t:
        with pytest.raises(UnexpectedShutdown) as e:
            t.save(domid, path)
    assert e.value.state == "crashed"
    assert not os.path.exists(path)
    assert domid in sim_host.xen.domains  # not destroyed: the operator decides


def test_migration_over_the_control_socket(short_dir: str) -> None:
    """Two `torpor sim` daemons: the image crosses hypervisor.sock in chunks."""
    from torpor.host import Host
    from torpor_sim import daemon

    a, b = os.path.join(short_dir, "a"), os.path.join(short_dir, "b")
    daemon.start(a, ["pvhvm"])
    daemon.start(b, ["pv"])
    try:
        with Torpor(Host.sim(a), own_host=True) as src, Torpor(Host.sim(b), own_host=True) as dst:
            res = src.migrate(1, dst)
            assert res.state == "running" and res.domid == 2
            rows = {r["domid"]: r for r in dst.list_domains()}
            assert rows[2]["guest_type"] == "pvhvm" and rows[2]["state"] == "running"
            assert src.list_domains() == []
    finally:
        daemon.stop(a)
        daemon.stop(b)


@pytest.mark.parametrize(
    "qemu",
    [
        pytest.param(False, id="in-process"),
        pytest.param(
            True,
            id="qemu",
            marks=[
                pytest.mark.qemu,
                pytest.mark.skipif(
                    shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 not installed",
                ),
            ],
        ),
    ],
)
def test_migrate_hvm_guest_with_its_device_model(qemu: bool) -> None:
    """The HVM guest's VM state (in the simulation: QEMU's own stream) moves with it."""
    a = tempfile.mkdtemp(prefix="ta", dir="/tmp")
    b = tempfile.mkdtemp(prefix="tb", dir="/tmp")
    src, dst = SimHost(a, qemu=qemu), SimHost(b, qemu=qemu)
    src.start()
    dst.start()
    try:
        domid = src.create_guest("hvm")
        with (
            Torpor(src.toolstack_host(), own_host=True) as ts,
            Torpor(dst.toolstack_host(), own_host=True) as td,
        ):
            before = report(src, domid)["counters"]
            res = ts.migrate(domid, td)
            assert res.state == "running" and res.method == "hard-shutdown"
            assert domid not in src.xen.domains
            guest = dst.guest(res.domid)
            dm = dst.device_models[res.domid]
            assert dm.kind == ("qemu" if qemu else "in-process")
            dm_state_kb = len(dm.read_memory(0, 4096))
            assert dm_state_kb == 4096
            after = dst.run(_counters_when_ticking(dst, res.domid, before["ticks"]))
            assert after["boots"] == before["boots"]  # carried over, not rebooted
            assert dst.run(_consistent(guest))
    finally:
        dst.stop()
        src.stop()
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)


async def _counters_when_ticking(host: SimHost, domid: int, beyond: int) -> dict[str, int]:
    import asyncio

    guest = host.guest(domid)
    for _ in range(500):  # the guest's own timer: bounded, checked each tick
        c: dict[str, int] = guest.counters()
        if c["ticks"] > beyond:
            return c
        await asyncio.sleep(0.01)  # let guest time pass (it ticks at 100 Hz)
    raise AssertionError(f"guest {domid} stopped ticking at {guest.counters()}")


async def _consistent(guest: Any) -> bool:
    return bool(guest.memory_consistent())

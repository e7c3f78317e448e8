"""Saving a device model's whole VM state and starting a new device model from it.

The same behaviour tests run on real QEMU 7.2 (``migrate`` to ``exec:cat``,
``-S -incoming defer``) and on the in-process model (its own file format).
The restored model gets its own run directory and QMP socket, as a device
model on another host would; the file is all that moves.  Waits are on QMP
events, COM1 lines and run states; ``asyncio.sleep`` only lets time pass
where a tick *rate* is measured (a tick has no event).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import pytest

from torpor.errors import DeviceModelError
from torpor.qmp import QmpClient, QmpEvent
from torpor_sim import hvm_image as img
from torpor_sim.devicemodel import DeviceModelProcess, saved_vm_state_kind
from torpor_sim.fake_qemu import FakeDeviceModel
from torpor_sim.hvm import make_device_model
from torpor_sim.hvm_image import GuestCounters
from torpor_sim.qemu import QemuDeviceModel, running_qemu_pids

from .dm_fixtures import HAVE_QEMU, KINDS, QEMU_MARKS, STEP, arun, no_leaked_qemu

pytestmark = pytest.mark.usefixtures(no_leaked_qemu.__name__)

#: The MIGRATION statuses a save shows on the source, both models (pause-before-switchover).
SAVE_STATUSES = ["setup", "active", "pre-switchover", "device", "completed"]
OTHER = {"qemu": "in-process", "in-process": "qemu"}


@pytest.fixture
def hosts() -> Iterator[tuple[Path, Path]]:
    """Two run directories, as on two hosts (short paths: AF_UNIX allows 108 bytes)."""
    a = Path(tempfile.mkdtemp(prefix="dmA", dir="/tmp"))
    b = Path(tempfile.mkdtemp(prefix="dmB", dir="/tmp"))
    yield a, b
    shutil.rmtree(a, ignore_errors=True)
    shutil.rmtree(b, ignore_errors=True)


def new_model(kind: str, **kw: Any) -> DeviceModelProcess:
    if kind == "qemu":
        return QemuDeviceModel(**kw)
    return FakeDeviceModel(**kw)


def writer_dirs() -> set[str]:
    tmp = tempfile.gettempdir()
    return {n for n in os.listdir(tmp) if n.startswith("torpor-save-")}


def migration_statuses(events: list[QmpEvent]) -> list[str]:
    return [str(e.data["status"]) for e in events if e.name == "MIGRATION"]


async def boot_source(kind: str, run_dir: Path) -> tuple[DeviceModelProcess, QmpClient]:
    src = new_model(kind, domid=5, run_dir=run_dir)
    await src.start(timeout=STEP)
    qmp = QmpClient(domid=5)
    await qmp.connect(src.qmp_path, timeout=STEP)  # torpor holds its socket throughout
    return src, qmp


async def restore(
    kind: str, run_dir: Path, state: Path
) -> tuple[DeviceModelProcess, QmpClient, float]:
    dst = new_model(kind, domid=9, run_dir=run_dir, qmp_path=run_dir / "qmp-9", incoming=state)
    started = time.monotonic()
    await dst.start(timeout=STEP)
    elapsed = time.monotonic() - started
    qmp = QmpClient(domid=9)
    await qmp.connect(dst.qmp_path, timeout=STEP)
    return dst, qmp, elapsed


async def ticks_beyond(dm: DeviceModelProcess, ticks: int) -> GuestCounters:
    await asyncio.sleep(0.15)  # measuring: ~15 ticks at 100 Hz
    now = dm.read_counters()
    assert now.ticks > ticks + 3, (now.ticks, ticks)
    return now


# ---------------------------------------------------------------------------- running guest


@pytest.mark.parametrize("kind", KINDS)
def test_save_a_running_guest_and_continue_it_elsewhere(
    kind: str, hosts: tuple[Path, Path]
) -> None:
    async def main() -> None:
        host_a, host_b = hosts
        state = host_a / "vm state 'saved'.bin"  # spaces and quotes: the shell must not split it
        writers = writer_dirs()
        src, qmp = await boot_source(kind, host_a)
        try:
            await asyncio.sleep(0.1)  # let the guest tick a while: the ring fills
            mark = qmp.event_mark()
            await src.save_vm_state(state, timeout=STEP)
            assert src.run_state == "postmigrate"
            assert await qmp.query_status() == "postmigrate"
            events = qmp.events_since(mark)
            assert events[0].name == "STOP"
            assert migration_statuses(events) == SAVE_STATUSES
            assert "RESUME" not in {e.name for e in events}
            saved, checksum = src.read_counters(), src.memory_checksum()
            assert saved.ticks > 0 and saved.boots == 1 and saved.resumes == 0
            ring = src.read_memory(img.REGION_ADDR, img.REGION_SIZE)
            assert img.region_matches(ring, saved.ticks)
            assert saved_vm_state_kind(state) == kind
            assert not [n for n in os.listdir(host_a) if n.endswith(".part")]
            assert writer_dirs() == writers
            await asyncio.sleep(0.1)  # measuring: the saved source does not run on
            assert src.read_counters() == saved
        finally:
            await qmp.close()
            await src.stop()
        # Another host: only the file moves.
        dst, qmp2, _ = await restore(kind, host_b, state)
        try:
            assert dst.kind == kind and dst.run_state == "paused"
            assert await qmp2.query_status() == "paused"
            assert dst.serial_lines == ()  # no boot: the guest was not started again
            assert dst.read_counters() == saved
            assert dst.memory_checksum() == checksum
            mark = qmp2.event_mark()
            await dst.unpause_vcpus()
            await qmp2.wait_event("RESUME", since=mark, timeout=STEP)
            assert dst.run_state == "running"
            after = await ticks_beyond(dst, saved.ticks)
            assert after.boots == 1 and after.resumes == 0 and after.s3_entries == 0
            assert dst.serial_lines == ()
            await qmp2.stop()
            frozen = dst.read_counters()
            ring = dst.read_memory(img.REGION_ADDR, img.REGION_SIZE)
            assert img.region_matches(ring, frozen.ticks)  # the ring went on from the save
            assert [e.name for e in qmp2.events_since(mark)] == ["RESUME", "STOP"]  # no RESET
            # The restored guest is whole: it still sleeps and wakes.
            await qmp2.cont()
            await s3_cycle(dst, qmp2)
        finally:
            await qmp2.close()
            await dst.stop()

    arun(main())


async def s3_cycle(dm: DeviceModelProcess, qmp: QmpClient) -> None:
    before = dm.read_counters()
    mark, line = qmp.event_mark(), dm.serial_mark()
    await dm.request_s3()
    await qmp.wait_event("SUSPEND", since=mark, timeout=STEP)
    await qmp.system_wakeup()
    await dm.wait_serial(img.LINE_RESUME, since=line, timeout=STEP)
    after = dm.read_counters()
    assert (after.resumes, after.s3_entries) == (before.resumes + 1, before.s3_entries + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_a_paused_guest_stays_paused_and_the_source_can_go_on(
    kind: str, hosts: tuple[Path, Path]
) -> None:
    """A checkpoint: save, then ``cont`` the source; the copy starts where the save was."""

    async def main() -> None:
        host_a, host_b = hosts
        state = host_a / "ckpt"
        src, qmp = await boot_source(kind, host_a)
        try:
            await asyncio.sleep(0.05)
            mark = qmp.event_mark()
            await src.pause_vcpus()
            assert src.run_state == "paused"
            await qmp.wait_event("STOP", since=mark, timeout=STEP)
            mark = qmp.event_mark()
            await src.save_vm_state(state, timeout=STEP)
            assert await qmp.query_status() == "postmigrate"
            assert "STOP" not in {e.name for e in qmp.events_since(mark)}  # already stopped
            saved, checksum = src.read_counters(), src.memory_checksum()
            await src.unpause_vcpus()  # QEMU 7.2's cont runs a postmigrate source again
            await qmp.wait_event("RESUME", since=mark, timeout=STEP)
            assert src.run_state == "running" and await qmp.query_status() == "running"
            await ticks_beyond(src, saved.ticks)
            dst, qmp2, _ = await restore(kind, host_b, state)
            try:
                assert dst.read_counters() == saved and dst.memory_checksum() == checksum
                await dst.unpause_vcpus()
                after = await ticks_beyond(dst, saved.ticks)
                assert after.boots == 1 and after.resumes == 0
            finally:
                await qmp2.close()
                await dst.stop()
        finally:
            await qmp.close()
            await src.stop()

    arun(main())


# ---------------------------------------------------------------------------- S3


@pytest.mark.parametrize("kind", KINDS)
def test_a_guest_saved_in_s3_is_woken_by_the_save(kind: str, hosts: tuple[Path, Path]) -> None:
    """QEMU 7.2 cannot carry S3 across a migration: migration_completion() wakes the
    guest (WAKEUP on the source; the wake-up's reset is in the saved vCPU state), the
    stream's run state is ``running``, so the copy starts ``paused``; on ``cont``
    SeaBIOS's S3 resume path brings the guest back: resume count + 1, no reboot."""

    async def main() -> None:
        host_a, host_b = hosts
        state = host_a / "s3.state"
        src, qmp = await boot_source(kind, host_a)
        try:
            await asyncio.sleep(0.05)
            mark, line = qmp.event_mark(), src.serial_mark()
            await src.request_s3()
            await qmp.wait_event("SUSPEND", since=mark, timeout=STEP)
            await src.wait_serial(img.LINE_S3, since=line, timeout=STEP)
            assert src.run_state == "suspended"
            asleep, checksum = src.read_counters(), src.memory_checksum()
            mark = qmp.event_mark()
            await src.save_vm_state(state, timeout=STEP)
            assert src.run_state == "postmigrate"
            # A reply on this connection comes after every event sent before it.
            assert await qmp.query_status() == "postmigrate"
            events = qmp.events_since(mark)
            names = [e.name for e in events]
            assert {"STOP", "WAKEUP"} <= set(names) and "RESET" not in names
            assert migration_statuses(events) == SAVE_STATUSES
            # The wake-up (and its reset) precedes the final RAM pass and the vCPU state.
            assert names.index("WAKEUP") < names.index("MIGRATION_PASS", names.index("STOP"))
            assert src.read_counters() == asleep  # woken, but its vCPU never ran again
            assert src.memory_checksum() == checksum
        finally:
            await qmp.close()
            await src.stop()
        dst, qmp2, _ = await restore(kind, host_b, state)
        try:
            assert dst.run_state == "paused" and await qmp2.query_status() == "paused"
            assert dst.read_counters() == asleep and dst.memory_checksum() == checksum
            with pytest.raises(DeviceModelError, match="not in suspended state"):
                await qmp2.system_wakeup()
            mark = qmp2.event_mark()
            await dst.unpause_vcpus()
            await dst.wait_serial(img.LINE_RESUME, since=0, timeout=STEP)
            assert dst.run_state == "running"
            after = await ticks_beyond(dst, asleep.ticks)
            assert after.boots == asleep.boots == 1  # resumed, not rebooted
            assert after.resumes == asleep.resumes + 1 == 1
            assert after.s3_entries == 1
            assert [e.name for e in qmp2.events_since(mark)] == ["RESUME"]
            assert img.LINE_BOOT not in dst.serial_lines
            await s3_cycle(dst, qmp2)
        finally:
            await qmp2.close()
            await dst.stop()

    arun(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_source_saved_in_s3_and_continued_resumes_there(kind: str, tmp_path: Path) -> None:
    """The wake-up's reset is the source's state too: ``cont`` takes it through
    SeaBIOS's resume path, as it does the restored copy."""

    async def main() -> None:
        src, qmp = await boot_source(kind, tmp_path)
        try:
            mark = qmp.event_mark()
            await src.request_s3()
            await qmp.wait_event("SUSPEND", since=mark, timeout=STEP)
            asleep = src.read_counters()
            await src.save_vm_state(tmp_path / "s3", timeout=STEP)
            line = src.serial_mark()
            await src.unpause_vcpus()
            await src.wait_serial(img.LINE_RESUME, since=line, timeout=STEP)
            after = await ticks_beyond(src, asleep.ticks)
            assert (after.boots, after.resumes) == (1, 1)
            assert src.run_state == "running" and await qmp.query_status() == "running"
            assert "RESET" not in {e.name for e in qmp.events_since(mark)}
        finally:
            await qmp.close()
            await src.stop()

    arun(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_powered_off_guest_is_restored_powered_off(kind: str, hosts: tuple[Path, Path]) -> None:
    """The stream carries QEMU's run state: ``shutdown`` stays ``shutdown``."""

    async def main() -> None:
        src, qmp = await boot_source(kind, hosts[0])
        try:
            mark = qmp.event_mark()
            await src.request_poweroff()
            await qmp.wait_event("STOP", since=mark, timeout=STEP)
            await src.save_vm_state(hosts[0] / "off", timeout=STEP)
            assert src.run_state == "postmigrate"
        finally:
            await qmp.close()
            await src.stop()
        dst, qmp2, _ = await restore(kind, hosts[1], hosts[0] / "off")
        try:
            assert dst.run_state == "shutdown" and await qmp2.query_status() == "shutdown"
            await dst.unpause_vcpus()  # nothing to continue
            with pytest.raises(DeviceModelError, match="Resetting the Virtual Machine"):
                await qmp2.cont()
        finally:
            await qmp2.close()
            await dst.stop()

    arun(main())


# ---------------------------------------------------------------------------- bad files


class SavedStates:
    """One good saved state per model kind, made on first use (QEMU only when asked)."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self._made: dict[str, Path] = {}

    def __getitem__(self, kind: str) -> Path:
        if kind not in self._made:
            self._made[kind] = arun(self._save(kind))
        return self._made[kind]

    async def _save(self, kind: str) -> Path:
        path = self.where / f"{kind}.state"
        dm = new_model(kind, run_dir=self.where / kind)
        try:
            await dm.start(timeout=STEP)
            await dm.save_vm_state(path, timeout=STEP)
        finally:
            await dm.stop()
        return path


@pytest.fixture(scope="module")
def saved_states() -> Iterator[SavedStates]:
    d = Path(tempfile.mkdtemp(prefix="dmS", dir="/tmp"))
    yield SavedStates(d)
    shutil.rmtree(d, ignore_errors=True)


BAD_CASES = ["missing", "empty", "truncated", "garbage", "bad-after-magic", "foreign"]


def bad_file(case: str, kind: str, states: SavedStates, where: Path) -> tuple[Path, str]:
    """A state file that must be refused, and what the error must say."""
    path = where / f"{case}.state"
    if case == "missing":
        return path, "No such file"
    if case == "foreign":
        return states[OTHER[kind]], "in-process device model"
    good = states[kind].read_bytes()
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good[: len(good) * 3 // 5])
    elif case == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif case == "bad-after-magic":  # the right magic and version, then nonsense
        path.write_bytes(good[:12] + b"\xa5" * 4096)
    if kind == "in-process":
        return path, "saved VM state"
    if case in ("empty", "garbage"):  # refused before QEMU starts (an empty stream hangs it)
        return path, "not a QEMU migration stream"
    return path, "QEMU said"  # QEMU fails the load and exits: its last log lines


@pytest.mark.parametrize(
    ("kind", "case"),
    [
        pytest.param(
            kind,
            case,
            # The in-process model's "foreign" file is a real QEMU stream.
            marks=QEMU_MARKS if kind == "qemu" or case == "foreign" else (),
            id=f"{case}-{kind}",
        )
        for kind in ("qemu", "in-process")
        for case in BAD_CASES
    ],
)
def test_a_bad_state_file_is_refused_quickly_and_leaves_nothing(
    kind: str, case: str, saved_states: SavedStates, hosts: tuple[Path, Path]
) -> None:
    path, says = bad_file(case, kind, saved_states, hosts[0])

    async def main() -> None:
        dm = make_device_model(
            prefer=cast(Literal["qemu", "in-process"], kind),
            domid=4,
            run_dir=hosts[1],
            incoming=path,
        )
        started = time.monotonic()
        with pytest.raises(DeviceModelError) as e:
            await dm.start(timeout=STEP)
        assert time.monotonic() - started < STEP / 2
        assert says in str(e.value), str(e.value)
        assert e.value.domid == 4
        assert not dm.alive and dm.run_state == "exited"
        assert running_qemu_pids() == []
        assert not os.path.exists(dm.qmp_path)
        await dm.stop()

    arun(main())


@pytest.mark.qemu
@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 is not installed")
def test_the_error_names_what_qemu_said(saved_states: SavedStates, tmp_path: Path) -> None:
    path = tmp_path / "half"
    good = saved_states["qemu"].read_bytes()
    path.write_bytes(good[: len(good) // 2])

    async def main() -> str:
        dm = QemuDeviceModel(incoming=path)
        with pytest.raises(DeviceModelError) as e:
            await dm.start(timeout=STEP)
        return str(e.value)

    message = arun(main())
    assert "incoming migration" in message and "load of migration failed" in message


@pytest.mark.parametrize("kind", KINDS)
def test_saved_vm_state_kind(kind: str, saved_states: SavedStates, tmp_path: Path) -> None:
    assert saved_vm_state_kind(saved_states[kind]) == kind
    (tmp_path / "x").write_bytes(b"not a state")
    assert saved_vm_state_kind(tmp_path / "x") is None
    with pytest.raises(DeviceModelError, match="No such file"):
        saved_vm_state_kind(tmp_path / "none")


# ---------------------------------------------------------------------------- save errors


@pytest.mark.parametrize("kind", KINDS)
def test_save_errors_leave_no_file_and_a_stopped_guest(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        dm: DeviceModelProcess = make_device_model(
            prefer=cast(Literal["qemu", "in-process"], kind),
            run_dir=tmp_path / "run",
        )
        await dm.start(timeout=STEP)
        try:
            with pytest.raises(DeviceModelError, match="no directory"):
                await dm.save_vm_state(tmp_path / "nowhere" / "x", timeout=STEP)
            assert dm.run_state == "running"  # refused before anything was done
            target = tmp_path / "a directory"
            target.mkdir()
            with pytest.raises(DeviceModelError, match="Is a directory"):
                await dm.save_vm_state(target, timeout=STEP)
            assert target.is_dir() and list(target.iterdir()) == []
            assert dm.run_state == "running"
            await dm.save_vm_state(tmp_path / "first", timeout=STEP)
            # QEMU 7.2 will not migrate a VM again before it ran (migrate_prepare()).
            with pytest.raises(DeviceModelError, match="Can't migrate the vm"):
                await dm.save_vm_state(tmp_path / "second", timeout=STEP)
            assert not (tmp_path / "second").exists()
            assert not [n for n in os.listdir(tmp_path) if n.endswith(".part")]
            assert dm.run_state == "postmigrate"
            await dm.unpause_vcpus()
            await dm.save_vm_state(tmp_path / "second", timeout=STEP)
            assert saved_vm_state_kind(tmp_path / "second") == kind
        finally:
            await dm.stop()
        with pytest.raises(DeviceModelError, match="not running"):
            await dm.save_vm_state(tmp_path / "after stop", timeout=STEP)

    arun(main())


# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("kind", KINDS)
def test_measured_save_and_restore(
    kind: str, hosts: tuple[Path, Path], record_property: Callable[[str, object], None]
) -> None:
    """Numbers for the report (16 MiB guest): run with ``-s`` to see them."""

    async def main() -> dict[str, float]:
        state = hosts[0] / "timed.state"
        src, qmp = await boot_source(kind, hosts[0])
        try:
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            await src.save_vm_state(state, timeout=STEP)
            save = time.monotonic() - t0
        finally:
            await qmp.close()
            await src.stop()
        dst, qmp2, restore_s = await restore(kind, hosts[1], state)
        try:
            t1 = time.monotonic()
            await dst.unpause_vcpus()
            cont = time.monotonic() - t1
        finally:
            await qmp2.close()
            await dst.stop()
        return {
            "save_s": save,
            "restore_s": restore_s,
            "cont_s": cont,
            "bytes": state.stat().st_size,
        }

    numbers = arun(main())
    for k, v in numbers.items():
        record_property(k, round(v, 4))
    shown = {
        k: (f"{v * 1000:.1f} ms" if k.endswith("_s") else f"{v:.0f}") for k, v in numbers.items()
    }
    print(f"\nmeasured ({kind}):", shown)
    assert numbers["save_s"] < 2 and numbers["restore_s"] < 3

"""HVM device models: real QEMU and the in-process model, the same checks for both.

Each behaviour asserted here was first seen on QEMU 7.2 (Debian 12) running the
boot-sector guest; the in-process model must show the same.  Elapsed time is
used only to measure tick *rates* (a tick has no event); everything else waits
on QMP events, COM1 lines or run-state changes.
"""

from __future__ import annotations

import asyncio
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torpor.errors import DeviceModelError, Timeout
from torpor.qmp import GuestAgent, QmpClient, QmpCommandError
from torpor_sim import hvm_image as img
from torpor_sim.devicemodel import DeviceModelBase, DeviceModelProcess
from torpor_sim.fake_qemu import FakeDeviceModel
from torpor_sim.guest_agent import GuestAgentShim
from torpor_sim.hvm import make_device_model
from torpor_sim.qemu import QemuDeviceModel, running_qemu_pids

from .dm_fixtures import (
    HAVE_QEMU,
    KINDS,
    STEP,
    arun,
    new_model,
    no_leaked_qemu,
    running,
    with_model,
)

pytestmark = pytest.mark.usefixtures(no_leaked_qemu.__name__)


def fadt_from_memory(dm: DeviceModelBase) -> tuple[int, int]:
    """The host's own ACPI walk over guest memory: (PM1a_CNT_BLK, FACS)."""
    for addr in range(0xE0000, 0x100000, 16):
        if dm.read_memory(addr, 8) == b"RSD PTR ":
            (rsdt,) = struct.unpack("<I", dm.read_memory(addr + 16, 4))
            (length,) = struct.unpack("<I", dm.read_memory(rsdt + 4, 4))
            for entry in range(rsdt + 36, rsdt + length, 4):
                (table,) = struct.unpack("<I", dm.read_memory(entry, 4))
                if dm.read_memory(table, 4) == b"FACP":
                    facs, pm1a = struct.unpack("<I24xI", dm.read_memory(table + 36, 32))
                    return pm1a, facs
    raise AssertionError("no FADT in guest memory")


async def enter_s3(dm: DeviceModelBase, qmp: QmpClient) -> None:
    mark, line = qmp.event_mark(), dm.serial_mark()
    await dm.request_s3()
    await qmp.wait_event("SUSPEND", since=mark, timeout=STEP)
    assert await dm.wait_serial(img.LINE_S3, since=line, timeout=STEP)


# ---------------------------------------------------------------------------- boot


@pytest.mark.parametrize("kind", KINDS)
def test_boot_finds_acpi_and_ticks(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        assert dm.kind == kind
        assert dm.alive and dm.run_state == "running"
        assert any(line.endswith(img.LINE_BOOT) for line in dm.serial_lines)
        c = dm.read_counters()
        assert c.valid and c.boots == 1 and c.resumes == 0 and c.s3_entries == 0
        pm1a, facs = fadt_from_memory(dm)
        assert (c.pm1a_cnt, c.facs) == (pm1a, facs)
        assert pm1a == 0x604  # QEMU's PIIX4 PM base 0x600 + 4, as the FADT says
        assert c.waking_vector == img.RESUME_VECTOR
        assert await qmp.query_status() == "running"
        assert await qmp.wakeup_supported() is True
        start = dm.read_counters().ticks
        await asyncio.sleep(0.3)  # measuring a rate: 100 Hz -> ~30 ticks
        ticks = dm.read_counters().ticks
        assert 5 <= ticks - start <= 60

    with_model(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_hmp_xp_reads_the_state_block(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        await qmp.stop()  # a stable snapshot
        out = await qmp.human_monitor_command(f"xp /8wx {img.STATE_ADDR:#x}")
        words = [int(w, 16) for ln in out.splitlines() for w in ln.split(":")[1].split()]
        c = dm.read_counters()
        assert out.splitlines()[0].startswith(f"{img.STATE_ADDR:016x}: ")
        assert words[:6] == [img.MAGIC, c.ticks, c.boots, c.resumes, c.pm1a_cnt, c.facs]
        assert (await qmp.human_monitor_command("nosuch")).startswith("unknown command: 'nosuch'")

    with_model(kind, body)


# ---------------------------------------------------------------------------- S3


@pytest.mark.parametrize("kind", KINDS)
def test_s3_suspend_and_wakeup_keeps_the_guest_running(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        await asyncio.sleep(0.05)  # let a few ticks fill the ring
        mark = qmp.event_mark()
        await enter_s3(dm, qmp)
        assert await qmp.query_status() == "suspended"
        assert dm.run_state == "suspended"
        asleep = dm.read_counters()
        assert asleep.s3_entries == 1 and asleep.last_cmd == ord("S")
        # The guest wrote PM1a_CNT with interrupts off: the ring is exactly that of its ticks.
        ring = dm.read_memory(img.REGION_ADDR, img.REGION_SIZE)
        assert ring == img.expected_region(asleep.ticks)
        checksum = dm.memory_checksum()
        await asyncio.sleep(0.1)  # measuring: no tick while asleep
        assert dm.read_counters() == asleep and dm.memory_checksum() == checksum
        assert await qmp.wakeup_supported() is True

        line = dm.serial_mark()
        await qmp.system_wakeup()
        await qmp.wait_event("WAKEUP", since=mark, timeout=STEP)
        await dm.wait_serial(img.LINE_RESUME, since=line, timeout=STEP)
        assert await qmp.query_status() == "running"
        await asyncio.sleep(0.1)
        awake = dm.read_counters()
        assert awake.resumes == 1 and awake.boots == 1  # resumed, not rebooted
        assert awake.ticks > asleep.ticks  # the counter went on from where it was
        names = [e.name for e in qmp.events_since(mark)]
        assert names == ["SUSPEND", "WAKEUP"]  # no RESET

        # A second cycle in the same guest.
        await enter_s3(dm, qmp)
        line = dm.serial_mark()
        await qmp.system_wakeup()
        await dm.wait_serial(img.LINE_RESUME, since=line, timeout=STEP)
        assert dm.read_counters().resumes == 2

    with_model(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_stop_and_cont_on_a_guest_in_s3_change_nothing(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        await enter_s3(dm, qmp)
        mark = qmp.event_mark()
        await qmp.stop()
        assert await qmp.query_status() == "suspended"
        await qmp.cont()
        assert await qmp.query_status() == "suspended"
        await qmp.save_devices_state(dm_path(dm, "s3.state"))
        assert await qmp.query_status() == "suspended"
        assert qmp.events_since(mark) == []
        await qmp.system_wakeup()
        await qmp.wait_event("WAKEUP", since=mark, timeout=STEP)

    with_model(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_system_wakeup_refused_unless_suspended(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        with pytest.raises(QmpCommandError) as e:
            await qmp.system_wakeup()
        assert e.value.error_class == "GenericError"
        assert e.value.desc == "Unable to wake up: guest is not in suspended state"
        await qmp.stop()
        with pytest.raises(QmpCommandError):
            await qmp.system_wakeup()

    with_model(kind, body)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reboot", [False, True], ids=["no-reboot", "reboot"])
def test_wakeup_without_waking_vector_reboots(kind: str, reboot: bool) -> None:
    """SeaBIOS s3_resume(): no vector -> tryReboot()."""

    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        c = dm.read_counters()
        dm.write_memory(c.facs + 12, bytes(4))  # the guest "forgot" its waking vector
        await enter_s3(dm, qmp)
        mark, line = qmp.event_mark(), dm.serial_mark()
        await qmp.system_wakeup()
        if reboot:
            ev = await qmp.wait_event("RESET", since=mark, timeout=STEP)
            assert ev.data == {"guest": True, "reason": "guest-reset"}
            await dm.wait_serial(img.LINE_BOOT, since=line, timeout=STEP)
            after = dm.read_counters()
            assert after.boots == 2 and after.resumes == 0  # RAM kept, guest rebooted
            assert await qmp.query_status() == "running"
        else:
            ev = await qmp.wait_event("SHUTDOWN", since=mark, timeout=STEP)
            assert ev.data == {"guest": True, "reason": "guest-reset"}
            await qmp.wait_event("STOP", since=mark, timeout=STEP)
            assert await qmp.query_status() == "shutdown"
            names = [e.name for e in qmp.events_since(mark)]
            # QEMU may add a second SHUTDOWN: SeaBIOS's next reboot method, as above.
            assert names[:3] == ["WAKEUP", "SHUTDOWN", "STOP"]
            assert set(names[3:]) <= {"SHUTDOWN"}
        assert img.LINE_RESUME not in dm.serial_lines[line:]

    with_model(kind, body, reboot=reboot)


# ---------------------------------------------------------------------------- stop / cont


@pytest.mark.parametrize("kind", KINDS)
def test_stop_cont(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        mark = qmp.event_mark()
        await qmp.stop()
        await qmp.stop()  # no second STOP
        assert await qmp.query_status() == "paused"
        assert dm.run_state == "paused"
        frozen = dm.read_counters().ticks
        await asyncio.sleep(0.1)  # measuring: a paused guest does not tick
        assert dm.read_counters().ticks == frozen
        await qmp.cont()
        await qmp.cont()  # running already: nothing
        assert await qmp.query_status() == "running"
        await dm.wait_run_state({"running"}, timeout=STEP)
        assert [e.name for e in qmp.events_since(mark)] == ["STOP", "RESUME"]
        await asyncio.sleep(0.1)
        assert dm.read_counters().ticks > frozen + 1

    with_model(kind, body)


def dm_path(dm: DeviceModelBase, name: str) -> str:
    run_dir = getattr(dm, "run_dir")  # noqa: B009 - both models have one
    return os.path.join(run_dir, name)


@pytest.mark.parametrize("kind", KINDS)
def test_xen_device_state_commands(kind: str) -> None:
    """Both are in every QEMU 7.2 (qapi/migration.json has no build condition)."""

    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        commands = await qmp.commands()
        assert {"xen-save-devices-state", "xen-load-devices-state", "system_wakeup"} <= commands
        assert {"stop", "cont", "query-status", "query-current-machine", "quit"} <= commands
        mark = qmp.event_mark()
        path = dm_path(dm, "running.state")
        await qmp.save_devices_state(path)  # a running guest is stopped and restarted
        assert [e.name for e in qmp.events_since(mark)] == ["STOP", "RESUME"]
        assert Path(path).read_bytes()[:4] == b"QEVM"
        await qmp.stop()
        mark = qmp.event_mark()
        await qmp.save_devices_state(dm_path(dm, "paused.state"), live=False)
        assert qmp.events_since(mark) == []
        await qmp.cont()
        with pytest.raises(QmpCommandError, match="Cannot update device state while vm is running"):
            await qmp.load_devices_state(path)

    with_model(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_xen_load_devices_state_kills_a_plain_qemu(kind: str) -> None:
    """QEMU 7.2 on a pc machine aborts in xen-load-devices-state (yank assertion)."""

    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        await qmp.stop()
        path = dm_path(dm, "dev.state")
        await qmp.save_devices_state(path)
        started = time.monotonic()
        with pytest.raises(DeviceModelError) as e:
            await qmp.load_devices_state(path, timeout=STEP)
        assert not isinstance(e.value, Timeout)
        assert time.monotonic() - started < STEP / 2
        await dm.wait_run_state({"exited"}, timeout=STEP)
        assert not dm.alive
        with pytest.raises(DeviceModelError):
            await qmp.query_status()

    with_model(kind, body)


def test_xen_load_devices_state_on_a_qemu_xen_flavoured_model() -> None:
    async def main() -> None:
        dm = FakeDeviceModel(flavour="qemu-xen")
        try:
            await dm.start(timeout=STEP)
            async with QmpClient() as qmp:
                await qmp.connect(dm.qmp_path, timeout=STEP)
                await qmp.stop()
                path = dm_path(dm, "dev.state")
                await qmp.save_devices_state(path)
                await qmp.load_devices_state(path)
                assert await qmp.query_status() == "paused"
                Path(path).write_bytes(b"garbage")
                with pytest.raises(QmpCommandError, match="An IO error has occurred"):
                    await qmp.load_devices_state(path)
                await qmp.cont()
                assert dm.alive
        finally:
            await dm.stop()

    arun(main())


# ---------------------------------------------------------------------------- misbehaving guests


@pytest.mark.parametrize("kind", KINDS)
def test_poweroff_request(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        mark, line = qmp.event_mark(), dm.serial_mark()
        await dm.request_poweroff()
        ev = await qmp.wait_event("SHUTDOWN", since=mark, timeout=STEP)
        assert ev.data == {"guest": True, "reason": "guest-shutdown"}
        await qmp.wait_event("STOP", since=mark, timeout=STEP)
        assert await dm.wait_serial(img.LINE_POWEROFF, since=line, timeout=STEP)
        assert await qmp.query_status() == "shutdown"
        assert dm.run_state == "shutdown"
        assert dm.alive  # -no-shutdown: the device model stays until destroyed
        with pytest.raises(QmpCommandError, match="Resetting the Virtual Machine is required"):
            await qmp.cont()

    with_model(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_crash_request_without_reboot(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        mark, line = qmp.event_mark(), dm.serial_mark()
        await dm.request_crash()
        ev = await qmp.wait_event("SHUTDOWN", since=mark, timeout=STEP)
        assert ev.data == {"guest": True, "reason": "guest-reset"}
        await qmp.wait_event("STOP", since=mark, timeout=STEP)
        assert await dm.wait_serial(img.LINE_CRASH, since=line, timeout=STEP)
        assert await qmp.query_status() == "shutdown"
        assert dm.read_counters().last_cmd == ord("X")

    with_model(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_crash_request_with_reboot(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        mark, line = qmp.event_mark(), dm.serial_mark()
        await dm.request_crash()
        # QEMU's reset, then SeaBIOS's tryReboot() from its resume path, then a boot.
        first = await qmp.wait_event("RESET", since=mark, timeout=STEP)
        second = await qmp.wait_event("RESET", since=first.seq + 1, timeout=STEP)
        await dm.wait_serial(img.LINE_BOOT, since=line, timeout=STEP)
        assert first.data == second.data == {"guest": True, "reason": "guest-reset"}
        # A third RESET is seen now and then on QEMU: SeaBIOS's next reboot method
        # (acpi_reboot, src/resume.c tryReboot) runs before QEMU has acted on the
        # 0xcf9 reset request of qemu_reboot().
        assert {e.name for e in qmp.events_since(mark)} == {"RESET"}
        c = dm.read_counters()
        assert c.boots == 2 and c.waking_vector == img.RESUME_VECTOR
        assert await qmp.query_status() == "running"

    with_model(kind, body, reboot=True)


# ---------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("kind", KINDS)
def test_quit_ends_the_device_model(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        mark = qmp.event_mark()
        await qmp.execute("quit")
        ev = await qmp.wait_event("SHUTDOWN", since=mark, timeout=STEP)
        assert ev.data == {"guest": False, "reason": "host-qmp-quit"}
        await dm.wait_run_state({"exited"}, timeout=STEP)
        assert not dm.alive
        if isinstance(dm, QemuDeviceModel):
            assert dm.returncode == 0

    with_model(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_stop_destroys_the_model_and_its_socket(kind: str) -> None:
    async def main() -> None:
        dm = new_model(kind, domid=7)
        await dm.start(timeout=STEP)
        pid = dm.pid
        if kind == "qemu":
            assert pid is not None and running_qemu_pids() == [pid]
        else:
            assert pid is None
        waiter = asyncio.ensure_future(dm.wait_serial("never printed", timeout=STEP))
        await asyncio.sleep(0)
        await dm.stop()
        await dm.stop()  # idempotent
        assert not dm.alive and dm.run_state == "exited"
        with pytest.raises(DeviceModelError):
            await waiter  # failed, not left hanging
        assert running_qemu_pids() == []
        with pytest.raises(DeviceModelError, match="no QMP socket"):
            await QmpClient(domid=7).connect(dm.qmp_path, timeout=STEP)
        with pytest.raises(DeviceModelError):
            await dm.request_s3()

    arun(main())


@pytest.mark.parametrize("kind", KINDS)
def test_connect_before_the_model_starts_does_not_race(kind: str) -> None:
    """The QMP socket is bound before QEMU starts: a client that connects at
    once is queued, and its greeting comes when QEMU accepts."""

    async def main() -> None:
        dm = new_model(kind)
        try:
            started = asyncio.ensure_future(dm.start(timeout=STEP))
            await asyncio.sleep(0)  # start() binds its sockets before it first yields
            assert os.path.exists(dm.qmp_path)
            qmp = QmpClient()
            await qmp.connect(dm.qmp_path, timeout=STEP)
            assert await qmp.query_status() in ("running", "prelaunch")
            await started
            await qmp.close()
        finally:
            await dm.stop()

    arun(main())


@pytest.mark.qemu
@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 is not installed")
def test_qemu_dies_with_a_parent_that_never_stopped_it(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a test process that crashes leaves no QEMU behind."""
    code = (
        "import asyncio, os, sys\n"
        "from torpor_sim.qemu import QemuDeviceModel\n"
        "async def main():\n"
        f"    dm = QemuDeviceModel(run_dir={str(tmp_path)!r})\n"
        "    await dm.start(timeout=10)\n"
        "    print(dm.pid, flush=True)\n"
        "    os._exit(3)  # no stop(), no atexit\n"
        "asyncio.run(main())\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert child.returncode == 3, child.stderr
    pid = int(child.stdout.split()[0])
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone and reaped
    try:
        ready, _, _ = select.select([fd], [], [], STEP)  # readable once the process exited
        assert ready, f"QEMU {pid} outlived its parent"
    finally:
        os.close(fd)


def test_a_qemu_that_fails_to_start_is_an_error_and_no_leak(tmp_path: Path) -> None:
    async def main() -> None:
        dm = QemuDeviceModel(qemu="/bin/false")
        started = time.monotonic()
        with pytest.raises(DeviceModelError):
            await dm.start(timeout=STEP)
        assert time.monotonic() - started < STEP
        assert not dm.alive

    arun(main())


def test_factory_picks_qemu_when_installed() -> None:
    dm = make_device_model(domid=3)
    assert isinstance(dm, DeviceModelProcess)
    assert dm.kind == ("qemu" if HAVE_QEMU else "in-process")
    fake = make_device_model(prefer="in-process")
    assert fake.kind == "in-process" and isinstance(fake, FakeDeviceModel)
    for m in (dm, fake):
        arun(m.stop())


# ---------------------------------------------------------------------------- raw QMP parity


async def raw_exchange(path: str, lines: list[bytes]) -> list[dict[str, object]]:
    """Send raw QMP text (no library) and collect the non-event replies."""
    import json

    reader, writer = await asyncio.open_unix_connection(path)
    try:
        greeting = json.loads(await asyncio.wait_for(reader.readline(), STEP))
        assert greeting["QMP"]["version"]["qemu"]["major"] == 7
        out = []
        for line in lines:
            writer.write(line)
            while True:
                msg = json.loads(await asyncio.wait_for(reader.readline(), STEP))
                if "event" not in msg:
                    out.append(msg)
                    break
        return out
    finally:
        writer.close()


@pytest.mark.parametrize("kind", KINDS)
def test_raw_qmp_replies_match_qemu(kind: str) -> None:
    async def main() -> None:
        dm = new_model(kind)
        try:
            await dm.start(timeout=STEP)
            replies = await raw_exchange(
                dm.qmp_path,
                [
                    b'{"execute": "query-status"}',
                    b'{"execute": "qmp_capabilities"}\n',
                    b'{"execute": "qmp_capabilities"}',
                    b'{"execute": "nosuch", "id": 5}',
                    b'{"execute": \n}',
                    b"[1]",
                    b'{"execute": "query-status", "id": "x"}',
                ],
            )
        finally:
            await dm.stop()
        neg = "Expecting capabilities negotiation with 'qmp_capabilities'"
        assert replies == [
            {"error": {"class": "CommandNotFound", "desc": neg}},
            {"return": {}},
            {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "Capabilities negotiation is already complete, command ignored",
                }
            },
            {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "The command nosuch has not been found",
                },
                "id": 5,
            },
            {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}},
            {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}},
            {"return": {"status": "running", "singlestep": False, "running": True}, "id": "x"},
        ]

    arun(main())


# ---------------------------------------------------------------------------- guest agent


@pytest.mark.parametrize("kind", KINDS)
def test_guest_agent_suspend_ram(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        async with GuestAgentShim(dm, dm_path(dm, "qga.sock")) as shim:
            agent = GuestAgent(domid=1)
            await agent.connect(shim.path, timeout=STEP)
            try:
                await agent.sync(timeout=STEP)
                await agent.ping(timeout=STEP)
                info = await agent.execute("guest-info", timeout=STEP)
                assert "guest-suspend-ram" in {c["name"] for c in info["supported_commands"]}
                mark = qmp.event_mark()
                await agent.suspend_ram(
                    qmp.wait_event("SUSPEND", since=mark, timeout=STEP), timeout=STEP
                )
                assert await qmp.query_status() == "suspended"
                # The agent runs in the guest: asleep, it does not answer.
                with pytest.raises(Timeout):
                    await agent.ping(timeout=0.3)
                line = dm.serial_mark()
                await qmp.system_wakeup()
                await dm.wait_serial(img.LINE_RESUME, since=line, timeout=STEP)
                # The stale reply to the timed-out ping is flushed by the next sync.
                await agent.sync(timeout=STEP)
                await agent.ping(timeout=STEP)
                with pytest.raises(QmpCommandError) as e:
                    await agent.execute("guest-nosuch", timeout=STEP)
                assert e.value.error_class == "CommandNotFound"
            finally:
                await agent.close()

    with_model(kind, body)


def fs_accounted(c: img.GuestCounters) -> bool:
    """Every tick wrote to the filesystem or blocked on it, once (the handler
    counts the tick first: read mid-tick, one is not accounted yet)."""
    return c.ticks - (c.fs_writes + c.fs_blocked) in (0, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_filesystem_blocks_the_guests_writer(kind: str) -> None:
    """The guest writes its filesystem each tick; frozen, it writes nothing and
    its writer blocks; thawed, it writes again.  (Windows of elapsed time
    measure the tick rate: a tick has no event.)"""

    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        c0 = dm.read_counters()
        assert c0.fs_frozen == 0 and c0.fs_blocked == 0 and fs_accounted(c0)
        await asyncio.sleep(0.2)
        c1 = dm.read_counters()
        assert c1.fs_writes - c0.fs_writes >= 5 and c1.fs_blocked == 0
        dm.write_memory(img.FS_FROZEN_ADDR, b"\x01")  # FIFREEZE
        f0 = dm.read_counters()
        await asyncio.sleep(0.3)
        f1 = dm.read_counters()
        assert f1.fs_frozen == 1 and fs_accounted(f1)
        assert f1.ticks - f0.ticks >= 5  # the guest runs on...
        assert f1.fs_writes - f0.fs_writes <= 1  # ...but writes nothing (a tick in flight)
        assert f1.fs_blocked - f0.fs_blocked >= f1.ticks - f0.ticks - 1
        dm.write_memory(img.FS_FROZEN_ADDR, b"\x00")  # FITHAW
        t0 = dm.read_counters()
        await asyncio.sleep(0.2)
        t1 = dm.read_counters()
        assert t1.fs_writes - t0.fs_writes >= 5 and t1.fs_blocked - t0.fs_blocked <= 1
        assert fs_accounted(t1)

    with_model(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_reboot_mounts_the_filesystem_thawed(kind: str) -> None:
    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        dm.write_memory(img.FS_FROZEN_ADDR, b"\x01")
        mark, line = qmp.event_mark(), dm.serial_mark()
        await dm.request_crash()
        await qmp.wait_event("RESET", since=mark, timeout=STEP)
        await dm.wait_serial(img.LINE_BOOT, since=line, timeout=STEP)
        c = dm.read_counters()
        assert c.boots == 2 and c.fs_frozen == 0

    with_model(kind, body, reboot=True)


@pytest.mark.parametrize("kind", KINDS)
def test_guest_agent_fsfreeze(kind: str) -> None:
    """qemu-ga 7.2's guest-fsfreeze-*: counts, status, and the frozen agent's
    allowlist (a second freeze and guest-suspend-ram are disabled)."""

    async def body(dm: DeviceModelBase, qmp: QmpClient) -> None:
        async with GuestAgentShim(dm, dm_path(dm, "qga.sock")) as shim:
            async with GuestAgent(domid=1) as agent:
                await agent.connect(shim.path, timeout=STEP)
                await agent.sync(timeout=STEP)

                async def run(cmd: str) -> object:
                    return await agent.execute(cmd, timeout=STEP)

                assert await run("guest-fsfreeze-status") == "thawed"
                assert await run("guest-fsfreeze-thaw") == 0  # nothing frozen: not an error
                assert await run("guest-fsfreeze-freeze") == 1
                assert await run("guest-fsfreeze-status") == "frozen"
                assert dm.read_counters().fs_frozen == 1
                info = await run("guest-info")
                assert isinstance(info, dict)
                enabled = {c["name"]: c["enabled"] for c in info["supported_commands"]}
                assert enabled["guest-fsfreeze-thaw"] and enabled["guest-ping"]
                assert not enabled["guest-fsfreeze-freeze"] and not enabled["guest-suspend-ram"]
                for cmd in ("guest-fsfreeze-freeze", "guest-suspend-ram"):
                    with pytest.raises(QmpCommandError) as e:
                        await run(cmd)
                    assert e.value.error_class == "CommandNotFound"
                    assert e.value.desc == (
                        f"Command {cmd} has been disabled: the agent is in frozen state"
                    )
                with pytest.raises(QmpCommandError, match="has not been found"):
                    await run("guest-nosuch")  # unknown before disabled, as qmp_dispatch
                await agent.ping(timeout=STEP)
                # The guest's own S3 (not asked through the agent) is allowed frozen;
                # the freeze is the kernel's state and outlives the sleep.
                await enter_s3(dm, qmp)
                line = dm.serial_mark()
                await qmp.system_wakeup()
                await dm.wait_serial(img.LINE_RESUME, since=line, timeout=STEP)
                await agent.sync(timeout=STEP)
                assert await run("guest-fsfreeze-status") == "frozen"
                assert await run("guest-fsfreeze-thaw") == 1
                assert await run("guest-fsfreeze-status") == "thawed"
                assert dm.read_counters().fs_frozen == 0
                assert await run("guest-fsfreeze-freeze") == 1  # and again
                assert await run("guest-fsfreeze-thaw") == 1

    with_model(kind, body)


def test_guest_agent_reports_a_guest_without_s3() -> None:
    async def main() -> None:
        async with running("in-process") as (dm, qmp):
            dm.write_memory(img.PM1A_CNT_ADDR, bytes(4))  # as if no FADT had been found
            async with GuestAgentShim(dm, dm_path(dm, "qga.sock")) as shim:
                async with GuestAgent() as agent:
                    await agent.connect(shim.path, timeout=STEP)
                    await agent.sync(timeout=STEP)
                    never = asyncio.get_running_loop().create_future()
                    with pytest.raises(QmpCommandError, match="S3 not supported"):
                        await agent.suspend_ram(never, timeout=STEP)
                    assert never.cancelled()
                    assert await qmp.query_status() == "running"

    arun(main())


@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 is not installed")
@pytest.mark.qemu
def test_measured_latencies(record_property: pytest.RecordProperty) -> None:
    """Numbers for the report: QEMU start -> boot line, S3 enter, S3 leave."""

    async def main() -> dict[str, float]:
        dm = QemuDeviceModel()
        t0 = time.monotonic()
        try:
            await dm.start(timeout=STEP)
            boot = time.monotonic() - t0
            async with QmpClient() as qmp:
                await qmp.connect(dm.qmp_path, timeout=STEP)
                mark = qmp.event_mark()
                t1 = time.monotonic()
                await dm.request_s3()
                await qmp.wait_event("SUSPEND", since=mark, timeout=STEP)
                enter = time.monotonic() - t1
                line = dm.serial_mark()
                t2 = time.monotonic()
                await qmp.system_wakeup()
                await dm.wait_serial(img.LINE_RESUME, since=line, timeout=STEP)
                leave = time.monotonic() - t2
        finally:
            await dm.stop()
        return {"boot_s": boot, "s3_enter_s": enter, "s3_leave_s": leave}

    numbers = arun(main())
    for k, v in numbers.items():
        record_property(k, round(v, 4))
    print("\nmeasured:", {k: f"{v * 1000:.1f} ms" for k, v in numbers.items()})
    assert numbers["boot_s"] < 5 and numbers["s3_enter_s"] < 2 and numbers["s3_leave_s"] < 2

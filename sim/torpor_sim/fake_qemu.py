"""The in-process HVM device model: QEMU's observable behaviour without QEMU.

Where ``qemu-system-x86_64`` is not installed, :class:`FakeDeviceModel` stands
in for :class:`torpor_sim.qemu.QemuDeviceModel`.  It serves real QMP on a real
Unix socket (asyncio, on the caller's event loop) and runs a simulated guest
that does what the boot sector of :mod:`torpor_sim.hvm_image` does, on the
same guest-physical memory layout: "SeaBIOS" writes ACPI tables (RSDP, RSDT,
FADT with PM1a_CNT_BLK 0x604, FACS at 0xFE0000, as QEMU 7.2 + SeaBIOS 1.16
place them for a 16 MiB ``pc`` guest), the guest walks them, sets the FACS
waking vector, ticks at :data:`~torpor_sim.hvm_image.TICK_HZ` writing its
ring and its filesystem (unless frozen), and polls its COM1 for the one-byte
commands.

Every behaviour below was observed on QEMU 7.2 (Debian 12) with the real
guest, and the tests run the same checks against both models:

* Greeting, then ``qmp_capabilities``; any other command first is
  ``CommandNotFound`` "Expecting capabilities negotiation with
  'qmp_capabilities'"; a second negotiation is ``CommandNotFound``
  "Capabilities negotiation is already complete, command ignored".  Events go
  only to a negotiated connection.  One client at a time per socket: a second
  client waits (for its greeting) until the first leaves, as with QEMU's
  socket chardev.
* ``stop``: ``STOP`` if running, else nothing (a guest in S3 stays
  ``suspended``).  ``cont``: ``RESUME`` if paused; nothing if running or
  suspended; "Resetting the Virtual Machine is required" after a guest
  shutdown.
* S3: ``SUSPEND``, run state ``suspended``.  ``system_wakeup``: "Unable to wake
  up: guest is not in suspended state" unless suspended; else ``WAKEUP``
  before the reply, then the reset (no ``RESET`` event: the cause is
  ``SHUTDOWN_CAUSE_NONE``) and SeaBIOS's resume, which jumps to the waking
  vector; with none, SeaBIOS reboots: under ``-no-reboot`` ``SHUTDOWN
  {guest: true, reason: guest-reset}`` and ``STOP``, else one ``RESET`` and
  a boot.  (QEMU now and then repeats that ``SHUTDOWN``/``RESET``: SeaBIOS's
  ``tryReboot()`` tries its next reboot method before QEMU acted on the
  first request; the model sends one.)
* Crash (triple fault): under ``-no-reboot`` ``SHUTDOWN`` (guest-reset) and
  ``STOP``; else ``RESET`` twice (QEMU's reset, then SeaBIOS's ``tryReboot()``
  from its resume path) and a boot.  (QEMU now and then shows a third
  ``RESET``: SeaBIOS's next reboot method runs before QEMU acted on the
  first; the model shows the usual two.)  Power off: ``SHUTDOWN`` (guest-shutdown)
  and ``STOP`` (``-no-shutdown``).  ``quit``: ``SHUTDOWN`` (guest false,
  host-qmp-quit), the reply, then the process is gone.
* ``xen-save-devices-state``: present (as in every QEMU 7.2); a running guest
  sees ``STOP`` and ``RESUME`` around the save; the file starts with QEMU's
  ``QEVM`` magic.  ``xen-load-devices-state`` on a running guest: "Cannot
  update device state while vm is running".  Otherwise, mirroring the QEMU it
  stands for (``flavour``): ``"qemu-system-x86_64"`` (default; QEMU 7.2 on a
  ``pc`` machine) fails the load and then aborts, so the reply never comes
  and the device model is gone; ``"qemu-xen"`` (a Xen machine, where the
  device state is saved without the configuration section the load
  expects) loads it.
* ``xen-set-global-dirty-log``: QEMU's log-dirty mode on or off (a live
  migration's, libxl ``switch_qemu_logdirty``); :attr:`global_dirty_log`.
* ``human-monitor-command``: ``xp /<n><x><b|h|w|g> <addr>`` in QEMU's format
  (enough for counter reads); anything else "unknown command".
* Saving the whole VM (:meth:`FakeDeviceModel.save_vm_state`; QEMU: ``migrate``
  to a file) writes this model's own format (below) but shows what QEMU 7.2
  shows: ``STOP`` for a running guest, ``MIGRATION`` ``setup``,
  ``MIGRATION_PASS`` 1, ``active``, ``pre-switchover``, ``device``,
  ``MIGRATION_PASS`` 2, ``completed`` (the QEMU model saves with
  ``pause-before-switchover``), and run state ``postmigrate`` after; ``cont``
  runs such a source again.  A guest in S3 is woken by the save, as QEMU
  7.2's ``migration_completion()`` wakes it: ``STOP`` and ``WAKEUP`` come
  after ``active`` (QEMU varies their order and may send ``WAKEUP`` after
  ``pre-switchover``; the model sends them before), the wake-up's reset puts
  the vCPU at the reset vector, and the saved run state is ``running``:
  whoever continues that state (a restored model, or the source after
  ``cont``) goes through SeaBIOS's S3 resume path to the guest's waking
  vector.  A model made with ``incoming=FILE`` starts ``paused`` (QEMU's
  ``-S``) from such a file, without booting.

The saved VM state format (version 1, big-endian)::

    8 bytes   magic "TORPORVM"
    u32       version (1)
    u32       header length H
    H bytes   header, JSON: ram_bytes, page_size, pages, body_sha256,
              run_state (QEMU's "global state"), cpu ("program" or
              "reset-vector"), devices (uart-rx, cmos-shutdown-status,
              seabios-post-done)
    body      `pages` records: u32 page number, then the page (zero pages
              are left out, as QEMU leaves out zero pages' contents)

A QEMU migration stream (``QEVM``) is refused with a clear error, as QEMU
refuses this format (:class:`torpor_sim.qemu.QemuDeviceModel`).

Not modelled: out-of-band execution, QEMU's exact wording of JSON syntax
errors, and every command not listed by ``query-commands`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

from torpor.errors import DeviceModelError
from torpor.qmp import QmpEvent
from torpor_sim import hvm_image as img
from torpor_sim.qemu import (
    _CONTINUABLE,
    INPROC_VM_MAGIC,
    QEMU_VM_FILE_MAGIC,
    RAM_BYTES,
    DeviceModelBase,
    Kind,
    _listening_socket,
    _save_target,
    _saved_already,
)

__all__ = ["FakeDeviceModel", "Flavour"]

Flavour = Literal["qemu-system-x86_64", "qemu-xen"]

# Where SeaBIOS 1.16 on QEMU 7.2 put the tables of a 16 MiB pc guest (seen here).
RSDP_ADDR = 0x000F52C0
FACS_ADDR = 0x00FE0000
FADT_ADDR = 0x00FE0040
RSDT_ADDR = 0x00FE0100
PM_BASE = 0x600  # PIIX4 PM I/O base QEMU's SeaBIOS programs; PM1a_CNT = base + 4
CMOS_S3_RESUME = 0xFE  # CMOS shutdown status QEMU sets on S3 (hw/rtc/mc146818rtc.c)

#: The saved VM state format's version, and its page size.
VM_STATE_VERSION = 1
_PAGE = 4096
_ZERO_PAGE = bytes(_PAGE)

_QEMU_VERSION = {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "torpor in-process"}

# command -> (required arguments, optional arguments)
_SCHEMA: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "qmp_capabilities": (frozenset(), frozenset({"enable"})),
    "query-status": (frozenset(), frozenset()),
    "query-commands": (frozenset(), frozenset()),
    "query-current-machine": (frozenset(), frozenset()),
    "query-version": (frozenset(), frozenset()),
    "stop": (frozenset(), frozenset()),
    "cont": (frozenset(), frozenset()),
    "system_wakeup": (frozenset(), frozenset()),
    "xen-save-devices-state": (frozenset({"filename"}), frozenset({"live"})),
    "xen-load-devices-state": (frozenset({"filename"}), frozenset()),
    "xen-set-global-dirty-log": (frozenset({"enable"}), frozenset()),
    "human-monitor-command": (frozenset({"command-line"}), frozenset({"cpu-index"})),
    "quit": (frozenset(), frozenset()),
}


class _QmpError(Exception):
    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def _acpi_checksum(table: bytearray, at: int) -> None:
    table[at] = (-sum(table)) & 0xFF


def _acpi_header(sig: bytes, length: int, revision: int) -> bytearray:
    hdr = bytearray(length)
    struct.pack_into(
        "<4sIBB6s8sI4sI", hdr, 0, sig, length, revision, 0, b"BOCHS ", b"BXPC    ", 1, b"BXPC", 1
    )
    return hdr


class _Firmware:
    """The part of SeaBIOS the guest can see: the ACPI tables it leaves in RAM."""

    @staticmethod
    def install_tables(ram: mmap.mmap) -> None:
        facs = bytearray(64)
        struct.pack_into("<4sI", facs, 0, b"FACS", 64)
        fadt = _acpi_header(b"FACP", 116, 1)
        struct.pack_into("<II", fadt, 36, FACS_ADDR, 0)  # FIRMWARE_CTRL, DSDT
        struct.pack_into("<I", fadt, 56, PM_BASE)  # PM1a_EVT_BLK
        struct.pack_into("<I", fadt, 64, PM_BASE + 4)  # PM1a_CNT_BLK
        struct.pack_into("<I", fadt, 76, PM_BASE + 8)  # PM_TMR_BLK
        _acpi_checksum(fadt, 9)
        rsdt = _acpi_header(b"RSDT", 40, 1)
        struct.pack_into("<I", rsdt, 36, FADT_ADDR)
        _acpi_checksum(rsdt, 9)
        rsdp = bytearray(20)
        struct.pack_into("<8sB6sBI", rsdp, 0, b"RSD PTR ", 0, b"BOCHS ", 0, RSDT_ADDR)
        _acpi_checksum(rsdp, 8)
        for addr, blob in (
            (FACS_ADDR, facs),
            (FADT_ADDR, fadt),
            (RSDT_ADDR, rsdt),
            (RSDP_ADDR, rsdp),
        ):
            ram[addr : addr + len(blob)] = bytes(blob)


class _Guest:
    """The boot sector's program, step for step, on the model's RAM."""

    def __init__(self, dm: FakeDeviceModel) -> None:
        self.dm = dm

    def _u32(self, addr: int) -> int:
        value: int = struct.unpack("<I", self.dm.read_memory(addr, 4))[0]
        return value

    def _put32(self, addr: int, value: int) -> None:
        self.dm.write_memory(addr, struct.pack("<I", value & 0xFFFFFFFF))

    def boot(self) -> None:
        if self._u32(img.STATE_ADDR) != img.MAGIC:  # fresh RAM: clear state and ring
            self.dm.write_memory(img.STATE_ADDR, bytes(0x800))
            self._put32(img.STATE_ADDR, img.MAGIC)
        self.dm.write_memory(img.FS_FROZEN_ADDR, b"\0")  # a boot mounts its filesystem thawed
        self._put32(img.BOOTS_ADDR, self._u32(img.BOOTS_ADDR) + 1)
        fadt = self._find_fadt()
        if fadt is None:
            self.dm.guest_print(img.LINE_NO_ACPI)
        else:
            facs = self._u32(fadt + 36)
            self._put32(img.FACS_PTR_ADDR, facs)
            self._put32(img.PM1A_CNT_ADDR, self._u32(fadt + 64))
            self._put32(facs + 12, img.RESUME_VECTOR)  # FACS Firmware_Waking_Vector
        self.dm.guest_print(img.LINE_BOOT)

    def resume(self) -> None:
        self._put32(img.RESUMES_ADDR, self._u32(img.RESUMES_ADDR) + 1)
        self.dm.guest_print(img.LINE_RESUME)

    def _find_fadt(self) -> int | None:
        for addr in range(0xE0000, 0x100000, 16):
            if self.dm.read_memory(addr, 8) == b"RSD PTR ":
                rsdt = self._u32(addr + 16)
                end = rsdt + self._u32(rsdt + 4)
                for entry in range(rsdt + 36, end, 4):
                    table = self._u32(entry)
                    if self.dm.read_memory(table, 4) == b"FACP":
                        return table
                return None
        return None

    def tick(self) -> None:
        ticks = self._u32(img.TICKS_ADDR) + 1
        self._put32(img.REGION_ADDR + 4 * (ticks % 256), ticks)
        self._put32(img.TICKS_ADDR, ticks)
        # The tick's filesystem write; a frozen filesystem blocks the writer instead.
        frozen = self.dm.read_memory(img.FS_FROZEN_ADDR, 1)[0]
        counter = img.FS_WRITES_ADDR + 4 * frozen
        self._put32(counter, self._u32(counter) + 1)
        command = self.dm.uart_take()
        if command is None:
            return
        self.dm.write_memory(img.LAST_CMD_ADDR, bytes([command]))
        if command == img.CMD_S3[0]:
            self._put32(img.S3_ENTRIES_ADDR, self._u32(img.S3_ENTRIES_ADDR) + 1)
            self.dm.guest_print(img.LINE_S3)
            self._sleep(1 << 10)
        elif command == img.CMD_POWEROFF[0]:
            self.dm.guest_print(img.LINE_POWEROFF)
            self._sleep(0 << 10)
        elif command == img.CMD_CRASH[0]:
            self.dm.guest_print(img.LINE_CRASH)
            self.dm.triple_fault()

    def _sleep(self, slp_typ: int) -> None:
        port = self._u32(img.PM1A_CNT_ADDR) & 0xFFFF
        if port:
            self.dm.pm1_cnt_write(port, slp_typ | (1 << 13))


class _JsonStream:
    """Splits a byte stream into JSON texts the way QEMU's json-streamer does.

    QMP is not line-based: qemu.qmp sends each message with no newline.  A
    text ends when its brackets balance (outside strings); a bare scalar ends
    at whitespace; a 0xFF byte (invalid in JSON) discards what was pending.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        texts: list[bytes] = []
        while True:
            text = self._next()
            if text is None:
                return texts
            texts.append(text)

    def _next(self) -> bytes | None:
        buf = self._buf
        ff = buf.rfind(b"\xff")
        if ff >= 0:
            del buf[: ff + 1]
        start = 0
        while start < len(buf) and buf[start] in b" \t\r\n":
            start += 1
        del buf[:start]
        if not buf:
            return None
        if buf[0] not in b"{[":
            end = 0
            while end < len(buf) and buf[end] not in b" \t\r\n{[":
                end += 1
            if end == len(buf) or end == 0:
                if end == 0:  # a lone closing bracket and the like
                    text = bytes(buf[:1])
                    del buf[:1]
                    return text
                return None
            text = bytes(buf[:end])
            del buf[:end]
            return text
        depth, in_string, escaped = 0, False, False
        for i, byte in enumerate(buf):
            if in_string:
                if escaped:
                    escaped = False
                elif byte == 0x5C:  # backslash
                    escaped = True
                elif byte == 0x22:  # quote
                    in_string = False
            elif byte == 0x22:
                in_string = True
            elif byte in b"{[":
                depth += 1
            elif byte in b"}]":
                depth -= 1
                if depth == 0:
                    text = bytes(buf[: i + 1])
                    del buf[: i + 1]
                    return text
        return None


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")


class FakeDeviceModel(DeviceModelBase):
    """An in-process device model with QEMU 7.2's observable QMP behaviour.

    Same constructor arguments as :class:`~torpor_sim.qemu.QemuDeviceModel`
    (``incoming``: a VM state saved by this model's :meth:`save_vm_state`),
    plus ``flavour``: which QEMU to mirror where they differ
    (``xen-load-devices-state``, see the module docstring).
    """

    kind: Kind = "in-process"

    def __init__(
        self,
        *,
        domid: int | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        qmp_path: str | os.PathLike[str] | None = None,
        reboot: bool = False,
        flavour: Flavour = "qemu-system-x86_64",
        incoming: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(domid=domid, reboot=reboot)
        self.flavour = flavour
        #: xen-set-global-dirty-log: QEMU's log-dirty mode (a live migration's)
        self.global_dirty_log = False
        self.incoming = None if incoming is None else Path(os.path.abspath(incoming))
        self._own_dir = run_dir is None
        self.run_dir = Path(
            run_dir if run_dir is not None else tempfile.mkdtemp(prefix="torpor-dm-")
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._qmp_path = Path(qmp_path) if qmp_path is not None else self.run_dir / "qmp.sock"
        self._mem: mmap.mmap | None = None
        self._guest = _Guest(self)
        self._uart: deque[int] = deque()
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._monitor_lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._cmos_shutdown = 0
        self._post_done = False
        self._cpu_at_reset = False  # a wake-up's reset happened while the VM was stopped
        self._started = False
        self._exited = False
        self._seq = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def qmp_path(self) -> str:
        return str(self._qmp_path)

    @property
    def pid(self) -> int | None:
        return None

    @property
    def alive(self) -> bool:
        return self._started and not self._exited

    async def start(self, *, timeout: float = 10.0) -> None:
        if self._started:
            raise DeviceModelError("device model already started", domid=self.domid)
        self._started = True
        saved: _SavedVm | None = None
        if self.incoming is not None:
            try:
                saved = _SavedVm.load(self.incoming, domid=self.domid)
            except BaseException:
                await self.stop()
                raise
        self._mem = mmap.mmap(-1, RAM_BYTES)
        sock = _listening_socket(self._qmp_path)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        if saved is not None:
            self._restore(saved)
            return
        self._set_state("running")
        asyncio.get_running_loop().call_soon(self._firmware_entry)
        try:
            await self.wait_serial(img.LINE_BOOT, timeout=timeout, since=0)
        except BaseException:
            await self.stop()
            raise

    # ------------------------------------------------------------------ save / restore

    async def save_vm_state(self, path: str | os.PathLike[str], *, timeout: float) -> None:
        """Write the whole VM state to ``path`` (this model's format; see the module
        docstring), with QEMU 7.2's events and run states.  Synchronous here, so
        ``timeout`` is never reached."""
        if not self.alive:
            raise DeviceModelError("device model is not running", domid=self.domid)
        target = _save_target(path, self.domid)
        if self._state == "postmigrate":
            raise _saved_already(target, self.domid)
        if self._state == "running":
            await self.pause_vcpus()
        self._emit("MIGRATION", {"status": "setup"})
        self._emit("MIGRATION_PASS", {"pass": 1})
        self._emit("MIGRATION", {"status": "active"})
        if self._state == "suspended":
            # migration_completion(): qemu_system_wakeup_request(), then the VM stops; the
            # main loop's wake-up resets the machine (the vCPU to the reset vector).
            self._set_state("running")
            self._emit("STOP")
            self._emit("WAKEUP")
            self._cpu_at_reset = True
            global_state = "running"
        else:
            global_state = self._state
        # QemuDeviceModel saves with pause-before-switchover (so that the wake-up's reset
        # is always in the saved vCPU state) and continues at once.
        self._emit("MIGRATION", {"status": "pre-switchover"})
        self._emit("MIGRATION", {"status": "device"})
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            with open(part, "wb") as f:
                _SavedVm.write(f, self._ram(), global_state, self._cpu_at_reset, self._devices())
            os.replace(part, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                part.unlink()
            self._emit("MIGRATION", {"status": "failed"})
            raise DeviceModelError(
                f"saving the VM state to {target}: {e.strerror}", domid=self.domid, cause=e
            ) from e
        finally:
            # QEMU: vm_stop_force_state(finish-migrate) from any state, then postmigrate.
            self._set_state("postmigrate")
        self._emit("MIGRATION_PASS", {"pass": 2})
        self._emit("MIGRATION", {"status": "completed"})

    def _devices(self) -> dict[str, Any]:
        return {
            "uart-rx": list(self._uart),
            "cmos-shutdown-status": self._cmos_shutdown,
            "seabios-post-done": self._post_done,
        }

    def _restore(self, saved: _SavedVm) -> None:
        """Become the saved VM, stopped: QEMU after ``-S -incoming``."""
        ram = self._ram()
        for number, page in saved.pages:
            ram[number * _PAGE : (number + 1) * _PAGE] = page
        devices = saved.devices
        self._uart = deque(int(b) for b in devices["uart-rx"])
        self._cmos_shutdown = int(devices["cmos-shutdown-status"])
        self._post_done = bool(devices["seabios-post-done"])
        self._cpu_at_reset = saved.cpu == "reset-vector"
        self._emit("MIGRATION", {"status": "setup"})
        self._emit("MIGRATION", {"status": "active"})
        # process_incoming_migration_bh(): "running" obeys -S; any other state is taken.
        self._set_state("paused" if saved.run_state == "running" else saved.run_state)
        self._emit("MIGRATION", {"status": "completed"})

    async def stop(self) -> None:
        if self._exited:
            return
        self._terminate(DeviceModelError("in-process device model was stopped", domid=self.domid))
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 2.0)
        if self._mem is not None:
            with contextlib.suppress(BufferError):
                self._mem.close()
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    async def __aenter__(self) -> FakeDeviceModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _terminate(self, why: DeviceModelError, *, abort: bool = True) -> None:
        """The process is gone: sockets close, the guest stops, waiters fail."""
        if self._exited:
            return
        self._exited = True
        self._disarm()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            transport = conn.writer.transport
            if abort:
                transport.abort()
            else:
                conn.writer.close()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self._qmp_path.unlink()
        self._died(why)

    # ------------------------------------------------------------------ the guest's view

    def _ram(self) -> mmap.mmap:
        if self._mem is None or self._mem.closed:
            raise DeviceModelError("guest memory is not mapped", domid=self.domid)
        return self._mem

    def guest_print(self, line: str) -> None:
        """COM1 output from the guest."""
        self._feed_serial(line.encode() + b"\r\n")

    def uart_take(self) -> int | None:
        """The guest polls COM1's LSR.DR and reads one byte."""
        return self._uart.popleft() if self._uart else None

    async def _send_serial(self, command: bytes) -> None:
        if not self.alive:
            raise DeviceModelError("device model is not running", domid=self.domid)
        self._uart.extend(command)

    async def pause_vcpus(self) -> None:
        if self._state == "running":
            self._disarm()
            self._set_state("paused")
            self._emit("STOP")

    async def unpause_vcpus(self) -> None:
        if self._state in _CONTINUABLE:
            self._continue()

    async def request_s3(self) -> None:
        await self._send_serial(img.CMD_S3)

    async def request_poweroff(self) -> None:
        await self._send_serial(img.CMD_POWEROFF)

    async def request_crash(self) -> None:
        await self._send_serial(img.CMD_CRASH)

    # ------------------------------------------------------------------ the machine

    def _continue(self) -> None:
        """QEMU's vm_start(): ``RESUME``, then the vCPU runs on from where it is."""
        self._set_state("running")
        self._emit("RESUME")
        if self._cpu_at_reset:
            self._cpu_at_reset = False
            asyncio.get_running_loop().call_soon(self._firmware_entry)
        else:
            self._arm()

    def _arm(self) -> None:
        if self._timer is None and self._state == "running" and not self._exited:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(1 / img.TICK_HZ, self._on_tick)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_tick(self) -> None:
        self._timer = None
        if self._state != "running" or self._exited:
            return
        self._guest.tick()
        self._arm()

    def _emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        msg: dict[str, Any] = {
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
            "event": name,
        }
        if data is not None:
            msg["data"] = data
        for conn in self._conns:
            if conn.negotiated:
                conn.send(msg)
        self._seq += 1
        self._note_event(QmpEvent(name, data or {}, now, self._seq - 1))

    def _firmware_entry(self) -> None:
        """The vCPU at the reset vector: SeaBIOS POST, or its resume path."""
        if self._exited:
            return
        if not self._post_done:
            self._post_done = True
            _Firmware.install_tables(self._ram())
            self._guest.boot()
            self._arm()
            return
        status, self._cmos_shutdown = self._cmos_shutdown, 0
        if status == CMOS_S3_RESUME:
            facs = FACS_ADDR
            vector = struct.unpack("<I", self.read_memory(facs + 12, 4))[0]
            if vector == img.RESUME_VECTOR:
                self._guest.resume()
                self._arm()
                return
            if vector:  # a jump into code that is not there: it faults its way to a reset
                self.triple_fault()
                return
        self._try_reboot()

    def _try_reboot(self) -> None:
        # SeaBIOS tryReboot(): qemu_reboot() restores a pristine BIOS (HaveRunPost = 0).
        self._post_done = False
        self._reset_request()

    def triple_fault(self) -> None:
        """The vCPU triple-faulted: QEMU's SHUTDOWN_CAUSE_GUEST_RESET."""
        self._reset_request()

    def _reset_request(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        if not self.reboot:  # -no-reboot: the reset becomes a shutdown (and -no-shutdown pauses)
            loop.call_soon(self._guest_shutdown, "guest-reset")
            return

        def reset() -> None:
            if self._exited:
                return
            self._emit("RESET", {"guest": True, "reason": "guest-reset"})
            self._firmware_entry()

        self._set_state("running")
        loop.call_soon(reset)

    def _guest_shutdown(self, reason: str) -> None:
        if self._exited:
            return
        self._disarm()
        self._set_state("shutdown")
        self._emit("SHUTDOWN", {"guest": True, "reason": reason})
        self._emit("STOP")

    def pm1_cnt_write(self, port: int, value: int) -> None:
        """The guest wrote PM1a_CNT (QEMU hw/acpi/core.c, acpi_pm1_cnt_write)."""
        if port != PM_BASE + 4 or not value & (1 << 13):
            return
        slp_typ = (value >> 10) & 7
        if slp_typ == 0:
            self._disarm()
            asyncio.get_running_loop().call_soon(self._guest_shutdown, "guest-shutdown")
        elif slp_typ == 1 and self._state != "suspended":
            self._disarm()
            self._cmos_shutdown = CMOS_S3_RESUME
            self._set_state("suspended")
            self._emit("SUSPEND")

    # ------------------------------------------------------------------ QMP server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        conn = _Connection(writer)
        try:
            # QEMU's socket chardev takes one client at a time; others wait to be accepted.
            async with self._monitor_lock:
                if self._exited:
                    return
                self._conns.add(conn)
                conn.send({"QMP": {"version": _QEMU_VERSION, "capabilities": ["oob"]}})
                stream = _JsonStream()
                while chunk := await reader.read(65536):
                    for text in stream.feed(chunk):
                        reply = self._dispatch(conn, text)
                        if reply is not None:
                            conn.send(reply)
                        if self._exited:
                            break
                    await writer.drain()
                    if self._exited:
                        break
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels a connection; end it quietly (asyncio's stream server
            # would log a cancelled handler as an error in Python 3.11).
            pass
        finally:
            self._conns.discard(conn)
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    def _dispatch(self, conn: _Connection, line: bytes) -> dict[str, Any] | None:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as e:
            desc = f"JSON parse error, {e.msg.lower()}"
            return {"error": {"class": "GenericError", "desc": desc}}
        except ValueError:  # not UTF-8
            return {"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8"}}
        if not isinstance(msg, dict):
            return {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        out: dict[str, Any] = {}
        try:
            cmd = msg.get("execute")
            if not isinstance(cmd, str):
                raise _QmpError("GenericError", "QMP input lacks member 'execute'")
            args = msg.get("arguments", {})
            if not isinstance(args, dict):
                raise _QmpError("GenericError", "QMP input member 'arguments' must be an object")
            if not conn.negotiated and cmd != "qmp_capabilities":
                raise _QmpError(
                    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            if conn.negotiated and cmd == "qmp_capabilities":
                raise _QmpError(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                )
            if cmd not in _SCHEMA:
                raise _QmpError("CommandNotFound", f"The command {cmd} has not been found")
            required, optional = _SCHEMA[cmd]
            for name in sorted(required - args.keys()):
                raise _QmpError("GenericError", f"Parameter '{name}' is missing")
            for name in sorted(args.keys() - required - optional):
                raise _QmpError("GenericError", f"Parameter '{name}' is unexpected")
            result = self._command(conn, cmd, args)
            if result is _NO_REPLY:
                return None
            out["return"] = result
        except _QmpError as e:
            out["error"] = {"class": e.error_class, "desc": e.desc}
        if "id" in msg:
            out["id"] = msg["id"]
        return out

    def _command(self, conn: _Connection, cmd: str, args: dict[str, Any]) -> Any:
        state = self._state
        if cmd == "qmp_capabilities":
            conn.negotiated = True
            return {}
        if cmd == "query-status":
            return {"status": state, "singlestep": False, "running": state == "running"}
        if cmd == "query-commands":
            return [{"name": name} for name in _SCHEMA]
        if cmd == "query-current-machine":
            return {"wakeup-suspend-support": True}
        if cmd == "query-version":
            return _QEMU_VERSION
        if cmd == "stop":
            if state == "running":
                self._disarm()
                self._set_state("paused")
                self._emit("STOP")
            return {}
        if cmd == "cont":
            if state in ("shutdown", "internal-error"):
                raise _QmpError("GenericError", "Resetting the Virtual Machine is required")
            if state in _CONTINUABLE:
                self._continue()
            return {}
        if cmd == "system_wakeup":
            if state != "suspended":
                raise _QmpError(
                    "GenericError", "Unable to wake up: guest is not in suspended state"
                )
            self._set_state("running")
            self._emit("WAKEUP")
            asyncio.get_running_loop().call_soon(self._firmware_entry)
            return {}
        if cmd == "xen-save-devices-state":
            return self._save_devices_state(str(args["filename"]))
        if cmd == "xen-load-devices-state":
            return self._load_devices_state(str(args["filename"]))
        if cmd == "xen-set-global-dirty-log":
            # memory_global_dirty_log_start/stop(GLOBAL_DIRTY_MIGRATION)
            if not isinstance(args["enable"], bool):
                raise _QmpError(
                    "GenericError", "Invalid parameter type for 'enable', expected: boolean"
                )
            self.global_dirty_log = args["enable"]
            return {}
        if cmd == "human-monitor-command":
            return self._hmp(str(args["command-line"]))
        if cmd == "quit":
            self._emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            # The reply is written before this runs; a graceful close flushes it.
            asyncio.get_running_loop().call_soon(
                lambda: self._terminate(
                    DeviceModelError("device model quit (QMP quit)", domid=self.domid),
                    abort=False,
                )
            )
            return {}
        raise _QmpError("CommandNotFound", f"The command {cmd} has not been found")

    def _device_state(self) -> dict[str, Any]:
        return {
            "uart-rx": list(self._uart),
            "cmos-shutdown-status": self._cmos_shutdown,
            "seabios-post-done": self._post_done,
        }

    def _save_devices_state(self, filename: str) -> Any:
        was_running = self._state == "running"
        if was_running:  # vm_stop(RUN_STATE_SAVE_VM)
            self._disarm()
            self._set_state("save-vm")
            self._emit("STOP")
        try:
            blob = json.dumps(self._device_state()).encode()
            with open(filename, "wb") as f:
                f.write(b"QEVM" + struct.pack(">I", 3) + blob)
        except OSError as e:
            raise _QmpError(
                "GenericError", f"Unable to open {filename}: {os.strerror(e.errno or errno.EIO)}"
            ) from e
        finally:
            if was_running:
                self._set_state("running")
                self._arm()
                self._emit("RESUME")
        return {}

    def _load_devices_state(self, filename: str) -> Any:
        if self._state == "running":
            raise _QmpError("GenericError", "Cannot update device state while vm is running")
        try:
            raw = Path(filename).read_bytes()
        except OSError as e:
            raise _QmpError(
                "GenericError", f"Unable to open {filename}: {os.strerror(e.errno or errno.EIO)}"
            ) from e
        if self.flavour == "qemu-system-x86_64":
            # QEMU 7.2, pc machine: "Configuration section missing", then an assertion in
            # yank_unregister_instance() aborts the process before it replies.
            asyncio.get_running_loop().call_soon(
                self._terminate,
                DeviceModelError(
                    "device model aborted in xen-load-devices-state "
                    "(QEMU 7.2: yank_unregister_instance assertion)",
                    domid=self.domid,
                ),
            )
            return _NO_REPLY
        if raw[:4] != b"QEVM":
            raise _QmpError("GenericError", "An IO error has occurred")
        try:
            state = json.loads(raw[8:])
            self._uart = deque(int(b) for b in state["uart-rx"])
            self._cmos_shutdown = int(state["cmos-shutdown-status"])
            self._post_done = bool(state["seabios-post-done"])
        except (ValueError, KeyError, TypeError) as e:
            raise _QmpError("GenericError", "An IO error has occurred") from e
        return {}

    _XP = re.compile(r"^xp\s+/(\d*)([bhwgx]*)\s+(0x[0-9a-fA-F]+|\d+)\s*$")

    def _hmp(self, line: str) -> str:
        m = self._XP.match(line.strip())
        if m is None:
            name = line.strip().split(" ", 1)[0]
            return f"unknown command: '{name}'\r\n"
        count = int(m.group(1) or "1")
        letters = m.group(2)
        size = next((n for c, n in (("b", 1), ("h", 2), ("w", 4), ("g", 8)) if c in letters), 4)
        addr = int(m.group(3), 0)
        per_line = 8 if size == 1 else 16  # QEMU monitor/hmp-cmds.c memory_dump()
        try:
            data = self.read_memory(addr, count * size)
        except DeviceModelError:
            return "Cannot access memory\r\n"
        out = []
        for off in range(0, len(data), per_line):
            chunk = data[off : off + per_line]
            words = [
                f"0x{int.from_bytes(chunk[i : i + size], 'little'):0{size * 2}x}"
                for i in range(0, len(chunk), size)
            ]
            out.append(f"{addr + off:016x}: " + " ".join(words) + "\r\n")
        return "".join(out)


_NO_REPLY: Any = object()


class _SavedVm:
    """This model's saved VM state: writing it, and reading it back with every check."""

    def __init__(
        self,
        pages: list[tuple[int, bytes]],
        run_state: str,
        cpu: str,
        devices: dict[str, Any],
    ) -> None:
        self.pages = pages
        self.run_state = run_state
        self.cpu = cpu
        self.devices = devices

    @staticmethod
    def write(
        f: Any, ram: mmap.mmap, run_state: str, cpu_at_reset: bool, devices: dict[str, Any]
    ) -> None:
        body = bytearray()
        count = 0
        for number in range(len(ram) // _PAGE):
            page = ram[number * _PAGE : (number + 1) * _PAGE]
            if page != _ZERO_PAGE:
                body += struct.pack(">I", number) + page
                count += 1
        header = json.dumps(
            {
                "ram_bytes": len(ram),
                "page_size": _PAGE,
                "pages": count,
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "run_state": run_state,
                "cpu": "reset-vector" if cpu_at_reset else "program",
                "devices": devices,
            }
        ).encode()
        f.write(INPROC_VM_MAGIC + struct.pack(">II", VM_STATE_VERSION, len(header)))
        f.write(header)
        f.write(body)

    @classmethod
    def load(cls, path: Path, *, domid: int | None) -> _SavedVm:
        def bad(why: str) -> DeviceModelError:
            return DeviceModelError(f"saved VM state {path}: {why}", domid=domid)

        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DeviceModelError(
                f"saved VM state {path}: {e.strerror}", domid=domid, cause=e
            ) from e
        if raw.startswith(QEMU_VM_FILE_MAGIC):
            raise bad(
                "a QEMU migration stream (QEVM), written by a QEMU device model: "
                "the in-process device model cannot load it"
            )
        if not raw.startswith(INPROC_VM_MAGIC):
            raise bad(f"not a saved VM state (no {INPROC_VM_MAGIC.decode()} magic)")
        fixed = len(INPROC_VM_MAGIC) + 8
        if len(raw) < fixed:
            raise bad(f"truncated ({len(raw)} bytes)")
        version, hlen = struct.unpack_from(">II", raw, len(INPROC_VM_MAGIC))
        if version != VM_STATE_VERSION:
            raise bad(f"format version {version}; this model reads {VM_STATE_VERSION}")
        if len(raw) < fixed + hlen:
            raise bad(f"truncated in its header ({len(raw)} bytes)")
        try:
            head = json.loads(raw[fixed : fixed + hlen])
            pages = int(head["pages"])
            digest = str(head["body_sha256"])
            ram_bytes, page_size = int(head["ram_bytes"]), int(head["page_size"])
            run_state, cpu = str(head["run_state"]), str(head["cpu"])
            raw_devices = head["devices"]
            devices = {
                "uart-rx": [int(b) & 0xFF for b in raw_devices["uart-rx"]],
                "cmos-shutdown-status": int(raw_devices["cmos-shutdown-status"]) & 0xFF,
                "seabios-post-done": bool(raw_devices["seabios-post-done"]),
            }
            if cpu not in ("program", "reset-vector"):
                raise ValueError(f"cpu {cpu!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise bad(f"corrupt header ({type(e).__name__}: {e})") from e
        if (ram_bytes, page_size) != (RAM_BYTES, _PAGE):
            raise bad(
                f"RAM of {ram_bytes} bytes in {page_size}-byte pages; this model has "
                f"{RAM_BYTES} in {_PAGE}"
            )
        body = memoryview(raw)[fixed + hlen :]
        if len(body) != pages * (4 + _PAGE):
            raise bad(
                f"truncated or padded: {len(body)} bytes of pages, {pages * (4 + _PAGE)} expected"
            )
        if hashlib.sha256(body).hexdigest() != digest:
            raise bad("corrupt: the pages' checksum does not match")
        out = []
        for i in range(pages):
            at = i * (4 + _PAGE)
            (number,) = struct.unpack_from(">I", body, at)
            if number >= RAM_BYTES // _PAGE:
                raise bad(f"page {number} is outside RAM")
            out.append((number, bytes(body[at + 4 : at + 4 + _PAGE])))
        return cls(out, run_state, cpu, devices)

"""The in-process HVM device model: QEMU's observable behaviour without QEMU.

Where ``qemu-system-x86_64`` is not installed, :class:`FakeDeviceModel` stands
in for :class:`torpor_sim.qemu.QemuDeviceModel`.  It serves real QMP on a real
Unix socket (asyncio, on the caller's event loop) and runs a simulated guest
that does what the boot sector of :mod:`torpor_sim.hvm_image` does, on the
same guest-physical memory layout: "SeaBIOS" writes ACPI tables, the guest
walks them, sets the FACS waking vector, ticks at
:data:`~torpor_sim.hvm_image.TICK_HZ` writing its ring and its filesystem
(unless frozen), and polls its COM1 for the one-byte commands
(:mod:`torpor_sim.fake_machine`).  What it shares with the QEMU model is in
:mod:`torpor_sim.devicemodel`, QMP's framing and negotiation in
:mod:`torpor_sim.qmp_server`; this module is the machine's behaviour as QMP
shows it.

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

The saved VM state is this model's own format (:class:`~torpor_sim.fake_machine.SavedVm`);
a QEMU migration stream (``QEVM``) is refused with a clear error, as QEMU
refuses this format.

Not modelled: out-of-band execution, QEMU's exact wording of JSON syntax
errors, and every command not listed by ``query-commands`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import mmap
import os
import re
import struct
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from torpor.errors import DeviceModelError
from torpor.qmp import QmpEvent
from torpor_sim import hvm_image as img
from torpor_sim.devicemodel import (
    CONTINUABLE,
    QEMU_VM_FILE_MAGIC,
    RAM_BYTES,
    DeviceModelBase,
    Kind,
)
from torpor_sim.fake_machine import (
    CMOS_S3_RESUME,
    FACS_ADDR,
    PAGE,
    PM_BASE,
    Firmware,
    GuestProgram,
    SavedVm,
)
from torpor_sim.qmp_server import NO_REPLY, QmpErrorReply, QmpServer

__all__ = ["FakeDeviceModel", "Flavour"]

Flavour = Literal["qemu-system-x86_64", "qemu-xen"]

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


class FakeDeviceModel(DeviceModelBase):
    """An in-process device model with QEMU 7.2's observable QMP behaviour.

    Same constructor arguments as :class:`~torpor_sim.qemu.QemuDeviceModel`
    (``incoming``: a VM state saved by this model's :meth:`save_vm_state`),
    plus ``flavour``: which QEMU to mirror where they differ
    (``xen-load-devices-state``, see the module docstring).
    """

    kind: Kind = "in-process"
    what = "in-process device model"

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
        super().__init__(
            domid=domid, run_dir=run_dir, qmp_path=qmp_path, reboot=reboot, incoming=incoming
        )
        self.flavour = flavour
        #: xen-set-global-dirty-log: QEMU's log-dirty mode (a live migration's)
        self.global_dirty_log = False
        self._guest = GuestProgram(self)
        self._uart: deque[int] = deque()
        self._qmp = QmpServer(self._qmp_path, self._command, schema=_SCHEMA, version=_QEMU_VERSION)
        self._timer: asyncio.TimerHandle | None = None
        self._cmos_shutdown = 0
        self._post_done = False
        self._cpu_at_reset = False  # a wake-up's reset happened while the VM was stopped
        self._exited = False
        self._seq = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def alive(self) -> bool:
        return self._started and not self._exited

    async def _launch(self, timeout: float) -> None:
        saved = None if self.incoming is None else SavedVm.load(self.incoming, domid=self.domid)
        self._mem = mmap.mmap(-1, RAM_BYTES)
        await self._qmp.start()
        if saved is not None:
            self._restore(saved)
            return
        self._set_state("running")
        asyncio.get_running_loop().call_soon(self._firmware_entry)

    async def _shut_down(self) -> None:
        self._terminate(DeviceModelError("in-process device model was stopped", domid=self.domid))
        await self._qmp.wait_closed()

    def _terminate(self, why: DeviceModelError, *, abort: bool = True) -> None:
        """The process is gone: sockets close, the guest stops, waiters fail."""
        if self._exited:
            return
        self._exited = True
        self._disarm()
        self._qmp.close(abort=abort)
        self._died(why)

    # ------------------------------------------------------------------ save / restore

    async def _save(self, target: Path, part: Path, *, timeout: float) -> None:
        """This model's format (:class:`~torpor_sim.fake_machine.SavedVm`), with QEMU
        7.2's events and run states.  Synchronous here, so ``timeout`` is never
        reached."""
        if self._state == "running":
            self._vm_stop()
        self._emit("MIGRATION", {"status": "setup"})
        self._emit("MIGRATION_PASS", {"pass": 1})
        self._emit("MIGRATION", {"status": "active"})
        if self._state == "suspended":
            # migration_completion(): qemu_system_wakeup_request(), then the VM stops; the
            # main loop's wake-up resets the machine (the vCPU to the reset vector).
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
        try:
            with open(part, "wb") as f:
                SavedVm.write(f, self._ram(), global_state, self._cpu_at_reset, self._devices())
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

    def _set_devices(self, devices: Mapping[str, Any]) -> None:
        self._uart = deque(int(b) for b in devices["uart-rx"])
        self._cmos_shutdown = int(devices["cmos-shutdown-status"])
        self._post_done = bool(devices["seabios-post-done"])

    def _restore(self, saved: SavedVm) -> None:
        """Become the saved VM, stopped: QEMU after ``-S -incoming``."""
        ram = self._ram()
        for number, page in saved.pages:
            ram[number * PAGE : (number + 1) * PAGE] = page
        self._set_devices(saved.devices)
        self._cpu_at_reset = saved.cpu == "reset-vector"
        self._emit("MIGRATION", {"status": "setup"})
        self._emit("MIGRATION", {"status": "active"})
        # process_incoming_migration_bh(): "running" obeys -S; any other state is taken.
        self._set_state("paused" if saved.run_state == "running" else saved.run_state)
        self._emit("MIGRATION", {"status": "completed"})

    # ------------------------------------------------------------------ the guest's view

    def guest_print(self, line: str) -> None:
        """COM1 output from the guest."""
        self._feed_serial(line.encode() + b"\r\n")

    def uart_take(self) -> int | None:
        """The guest polls COM1's LSR.DR and reads one byte."""
        return self._uart.popleft() if self._uart else None

    async def _send_serial(self, command: bytes) -> None:
        self._uart.extend(command)

    async def _stop_vcpus(self) -> None:
        self._vm_stop()

    async def _run_vcpus(self) -> None:
        self._continue()

    # ------------------------------------------------------------------ the machine

    def _vm_stop(self) -> None:
        """QEMU's vm_stop() of a running VM: the vCPU stops, ``STOP``."""
        self._disarm()
        self._emit("STOP")

    def _continue(self) -> None:
        """QEMU's vm_start(): ``RESUME``, then the vCPU runs on from where it is."""
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
        """Send a QMP event; the run state follows from it (:meth:`_note_event`)."""
        now = self._qmp.emit(name, data)
        self._seq += 1
        self._note_event(QmpEvent(name, data or {}, now, self._seq - 1))

    def _firmware_entry(self) -> None:
        """The vCPU at the reset vector: SeaBIOS POST, or its resume path."""
        if self._exited:
            return
        if not self._post_done:
            self._post_done = True
            Firmware.install_tables(self._ram())
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
            self._emit("SUSPEND")

    # ------------------------------------------------------------------ QMP commands

    def _command(self, cmd: str, args: dict[str, Any]) -> Any:
        state = self._state
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
                self._vm_stop()
            return {}
        if cmd == "cont":
            if state in ("shutdown", "internal-error"):
                raise QmpErrorReply("GenericError", "Resetting the Virtual Machine is required")
            if state in CONTINUABLE:
                self._continue()
            return {}
        if cmd == "system_wakeup":
            if state != "suspended":
                raise QmpErrorReply(
                    "GenericError", "Unable to wake up: guest is not in suspended state"
                )
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
                raise QmpErrorReply(
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
        raise QmpErrorReply("CommandNotFound", f"The command {cmd} has not been found")

    def _save_devices_state(self, filename: str) -> Any:
        was_running = self._state == "running"
        if was_running:  # vm_stop(RUN_STATE_SAVE_VM), then vm_start()
            self._vm_stop()
        try:
            blob = json.dumps(self._devices()).encode()
            with open(filename, "wb") as f:
                f.write(QEMU_VM_FILE_MAGIC + struct.pack(">I", 3) + blob)
        except OSError as e:
            raise QmpErrorReply(
                "GenericError", f"Unable to open {filename}: {os.strerror(e.errno or errno.EIO)}"
            ) from e
        finally:
            if was_running:
                self._continue()
        return {}

    def _load_devices_state(self, filename: str) -> Any:
        if self._state == "running":
            raise QmpErrorReply("GenericError", "Cannot update device state while vm is running")
        try:
            raw = Path(filename).read_bytes()
        except OSError as e:
            raise QmpErrorReply(
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
            return NO_REPLY
        if not raw.startswith(QEMU_VM_FILE_MAGIC):
            raise QmpErrorReply("GenericError", "An IO error has occurred")
        try:
            self._set_devices(json.loads(raw[8:]))
        except (ValueError, KeyError, TypeError) as e:
            raise QmpErrorReply("GenericError", "An IO error has occurred") from e
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

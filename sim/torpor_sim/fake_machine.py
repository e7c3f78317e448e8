"""The machine inside the in-process device model (:mod:`torpor_sim.fake_qemu`).

What real QEMU runs, imitated on the same guest-physical memory layout:

* :class:`Firmware`: the part of SeaBIOS the guest can see, the ACPI tables
  (RSDP, RSDT, FADT with PM1a_CNT_BLK 0x604, FACS at 0xFE0000) where SeaBIOS
  1.16 on QEMU 7.2 leaves them for a 16 MiB ``pc`` guest;
* :class:`GuestProgram`: the boot sector of :mod:`torpor_sim.hvm_image`, step
  for step: it walks the tables, sets the FACS waking vector, ticks writing
  its ring and its filesystem (unless frozen), and takes the one-byte
  commands from COM1, on a :class:`Machine` (the model);
* :class:`SavedVm`: the model's saved VM state (QEMU saves a migration
  stream instead; :func:`torpor_sim.devicemodel.saved_vm_state_kind` tells
  the two apart).  The format (version 1, big-endian)::

      8 bytes   magic "TORPORVM"
      u32       version (1)
      u32       header length H
      H bytes   header, JSON: ram_bytes, page_size, pages, body_sha256,
                run_state (QEMU's "global state"), cpu ("program" or
                "reset-vector"), devices (uart-rx, cmos-shutdown-status,
                seabios-post-done)
      body      `pages` records: u32 page number, then the page (zero pages
                are left out, as QEMU leaves out zero pages' contents)
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path
from typing import Any, Protocol

from torpor.errors import DeviceModelError
from torpor_sim import hvm_image as img
from torpor_sim.devicemodel import INPROC_VM_MAGIC, RAM_BYTES

__all__ = [
    "CMOS_S3_RESUME",
    "FACS_ADDR",
    "PAGE",
    "PM_BASE",
    "Firmware",
    "GuestProgram",
    "Machine",
    "SavedVm",
]

# Where SeaBIOS 1.16 on QEMU 7.2 put the tables of a 16 MiB pc guest (seen here).
RSDP_ADDR = 0x000F52C0
FACS_ADDR = 0x00FE0000
FADT_ADDR = 0x00FE0040
RSDT_ADDR = 0x00FE0100
PM_BASE = 0x600  # PIIX4 PM I/O base QEMU's SeaBIOS programs; PM1a_CNT = base + 4
CMOS_S3_RESUME = 0xFE  # CMOS shutdown status QEMU sets on S3 (hw/rtc/mc146818rtc.c)

#: The saved VM state format's version, and its page size.
VM_STATE_VERSION = 1
PAGE = 4096
_ZERO_PAGE = bytes(PAGE)


def _acpi_checksum(table: bytearray, at: int) -> None:
    table[at] = (-sum(table)) & 0xFF


def _acpi_header(sig: bytes, length: int, revision: int) -> bytearray:
    hdr = bytearray(length)
    struct.pack_into(
        "<4sIBB6s8sI4sI", hdr, 0, sig, length, revision, 0, b"BOCHS ", b"BXPC    ", 1, b"BXPC", 1
    )
    return hdr


class Firmware:
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


class GuestProgram:
    """The boot sector's program, step for step, on the model's RAM."""

    def __init__(self, dm: Machine) -> None:
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


class Machine(Protocol):
    """What the guest program touches of the machine it runs on."""

    def read_memory(self, addr: int, length: int) -> bytes: ...

    def write_memory(self, addr: int, data: bytes) -> None: ...

    def guest_print(self, line: str) -> None:
        """A line on COM1."""

    def uart_take(self) -> int | None:
        """Poll COM1's LSR.DR and read one byte."""

    def triple_fault(self) -> None:
        """The vCPU triple-faults."""

    def pm1_cnt_write(self, port: int, value: int) -> None:
        """An ``out`` to the PM1a control register."""


class SavedVm:
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
        for number in range(len(ram) // PAGE):
            page = ram[number * PAGE : (number + 1) * PAGE]
            if page != _ZERO_PAGE:
                body += struct.pack(">I", number) + page
                count += 1
        header = json.dumps(
            {
                "ram_bytes": len(ram),
                "page_size": PAGE,
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
    def load(cls, path: Path, *, domid: int | None) -> SavedVm:
        def bad(why: str) -> DeviceModelError:
            return DeviceModelError(f"saved VM state {path}: {why}", domid=domid)

        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DeviceModelError(
                f"saved VM state {path}: {e.strerror}", domid=domid, cause=e
            ) from e
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
        if (ram_bytes, page_size) != (RAM_BYTES, PAGE):
            raise bad(
                f"RAM of {ram_bytes} bytes in {page_size}-byte pages; this model has "
                f"{RAM_BYTES} in {PAGE}"
            )
        body = memoryview(raw)[fixed + hlen :]
        if len(body) != pages * (4 + PAGE):
            raise bad(
                f"truncated or padded: {len(body)} bytes of pages, {pages * (4 + PAGE)} expected"
            )
        if hashlib.sha256(body).hexdigest() != digest:
            raise bad("corrupt: the pages' checksum does not match")
        out = []
        for i in range(pages):
            at = i * (4 + PAGE)
            (number,) = struct.unpack_from(">I", body, at)
            if number >= RAM_BYTES // PAGE:
                raise bad(f"page {number} is outside RAM")
            out.append((number, bytes(body[at + 4 : at + 4 + PAGE])))
        return cls(out, run_state, cpu, devices)

"""The simulated host's HVM guest: a 512-byte boot sector, assembled here.

Under a real ``qemu-system-x86_64 -machine pc`` (i440fx + PIIX4 ACPI, SeaBIOS)
this boot sector is the whole guest "OS".  It is produced by the small
assembler below from hand-encoded 16-bit x86 instructions, each one commented;
nothing external (nasm, as) runs, nothing is downloaded.  What it does:

* **ACPI.**  It finds the RSDP (``"RSD PTR "`` on a 16-byte boundary in
  0xE0000-0xFFFFF, ACPI 6.5 s5.2.5.1), follows ``RsdtAddress`` to the RSDT and
  its entries to the FADT (``"FACP"``), and reads ``FIRMWARE_CTRL`` (FADT
  offset 36: the FACS) and ``PM1a_CNT_BLK`` (offset 64; 0x604 on QEMU's PIIX4,
  but read, never assumed).  It sets the FACS ``Firmware_Waking_Vector``
  (offset 12) to :data:`RESUME_VECTOR`: SeaBIOS's ``s3_resume()`` (src/resume.c)
  far-calls that address in real mode when QEMU wakes the guest from S3; with
  no vector it calls ``tryReboot()`` instead (a ``RESET``).  SeaBIOS puts the
  tables at the top of RAM, so the guest reads them in "unreal mode" (FS
  loaded with a flat 4 GiB descriptor, then back to real mode).
* **Work that proves it never rebooted.**  A state block at :data:`STATE_ADDR`
  holds a tick counter, a boot count and a resume count (layout below).  Its
  own IRQ0 handler (the PIT reprogrammed to :data:`TICK_HZ`) bumps the tick
  counter and writes the new value into a ring of 256 dwords at
  :data:`REGION_ADDR` (``ring[t % 256] = t``), so the ring's content is a pure
  function of the tick count: :func:`expected_region` lets the host check it.
  Between ticks the vCPU sits in ``sti; hlt``: TCG idles, no host core spins.
* **A filesystem writer.**  Each tick the guest also writes to its one
  filesystem (``fs_writes`` += 1) -- unless the filesystem is frozen
  (``fs_frozen``, set and cleared by the guest agent's
  ``guest-fsfreeze-freeze`` / ``-thaw``, as Linux's ``FIFREEZE`` / ``FITHAW``
  set a superblock's freeze level).  A writer to a frozen filesystem blocks
  in ``sb_start_write()`` until the thaw; here it counts the ticks it spent
  blocked (``fs_blocked``) and writes nothing.  A boot (not an S3 resume)
  clears ``fs_frozen``: a new kernel mounts its filesystems thawed.
  On S3 resume QEMU has reset every device (``qemu_system_wakeup()`` ->
  ``qemu_system_reset()``, softmmu/runstate.c) and SeaBIOS's ``pic_setup()``
  masked every IRQ, so the resume path reprograms the PIT and unmasks IRQ0;
  RAM (and so every counter) is kept.
* **Commands on COM1.**  After each tick the guest polls the 16550's LSR and
  takes one byte: :data:`CMD_S3` ``'S'`` writes ``SLP_TYP=1 | SLP_EN`` to
  PM1a_CNT (QEMU's ``\\_S3`` is 1: hw/i386/acpi-build.c; ``acpi_pm1_cnt_write``
  in hw/acpi/core.c then suspends), :data:`CMD_POWEROFF` ``'O'`` writes
  ``SLP_TYP=0 | SLP_EN`` (``\\_S5``: soft power off), :data:`CMD_CRASH` ``'X'``
  loads a zero-limit IVT and executes ``int3``: the vector is out of limit, so
  #GP, #DF and a triple fault, which QEMU turns into a guest reset
  (``SHUTDOWN_CAUSE_GUEST_RESET``; with ``-no-reboot`` a ``SHUTDOWN`` event).
* **Status lines on COM1**: ``torpor-hvm boot``, ``torpor-hvm resume``
  (each printed once the waking vector is set and IRQ0 ticks, so a host that
  sees it may send commands), ``torpor-hvm s3``, ``torpor-hvm poweroff``,
  ``torpor-hvm crash``, ``torpor-hvm no-acpi``.

A reboot keeps RAM (QEMU's reset does not clear it, and SeaBIOS's POST clears
only 0x7000-0x90000: ``startBoot()`` in src/post.c), so the boot count of a
guest that was reset goes to 2: the host can tell a resumed guest from a
rebooted one.

Guest-physical memory layout (all little-endian)::

    0x1000  u32  magic  "TORP" (0x50524f54); absent on fresh RAM
    0x1004  u32  ticks      IRQ0 ticks since first boot (TICK_HZ per second)
    0x1008  u32  boots      times the boot sector started in this RAM
    0x100c  u32  resumes    times SeaBIOS jumped to the waking vector
    0x1010  u32  pm1a_cnt   PM1a_CNT_BLK port read from the FADT (0: no ACPI)
    0x1014  u32  facs       FACS address read from the FADT
    0x1018  u32  s3_entries times the guest wrote SLP_EN for S3
    0x101c  u8   last_cmd   the last byte taken from COM1
    0x101d  u8   fs_frozen  1 while the guest's filesystem is frozen (0 or 1 only)
    0x1020  u32  fs_writes  ticks whose write reached the filesystem
    0x1024  u32  fs_blocked ticks the writer spent blocked on the frozen filesystem
    0x1400  256 x u32 ring  ring[t % 256] = t for every tick t

The S3 resume stack SeaBIOS uses (``BUILD_S3RESUME_STACK_ADDR`` = 0x1000,
src/config.h) grows down, below this block.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import attrs

__all__ = [
    "BOOTS_ADDR",
    "CMD_CRASH",
    "CMD_POWEROFF",
    "CMD_S3",
    "FACS_PTR_ADDR",
    "FS_BLOCKED_ADDR",
    "FS_FROZEN_ADDR",
    "FS_WRITES_ADDR",
    "LAST_CMD_ADDR",
    "LINE_BOOT",
    "LINE_CRASH",
    "LINE_NO_ACPI",
    "LINE_POWEROFF",
    "LINE_RESUME",
    "LINE_S3",
    "LOAD_ADDR",
    "MAGIC",
    "PM1A_CNT_ADDR",
    "REGION_ADDR",
    "REGION_SIZE",
    "RESUMES_ADDR",
    "RESUME_VECTOR",
    "S3_ENTRIES_ADDR",
    "STATE_ADDR",
    "STATE_SIZE",
    "TICKS_ADDR",
    "TICK_HZ",
    "GuestCounters",
    "boot_sector",
    "expected_region",
    "listing",
    "read_counters",
    "region_checksum",
    "region_matches",
    "write_image",
]

#: Where SeaBIOS's int 19h loads and enters a boot sector (0000:7C00).
LOAD_ADDR = 0x7C00
#: The guest's state block (see the module docstring for the layout).
STATE_ADDR = 0x1000
STATE_SIZE = 0x28
MAGIC = 0x50524F54  # b"TORP" little-endian
TICKS_ADDR = STATE_ADDR + 0x04
BOOTS_ADDR = STATE_ADDR + 0x08
RESUMES_ADDR = STATE_ADDR + 0x0C
PM1A_CNT_ADDR = STATE_ADDR + 0x10
FACS_PTR_ADDR = STATE_ADDR + 0x14
S3_ENTRIES_ADDR = STATE_ADDR + 0x18
LAST_CMD_ADDR = STATE_ADDR + 0x1C
#: The filesystem's freeze flag (0 or 1: the writer indexes by it) and the
#: writer's two counters, adjacent: ``[FS_WRITES_ADDR + 4 * fs_frozen] += 1``.
FS_FROZEN_ADDR = STATE_ADDR + 0x1D
FS_WRITES_ADDR = STATE_ADDR + 0x20
FS_BLOCKED_ADDR = STATE_ADDR + 0x24
#: The ring the IRQ0 handler writes: 256 dwords, ``ring[t % 256] = t``.
REGION_ADDR = 0x1400
REGION_SIZE = 256 * 4

#: PIT input clock (QEMU hw/timer/i8254.c ``PIT_FREQ``) and the tick rate.
PIT_HZ = 1_193_182
TICK_HZ = 100
PIT_DIVISOR = round(PIT_HZ / TICK_HZ)  # 11932 = 0x2E9C

#: One-byte commands the guest polls for on COM1.
CMD_S3 = b"S"
CMD_POWEROFF = b"O"
CMD_CRASH = b"X"

#: Status lines the guest prints on COM1 (CR LF stripped).
_PREFIX = "torpor-hvm "
LINE_BOOT = _PREFIX + "boot"
LINE_RESUME = _PREFIX + "resume"
LINE_S3 = _PREFIX + "s3"
LINE_POWEROFF = _PREFIX + "poweroff"
LINE_CRASH = _PREFIX + "crash"
LINE_NO_ACPI = _PREFIX + "no-acpi"

# PM1_CNT bits (ACPI 6.5 s4.8.3.2.1): SLP_TYP is bits 10-12, SLP_EN bit 13.
_SLP_EN = 1 << 13
_SLP_TYP_S3 = 1 << 10  # QEMU's \_S3 package: SLP_TYP 1 (hw/i386/acpi-build.c)
_SLP_TYP_S5 = 0 << 10  # QEMU's \_S5 package: SLP_TYP 0


# --------------------------------------------------------------------------
# The assembler: each instruction is hand-encoded; only label arithmetic is
# left to the assembler (rel8/rel16 displacements and absolute addresses).
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    label: str
    kind: str  # "rel8" | "rel16" | "abs16" | "abs32"

    @property
    def size(self) -> int:
        return {"rel8": 1, "rel16": 2, "abs16": 2, "abs32": 4}[self.kind]


def _rel8(label: str) -> _Ref:
    return _Ref(label, "rel8")


def _rel16(label: str) -> _Ref:
    return _Ref(label, "rel16")


def _abs16(label: str) -> _Ref:
    return _Ref(label, "abs16")


def _abs32(label: str) -> _Ref:
    return _Ref(label, "abs32")


def _w(value: int) -> bytes:
    return struct.pack("<H", value)


def _d(value: int) -> bytes:
    return struct.pack("<I", value)


_Part = int | bytes | _Ref


@dataclass
class _Line:
    addr: int
    code: bytearray
    text: str
    comment: str
    refs: list[tuple[int, _Ref]] = field(default_factory=list)


class _Asm:
    """A one-pass assembler for hand-encoded 16-bit code with label fixups."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.pc = origin
        self.lines: list[_Line | str] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = self.pc
        self.lines.append(name)

    def ins(self, text: str, *parts: _Part, c: str = "") -> None:
        line = _Line(self.pc, bytearray(), text, c)
        for part in parts:
            if isinstance(part, _Ref):
                line.refs.append((len(line.code), part))
                line.code += bytes(part.size)
            elif isinstance(part, int):
                line.code.append(part)
            else:
                line.code += part
        self.pc += len(line.code)
        self.lines.append(line)

    def data(self, text: str, blob: bytes, c: str = "") -> None:
        self.ins(text, blob, c=c)

    def align(self, n: int) -> None:
        pad = (-self.pc) % n
        if pad:
            self.data(f"align {n}", bytes(pad))

    def assemble(self) -> bytes:
        out = bytearray()
        for line in self.lines:
            if isinstance(line, str):
                continue
            for off, ref in line.refs:
                target = self.labels[ref.label]
                end = line.addr + len(line.code)  # x86 displacements count from the next insn
                if ref.kind == "rel8":
                    disp = target - end
                    if not -128 <= disp <= 127:
                        raise ValueError(f"rel8 to {ref.label} out of range ({disp})")
                    line.code[off : off + 1] = struct.pack("<b", disp)
                elif ref.kind == "rel16":
                    line.code[off : off + 2] = struct.pack("<h", target - end)
                elif ref.kind == "abs16":
                    line.code[off : off + 2] = _w(target)
                else:
                    line.code[off : off + 4] = _d(target)
            out += line.code
        return bytes(out)

    def render(self) -> str:
        rows = []
        for line in self.lines:
            if isinstance(line, str):
                rows.append(f"{line}:")
                continue
            hexed = line.code.hex(" ")
            if len(hexed) > 29:
                hexed = hexed[:26] + "..."
            note = f"  ; {line.comment}" if line.comment else ""
            rows.append(f"  {line.addr:04x}  {hexed:<29} {line.text}{note}")
        return "\n".join(rows)


def _program() -> _Asm:
    """The guest, instruction by instruction (16-bit real mode, org 0x7C00)."""
    a = _Asm(LOAD_ADDR)
    st, ticks, boots, resumes = STATE_ADDR, TICKS_ADDR, BOOTS_ADDR, RESUMES_ADDR

    # ---- cold boot: SeaBIOS's int 19h jumps to 0000:7C00 (src/boot.c, call_boot_entry)
    a.label("start")
    a.ins("xor bp, bp", 0x31, 0xED, c="BP = 0: this is a boot, not a resume")
    a.ins("jmp short setup", 0xEB, _rel8("setup"))

    # ---- S3 resume: SeaBIOS s3_resume() far-calls FLATPTR_TO_SEGOFF(vector), so CS:IP is
    #      07C0:0004 here; the far jump below makes CS 0 so every label works unchanged.
    a.label("resume_entry")
    a.ins("mov bp, 1", 0xBD, _w(1), c="BP = 1: we came back from S3")
    a.label("setup")
    a.ins("jmp 0000:real_start", 0xEA, _abs16("real_start"), _w(0), c="normalise CS to 0")
    a.label("real_start")
    a.ins("cli", 0xFA, c="no IRQ0 until the handler and the PIT are ours")
    a.ins("xor ax, ax", 0x31, 0xC0)
    a.ins("mov ds, ax", 0x8E, 0xD8, c="DS = ES = SS = 0: flat addressing of the low 64 KiB")
    a.ins("mov es, ax", 0x8E, 0xC0)
    a.ins("mov ss, ax", 0x8E, 0xD0)
    a.ins("mov sp, 0x7c00", 0xBC, _w(LOAD_ADDR), c="stack grows down below the boot sector")
    a.ins("cld", 0xFC, c="string ops go up")
    a.ins("test bp, bp", 0x85, 0xED)
    a.ins("jnz near resumed", 0x0F, 0x85, _rel16("resumed"))

    # ---- first boot in this RAM? A reset keeps RAM, so a known magic means a reboot.
    a.ins("cmp dword [STATE], MAGIC", 0x66, 0x81, 0x3E, _w(st), _d(MAGIC))
    a.ins("je known", 0x74, _rel8("known"), c="magic present: RAM survived a reboot")
    a.ins("mov di, STATE", 0xBF, _w(st), c="fresh RAM: clear state block and ring")
    a.ins("mov cx, 0x400", 0xB9, _w(0x400), c="0x800 bytes = 0x1000..0x17ff")
    a.ins("rep stosw", 0xF3, 0xAB, c="AX is 0")
    a.ins("mov dword [STATE], MAGIC", 0x66, 0xC7, 0x06, _w(st), _d(MAGIC))
    a.label("known")
    a.ins("mov [FS_FROZEN], al", 0xA2, _w(FS_FROZEN_ADDR), c="AL is 0: a boot mounts thawed")
    a.ins("inc dword [BOOTS]", 0x66, 0xFF, 0x06, _w(boots), c="boots += 1")

    # ---- unreal mode: FS gets a flat 4 GiB limit so [fs:esi] reaches the ACPI tables
    a.ins("lgdt [gdt]", 0x0F, 0x01, 0x16, _abs16("gdt"), c="GDTR lives in the null descriptor")
    a.ins("mov eax, cr0", 0x0F, 0x20, 0xC0)
    a.ins("or al, 1", 0x0C, 0x01, c="CR0.PE")
    a.ins("mov cr0, eax", 0x0F, 0x22, 0xC0, c="protected mode (CS keeps its real-mode cache)")
    a.ins("mov bx, 8", 0xBB, _w(8), c="selector 8: flat data, limit 4 GiB")
    a.ins("mov fs, bx", 0x8E, 0xE3, c="FS descriptor cache: base 0, limit 4 GiB")
    a.ins("and al, 0xfe", 0x24, 0xFE)
    a.ins("mov cr0, eax", 0x0F, 0x22, 0xC0, c="back to real mode; FS keeps its 4 GiB limit")

    # ---- RSDP: "RSD PTR " on a 16-byte boundary in 0xE0000..0xFFFFF (ACPI 6.5 s5.2.5.1)
    a.ins("mov esi, 0xe0000", 0x66, 0xBE, _d(0xE0000))
    a.label("scan")
    a.ins('cmp dword [fs:esi], "RSD "', 0x66, 0x64, 0x67, 0x81, 0x3E, b"RSD ")
    a.ins("jne scan_next", 0x75, _rel8("scan_next"))
    a.ins('cmp dword [fs:esi+4], "PTR "', 0x66, 0x64, 0x67, 0x81, 0x7E, 0x04, b"PTR ")
    a.ins("je rsdp", 0x74, _rel8("rsdp"))
    a.label("scan_next")
    a.ins("add esi, 16", 0x66, 0x83, 0xC6, 0x10)
    a.ins("bt esi, 20", 0x66, 0x0F, 0xBA, 0xE6, 0x14, c="CF: ESI reached 0x100000")
    a.ins("jae scan", 0x73, _rel8("scan"), c="CF clear (jnc): still below 1 MiB")
    a.ins("jmp short no_acpi", 0xEB, _rel8("no_acpi"))
    a.label("rsdp")
    a.ins("mov esi, [fs:esi+16]", 0x66, 0x64, 0x67, 0x8B, 0x76, 0x10, c="RsdtAddress")
    a.ins("mov ecx, [fs:esi+4]", 0x66, 0x64, 0x67, 0x8B, 0x4E, 0x04, c="RSDT Length")
    a.ins("add ecx, esi", 0x66, 0x01, 0xF1, c="ECX = end of the RSDT")
    a.ins("add esi, 36", 0x66, 0x83, 0xC6, 0x24, c="entries follow the 36-byte header")
    a.label("rsdt_entry")
    a.ins("cmp esi, ecx", 0x66, 0x39, 0xCE)
    a.ins("jae no_acpi", 0x73, _rel8("no_acpi"), c="no FADT listed")
    a.ins("mov ebx, [fs:esi]", 0x66, 0x64, 0x67, 0x8B, 0x1E, c="a table's address")
    a.ins('cmp dword [fs:ebx], "FACP"', 0x66, 0x64, 0x67, 0x81, 0x3B, b"FACP")
    a.ins("je fadt", 0x74, _rel8("fadt"))
    a.ins("add esi, 4", 0x66, 0x83, 0xC6, 0x04)
    a.ins("jmp short rsdt_entry", 0xEB, _rel8("rsdt_entry"))
    a.label("fadt")
    a.ins("mov eax, [fs:ebx+36]", 0x66, 0x64, 0x67, 0x8B, 0x43, 0x24, c="FIRMWARE_CTRL: FACS")
    a.ins("mov [FACS_PTR], eax", 0x66, 0xA3, _w(FACS_PTR_ADDR))
    a.ins("mov edx, [fs:ebx+64]", 0x66, 0x64, 0x67, 0x8B, 0x53, 0x40, c="PM1a_CNT_BLK")
    a.ins("mov [PM1A_CNT], edx", 0x66, 0x89, 0x16, _w(PM1A_CNT_ADDR))
    a.ins(
        "mov dword [fs:eax+12], resume_entry",
        *(0x66, 0x64, 0x67, 0xC7, 0x40, 0x0C),
        _abs32("resume_entry"),
        c="FACS Firmware_Waking_Vector",
    )
    a.ins("jmp short booted", 0xEB, _rel8("booted"))
    a.label("no_acpi")
    a.ins("mov si, msg_no_acpi", 0xBE, _abs16("msg_no_acpi"))
    a.ins("call say", 0xE8, _rel16("say"), c='"torpor-hvm no-acpi": S3 impossible')
    a.label("booted")
    a.ins("mov si, msg_boot", 0xBE, _abs16("msg_boot"), c='"boot" once the vector is set')
    a.ins("jmp short common", 0xEB, _rel8("common"))

    a.label("resumed")
    a.ins("inc dword [RESUMES]", 0x66, 0xFF, 0x06, _w(resumes), c="resumes += 1")
    a.ins("mov si, msg_resume", 0xBE, _abs16("msg_resume"))

    # ---- boot and resume alike: our IRQ0 handler, PIT at TICK_HZ, IRQ0 unmasked, then the
    #      status line (SI), so a host that sees "boot" or "resume" finds the guest ready
    a.label("common")
    a.ins(
        "mov dword [0x20], irq0",
        *(0x66, 0xC7, 0x06),
        _w(0x20),
        _abs32("irq0"),
        c="IVT 8 (SeaBIOS maps IRQ0 to 8): 0000:irq0",
    )
    a.ins("mov al, 0x34", 0xB0, 0x34, c="PIT ch0, lo/hi byte, mode 2 (rate generator)")
    a.ins("out 0x43, al", 0xE6, 0x43)
    a.ins(f"mov al, {PIT_DIVISOR & 0xFF:#04x}", 0xB0, PIT_DIVISOR & 0xFF, c="divisor low")
    a.ins("out 0x40, al", 0xE6, 0x40)
    a.ins(f"mov al, {PIT_DIVISOR >> 8:#04x}", 0xB0, PIT_DIVISOR >> 8, c=f"high: {TICK_HZ} Hz")
    a.ins("out 0x40, al", 0xE6, 0x40)
    a.ins("in al, 0x21", 0xE4, 0x21, c="master 8259 IMR")
    a.ins("and al, 0xfe", 0x24, 0xFE, c="unmask IRQ0 (SeaBIOS pic_setup masked it on resume)")
    a.ins("out 0x21, al", 0xE6, 0x21)
    a.ins("call say", 0xE8, _rel16("say"), c='"torpor-hvm boot" or "torpor-hvm resume"')
    a.ins("sti", 0xFB)

    # ---- idle loop: sleep until an interrupt, then poll COM1 for one command byte
    a.label("idle")
    a.ins("hlt", 0xF4, c="wait for the next tick: TCG idles the vCPU thread")
    a.ins("mov dx, 0x3fd", 0xBA, _w(0x3FD), c="COM1 LSR")
    a.ins("in al, dx", 0xEC)
    a.ins("test al, 1", 0xA8, 0x01, c="LSR.DR: a byte arrived")
    a.ins("jz idle", 0x74, _rel8("idle"))
    a.ins("mov dl, 0xf8", 0xB2, 0xF8, c="DX = 0x3f8, RBR")
    a.ins("in al, dx", 0xEC)
    a.ins("mov [LAST_CMD], al", 0xA2, _w(LAST_CMD_ADDR))
    a.ins("cmp al, 'S'", 0x3C, CMD_S3[0])
    a.ins("je do_s3", 0x74, _rel8("do_s3"))
    a.ins("cmp al, 'O'", 0x3C, CMD_POWEROFF[0])
    a.ins("je do_off", 0x74, _rel8("do_off"))
    a.ins("cmp al, 'X'", 0x3C, CMD_CRASH[0])
    a.ins("jne idle", 0x75, _rel8("idle"), c="anything else is ignored")

    a.label("do_crash")
    a.ins("mov si, msg_crash", 0xBE, _abs16("msg_crash"))
    a.ins("call say", 0xE8, _rel16("say"), c='"torpor-hvm crash"')
    a.ins("lidt [null_idtr]", 0x0F, 0x01, 0x1E, _abs16("null_idtr"), c="IVT limit 0")
    a.ins("int3", 0xCC, c="vector 3 beyond the limit: #GP, #DF, triple fault, reset")

    a.label("do_off")
    a.ins("mov si, msg_poweroff", 0xBE, _abs16("msg_poweroff"))
    a.ins("call say", 0xE8, _rel16("say"), c='"torpor-hvm poweroff"')
    a.ins("mov bx, SLP_EN|S5", 0xBB, _w(_SLP_EN | _SLP_TYP_S5), c="QEMU's \\_S5: SLP_TYP 0")
    a.ins("jmp short sleep", 0xEB, _rel8("sleep"))

    a.label("do_s3")
    a.ins("inc dword [S3_ENTRIES]", 0x66, 0xFF, 0x06, _w(S3_ENTRIES_ADDR))
    a.ins("mov si, msg_s3", 0xBE, _abs16("msg_s3"))
    a.ins("call say", 0xE8, _rel16("say"), c='"torpor-hvm s3"')
    a.ins("mov bx, SLP_EN|S3", 0xBB, _w(_SLP_EN | _SLP_TYP_S3), c="QEMU's \\_S3: SLP_TYP 1")
    a.label("sleep")
    a.ins("mov dx, [PM1A_CNT]", 0x8B, 0x16, _w(PM1A_CNT_ADDR), c="port from the FADT")
    a.ins("test dx, dx", 0x85, 0xD2)
    a.ins("jz idle", 0x74, _rel8("idle"), c="no FADT: cannot sleep")
    a.ins("cli", 0xFA, c="no tick between SLP_EN and the vCPU stop")
    a.ins("in ax, dx", 0xED, c="read-modify-write PM1a_CNT")
    a.ins("and ax, 0xc3ff", 0x25, _w(0xC3FF), c="clear SLP_TYP and SLP_EN")
    a.ins("or ax, bx", 0x09, 0xD8)
    a.ins("out dx, ax", 0xEF, c="QEMU acpi_pm1_cnt_write(): suspend or power off")
    a.ins("sti", 0xFB, c="S3 refused (disable_s3) or S5 pending: keep ticking")
    a.ins("jmp short idle", 0xEB, _rel8("idle"))

    # ---- IRQ0: ticks += 1; ring[ticks % 256] = ticks; the filesystem write; EOI
    a.label("irq0")
    a.ins("push eax", 0x66, 0x50)
    a.ins("push bx", 0x53)
    a.ins("push ds", 0x1E)
    a.ins("xor ax, ax", 0x31, 0xC0)
    a.ins("mov ds, ax", 0x8E, 0xD8, c="whatever DS was interrupted")
    a.ins("mov eax, [TICKS]", 0x66, 0xA1, _w(ticks))
    a.ins("inc eax", 0x66, 0x40)
    a.ins("movzx bx, al", 0x0F, 0xB6, 0xD8, c="ring slot = ticks % 256")
    a.ins("shl bx, 2", 0xC1, 0xE3, 0x02)
    a.ins("mov [bx+REGION], eax", 0x66, 0x89, 0x87, _w(REGION_ADDR), c="ring first, then ticks")
    a.ins("mov [TICKS], eax", 0x66, 0xA3, _w(ticks))
    a.ins(
        "movzx bx, byte [FS_FROZEN]",
        *(0x0F, 0xB6, 0x1E),
        _w(FS_FROZEN_ADDR),
        c="the tick's filesystem write",
    )
    a.ins("shl bx, 2", 0xC1, 0xE3, 0x02, c="thawed: FS_WRITES; frozen: FS_BLOCKED")
    a.ins("inc dword [bx+FS_WRITES]", 0x66, 0xFF, 0x87, _w(FS_WRITES_ADDR))
    a.ins("mov al, 0x20", 0xB0, 0x20)
    a.ins("out 0x20, al", 0xE6, 0x20, c="non-specific EOI to the master 8259")
    a.ins("pop ds", 0x1F)
    a.ins("pop bx", 0x5B)
    a.ins("pop eax", 0x66, 0x58)
    a.ins("iret", 0xCF)

    # ---- say: print "torpor-hvm " then the string at SI; puts: the string at SI
    a.label("say")
    a.ins("push si", 0x56)
    a.ins("mov si, msg_prefix", 0xBE, _abs16("msg_prefix"))
    a.ins("call puts", 0xE8, _rel16("puts"))
    a.ins("pop si", 0x5E)
    a.label("puts")
    a.ins("lodsb", 0xAC)
    a.ins("test al, al", 0x84, 0xC0)
    a.ins("jz puts_done", 0x74, _rel8("puts_done"))
    a.ins("mov ah, al", 0x88, 0xC4, c="keep the character")
    a.ins("mov dx, 0x3fd", 0xBA, _w(0x3FD), c="COM1 LSR")
    a.label("thre")
    a.ins("in al, dx", 0xEC)
    a.ins("test al, 0x20", 0xA8, 0x20, c="LSR.THRE: transmitter ready")
    a.ins("jz thre", 0x74, _rel8("thre"))
    a.ins("mov al, ah", 0x88, 0xE0)
    a.ins("mov dl, 0xf8", 0xB2, 0xF8, c="DX = 0x3f8, THR")
    a.ins("out dx, al", 0xEE)
    a.ins("jmp short puts", 0xEB, _rel8("puts"))
    a.label("puts_done")
    a.ins("ret", 0xC3)

    # ---- data
    a.label("gdt")
    a.data("dw 15; dd gdt; dw 0", _w(15) + bytes(6), c="null descriptor holds the GDTR")
    a.data(
        "flat data descriptor",
        bytes([0xFF, 0xFF, 0x00, 0x00, 0x00, 0x92, 0xCF, 0x00]),
        c="base 0, limit 0xfffff x 4 KiB, present, writable",
    )
    a.label("null_idtr")
    a.data("dw 0; dd 0", bytes(6), c="an IVT with limit 0, for the crash")
    for name, text in (
        ("msg_prefix", _PREFIX),
        ("msg_boot", "boot\r\n"),
        ("msg_resume", "resume\r\n"),
        ("msg_s3", "s3\r\n"),
        ("msg_poweroff", "poweroff\r\n"),
        ("msg_crash", "crash\r\n"),
        ("msg_no_acpi", "no-acpi\r\n"),
    ):
        a.label(name)
        a.data(f"db {text!r}, 0", text.encode() + b"\0")
    return a


def _build() -> tuple[bytes, _Asm]:
    a = _program()
    code = bytearray(a.assemble())
    # The GDTR in the null descriptor: limit 15, base = the GDT's own address.
    gdt_off = a.labels["gdt"] - LOAD_ADDR
    code[gdt_off + 2 : gdt_off + 6] = _d(a.labels["gdt"])
    for line in a.lines:  # and in the listing
        if isinstance(line, _Line) and line.addr == a.labels["gdt"]:
            line.code[2:6] = _d(a.labels["gdt"])
    if len(code) > 510:
        raise AssertionError(f"boot sector code is {len(code)} bytes; 510 fit")
    sector = bytes(code) + bytes(510 - len(code)) + b"\x55\xaa"  # BIOS boot signature
    return sector, a


_SECTOR, _ASM = _build()

#: The guest-physical address SeaBIOS jumps to on S3 resume (FACS waking vector).
RESUME_VECTOR: int = _ASM.labels["resume_entry"]
#: Bytes of code and data before the zero padding and the 0x55AA signature.
CODE_SIZE: int = _ASM.pc - LOAD_ADDR


def boot_sector() -> bytes:
    """The 512-byte boot sector (ends in the 0x55 0xAA BIOS signature)."""
    return _SECTOR


def listing() -> str:
    """The assembler listing: address, bytes, instruction, why."""
    return _ASM.render()


def write_image(path: str | Path) -> Path:
    """Write the boot sector as a one-sector raw disk image at ``path``."""
    p = Path(path)
    p.write_bytes(_SECTOR)
    return p


# --------------------------------------------------------------------------
# Reading the guest's state from its memory (the host's view)
# --------------------------------------------------------------------------


@attrs.frozen
class GuestCounters:
    """The guest's state block, as read from its memory.

    ``valid`` is false until the guest has run once (no magic yet).
    ``waking_vector`` is the FACS Firmware_Waking_Vector (``None`` when no FACS
    was found): it equals :data:`RESUME_VECTOR` once the guest set it.
    """

    valid: bool
    ticks: int
    boots: int
    resumes: int
    pm1a_cnt: int
    facs: int
    s3_entries: int
    last_cmd: int
    waking_vector: int | None = None
    fs_frozen: int = 0
    fs_writes: int = 0
    fs_blocked: int = 0


#: How a reader fetches guest memory: ``read(guest_physical_addr, length)``.
MemoryReader = Callable[[int, int], bytes]


def read_counters(read: MemoryReader) -> GuestCounters:
    """Decode the state block (and the FACS waking vector) through ``read``."""
    raw = read(STATE_ADDR, STATE_SIZE)
    magic, tk, bt, rs, pm1a, facs, s3, last, frozen, writes, blocked = struct.unpack(
        "<7IBB2x2I", raw
    )
    vector = None
    if magic == MAGIC and facs:
        sig, vec = struct.unpack("<4s8xI", read(facs, 16))
        vector = vec if sig == b"FACS" else None
    return GuestCounters(
        magic == MAGIC, tk, bt, rs, pm1a, facs, s3, last, vector, frozen, writes, blocked
    )


def expected_region(ticks: int) -> bytes:
    """The ring's content after ``ticks`` ticks: ``ring[t % 256] = t`` for t <= ticks."""
    ring = [0] * 256
    for t in range(max(1, ticks - 255), ticks + 1):
        ring[t % 256] = t
    return struct.pack("<256I", *ring)


def region_matches(region: bytes, ticks: int) -> bool:
    """True if ``region`` is the ring after ``ticks`` ticks, or mid-tick after ``ticks + 1``.

    The IRQ0 handler stores the ring slot before the counter, so a vCPU
    stopped between the two stores shows the ring one tick ahead.
    """
    return region in (expected_region(ticks), expected_region(ticks + 1))


def region_checksum(region: bytes) -> str:
    """SHA-256 of the ring, hex."""
    return hashlib.sha256(region).hexdigest()


if __name__ == "__main__":  # pragma: no cover - a developer's aid
    print(listing())
    print(f"\n{CODE_SIZE} bytes of 510; resume vector {RESUME_VECTOR:#x}")

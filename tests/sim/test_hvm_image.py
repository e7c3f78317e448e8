"""The boot-sector guest: its bytes, its encodings, its memory layout, its helpers.

The hand encodings are checked against GNU objdump's 16-bit decoder where it
is installed (binutils); what the guest *does* is checked under real QEMU in
test_device_models.py.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from torpor_sim import hvm_image as img
from torpor_sim.hvm_image import _Line  # the assembler's listing lines


def test_boot_sector_shape() -> None:
    sector = img.boot_sector()
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"  # BIOS boot signature
    assert img.CODE_SIZE <= 510
    assert sector[img.CODE_SIZE : 510] == bytes(510 - img.CODE_SIZE)
    assert sector == img.boot_sector()  # built once, deterministic


def test_write_image(tmp_path: Path) -> None:
    path = img.write_image(tmp_path / "guest.img")
    assert path.read_bytes() == img.boot_sector()


def test_resume_vector_is_in_the_sector_and_reachable_from_seabios() -> None:
    vector = img.RESUME_VECTOR
    assert img.LOAD_ADDR <= vector < img.LOAD_ADDR + img.CODE_SIZE
    # SeaBIOS far-calls FLATPTR_TO_SEGOFF(vector): segment vector >> 4, offset vector & 15.
    seg, off = vector >> 4, vector & 0xF
    assert (seg << 4) + off == vector
    code = img.boot_sector()[vector - img.LOAD_ADDR :]
    assert code[:3] == b"\xbd\x01\x00"  # mov bp, 1: "this is a resume"
    assert code[3] == 0xEA  # then a far jump, which makes CS 0 whatever SeaBIOS used


def test_layout_constants_do_not_overlap() -> None:
    state = range(img.STATE_ADDR, img.STATE_ADDR + img.STATE_SIZE)
    ring = range(img.REGION_ADDR, img.REGION_ADDR + img.REGION_SIZE)
    assert not set(state) & set(ring)
    # SeaBIOS's S3 resume stack grows down from 0x1000; its POST clears 0x7000-0x90000.
    assert img.STATE_ADDR >= 0x1000 and ring.stop <= 0x7000
    fields = [
        img.TICKS_ADDR,
        img.BOOTS_ADDR,
        img.RESUMES_ADDR,
        img.PM1A_CNT_ADDR,
        img.FACS_PTR_ADDR,
        img.S3_ENTRIES_ADDR,
        img.LAST_CMD_ADDR,
        img.FS_FROZEN_ADDR,
        img.FS_WRITES_ADDR,
        img.FS_BLOCKED_ADDR,
    ]
    assert all(f in state for f in fields) and len(set(fields)) == len(fields)
    assert img.PIT_DIVISOR == 11932  # 1193182 Hz / 100 Hz


def test_read_counters_decodes_the_state_block() -> None:
    mem = bytearray(0x20000)
    struct.pack_into(
        "<7IB", mem, img.STATE_ADDR, img.MAGIC, 1234, 2, 3, 0x604, 0x10000, 4, ord("S")
    )
    struct.pack_into("<B", mem, img.FS_FROZEN_ADDR, 1)
    struct.pack_into("<II", mem, img.FS_WRITES_ADDR, 1200, 34)
    struct.pack_into("<4sI4xI", mem, 0x10000, b"FACS", 64, img.RESUME_VECTOR)
    c = img.read_counters(lambda a, n: bytes(mem[a : a + n]))
    assert c == img.GuestCounters(
        True, 1234, 2, 3, 0x604, 0x10000, 4, ord("S"), img.RESUME_VECTOR, 1, 1200, 34
    )
    assert img.FS_BLOCKED_ADDR == img.FS_WRITES_ADDR + 4  # the writer indexes by fs_frozen
    blank = img.read_counters(lambda a, n: bytes(n))
    assert not blank.valid and blank.waking_vector is None


def test_expected_region() -> None:
    assert img.expected_region(0) == bytes(img.REGION_SIZE)
    ring = struct.unpack("<256I", img.expected_region(3))
    assert ring[:4] == (0, 1, 2, 3) and set(ring[4:]) == {0}
    ring = struct.unpack("<256I", img.expected_region(1000))
    assert ring[1000 % 256] == 1000 and ring[(1000 + 1) % 256] == 1000 - 255
    assert sorted(ring) == list(range(1000 - 255, 1001))
    region = img.expected_region(500)
    assert img.region_matches(region, 500) and img.region_matches(region, 499)
    assert not img.region_matches(region, 498) and not img.region_matches(region, 501)
    assert img.region_checksum(region) == img.region_checksum(img.expected_region(500))


def test_listing_comments_every_instruction() -> None:
    lines = [ln for ln in img._ASM.lines if isinstance(ln, _Line)]
    code = [ln for ln in lines if ln.addr < img._ASM.labels["gdt"]]
    assert code and all(ln.comment or ln.text for ln in code)
    text = img.listing()
    assert "resume_entry:" in text and "FACS Firmware_Waking_Vector" in text


@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils' objdump is not installed")
def test_hand_encodings_match_objdump(tmp_path: Path) -> None:
    """Each instruction decodes, at its address, to the same length and mnemonic."""
    path = img.write_image(tmp_path / "bs.bin")
    out = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-m", "i8086", "-M", "intel",
         f"--adjust-vma={img.LOAD_ADDR:#x}", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    decoded: dict[int, tuple[int, str]] = {}
    last = None
    for line in out.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)\s*(\S+)?", line)
        if not m:
            continue
        nbytes = len(m.group(2).split())
        if m.group(3) is None and last is not None:  # objdump wraps long encodings
            decoded[last] = (decoded[last][0] + nbytes, decoded[last][1])
            continue
        last = int(m.group(1), 16)
        decoded[last] = (nbytes, m.group(3))
    aliases = {"jz": "je", "jnz": "jne", "lodsb": "lods", "int3": "int3"}
    end = img._ASM.labels["gdt"]
    checked = 0
    for ln in img._ASM.lines:
        if not isinstance(ln, _Line) or ln.addr >= end:
            continue
        ours = ln.text.split()[0]
        assert ln.addr in decoded, f"{ln.addr:#x} {ln.text}: objdump decodes no instruction here"
        length, theirs = decoded[ln.addr]
        assert length == len(ln.code), f"{ln.addr:#x} {ln.text}: {length} bytes per objdump"
        want = aliases.get(ours, ours)
        # objdump adds an operand-size suffix to some (lgdtw, lidtw)
        assert theirs in (want, want + "w"), f"{ln.addr:#x} {ln.text}: objdump says {theirs}"
        checked += 1
    assert checked > 100

"""xl's save format and the real-Xen save path, without Xen.

* the xl / libxl / libxc framing: written by torpor, walked back by the
  verifier; round trips; every truncation, corruption, wrong magic, wrong
  version refused with where and why (hypothesis for the cut points);
* the domain config as xl stores it (JSON, NUL, c_info.domid reset);
* the callback bridge: the orchestrator's save through :class:`XlBuilder`
  with a stand-in for ``xc_domain_save`` that, like libxenguest, calls the
  suspend callback from the thread that called it and checks the domain is
  then shut down for suspend -- on a simulated host, so the suspend is
  torpor's real one (handshake, ack timeout, rollback);
* the cffi declarations of :mod:`torpor.hypervisor.libxl` against Debian's
  Xen 4.17 headers (sizes, offsets, prototypes, exported symbols), and its
  BackendUnavailable on a machine without Xen.

The same path on a real hypervisor: tests/xen/test_xl_save_real.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torpor.errors import (
    AckTimeout,
    BackendUnavailable,
    HypervisorError,
    ImageError,
    MigrationFailed,
)
from torpor.facade import Torpor
from torpor.image import decode, encode
from torpor.model import Timeouts
from torpor.xl import XlBuilder
from torpor.xl_savefile import (
    XL_MAGIC,
    LibxcRecord,
    LibxlRecord,
    config_for_save,
    config_type,
    emulator_record,
    libxl_record,
    libxl_stream_header,
    read_save_file,
    sniff,
    xenstore_data,
    xl_header,
)
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost

GCC = shutil.which("gcc")
HEADERS = ("libxl.h", "libxl_event.h", "xenctrl.h", "xenguest.h")
needs_gcc_and_headers = pytest.mark.skipif(
    GCC is None or not all(Path("/usr/include", h).exists() for h in HEADERS),
    reason="gcc or Xen 4.17 headers absent (apt-get install gcc libxen-dev)",
)

# --------------------------------------------------------------------------
# a libxc stream, as xc_domain_save lays it out
# --------------------------------------------------------------------------

PAGE = 4096
#: an optional libxc record the stand-in uses to carry the simulated guest's state
SIM_STATE = 0x80000100


def rec(rtype: int, body: bytes = b"") -> bytes:
    return struct.pack("<II", rtype, len(body)) + body + b"\0" * (-len(body) % 8)


def libxc_stream(
    *,
    hvm: bool = False,
    pages: list[bytes] | None = None,
    extra: bytes = b"",
    version: int = 3,
) -> bytes:
    """Image header, domain header, static data, pages, per-type records, END."""
    pages = pages if pages is not None else [bytes([i]) * PAGE for i in range(3)]
    out = struct.pack(">QIIHHI", 0xFFFFFFFFFFFFFFFF, 0x58454E46, version, 0, 0, 0)
    out += struct.pack("<IHHII", 2 if hvm else 1, 12, 0, 4, 17)
    out += rec(LibxcRecord.X86_CPUID_POLICY, b"\1" * 24)
    out += rec(LibxcRecord.STATIC_DATA_END)
    if not hvm:
        out += rec(LibxcRecord.X86_PV_INFO, bytes([8, 4, 0, 0, 0, 0, 0, 0]))
        out += rec(LibxcRecord.X86_PV_P2M_FRAMES, struct.pack("<II", 0, 1) + b"\0" * 8)
    out += extra
    if pages:
        # a NOTAB page with data per entry, plus one XTAB (no data) at the end
        words = [i for i in range(len(pages))] + [(0xF << 60) | len(pages)]
        body = struct.pack("<II", len(words), 0) + struct.pack(f"<{len(words)}Q", *words)
        out += rec(LibxcRecord.PAGE_DATA, body + b"".join(pages))
    if hvm:
        out += rec(LibxcRecord.X86_TSC_INFO, b"\0" * 24)
        out += rec(LibxcRecord.HVM_CONTEXT, b"\2" * 100)
        out += rec(LibxcRecord.HVM_PARAMS, struct.pack("<II", 1, 0) + struct.pack("<QQ", 0, 1))
    else:
        out += rec(LibxcRecord.X86_PV_VCPU_BASIC, struct.pack("<II", 0, 0) + b"\3" * 40)
        out += rec(LibxcRecord.SHARED_INFO, b"\0" * PAGE)
        out += rec(LibxcRecord.X86_TSC_INFO, b"\0" * 24)
    return out + rec(LibxcRecord.END)


def config_json(kind: str = "pv", domid: int = 7, name: str = "guest") -> str:
    """As libxl_domain_config_to_json lays it out: the type in c_info, and
    b_info's type union keyed as ``"type.<kind>"``."""
    return json.dumps(
        {
            "c_info": {"type": kind, "name": name, "domid": domid, "uuid": "u"},
            "b_info": {"max_memkb": 262144, f"type.{kind}": {}},
        },
        indent=4,
    )


def xl_file(
    kind: str = "pv",
    libxc: bytes | None = None,
    emulator: bytes | None = b"QEVM device state",
    physmap: list[tuple[str, str]] | None = None,
) -> bytes:
    hvm = kind != "pv"
    out = xl_header(config_for_save(config_json(kind)))
    out += libxl_stream_header() + libxl_record(LibxlRecord.LIBXC_CONTEXT)
    out += libxc if libxc is not None else libxc_stream(hvm=hvm)
    if kind == "hvm":
        if physmap:
            out += emulator_record(LibxlRecord.EMULATOR_XENSTORE_DATA, xenstore_data(physmap))
        if emulator is not None:
            out += emulator_record(LibxlRecord.EMULATOR_CONTEXT, emulator)
    return out + libxl_record(LibxlRecord.END)


def write(tmp_path: Path, data: bytes, name: str = "g.save") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------
# framing: round trips
# --------------------------------------------------------------------------


def test_xl_header_is_xls_layout() -> None:
    config = config_for_save(config_json())
    hdr = xl_header(config)
    # struct save_file_header: char magic[32]; u32 byteorder, mandatory, optional, optlen
    assert XL_MAGIC == b"Xen saved domain, xl format\n \0 \r" and len(XL_MAGIC) == 32
    assert hdr[:32] == XL_MAGIC
    byteorder, mandatory, optional, optlen = struct.unpack_from("<IIII", hdr, 32)
    assert hdr[32:36] == b"\x04\x03\x02\x01"  # 0x01020304 in x86 order
    assert byteorder == 0x01020304
    assert mandatory == 0b11  # XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMv2
    assert optional == 0
    assert optlen == 4 + len(config) == len(hdr) - 48
    (clen,) = struct.unpack_from("<I", hdr, 48)
    assert clen == len(config) and hdr[52:].endswith(b"\0")


def test_libxl_stream_header_and_records() -> None:
    assert libxl_stream_header() == bytes.fromhex("4c6962786c466d740000000200000000")
    assert libxl_record(LibxlRecord.LIBXC_CONTEXT) == struct.pack("<II", 1, 0)
    r = libxl_record(LibxlRecord.EMULATOR_CONTEXT, b"abc")
    assert r == struct.pack("<II", 3, 3) + b"abc" + b"\0" * 5 and len(r) % 8 == 0
    e = emulator_record(LibxlRecord.EMULATOR_CONTEXT, b"xyz")
    # length covers the emulator sub-header {id 2 = qemu-xen, index 0} and the body
    assert e[:16] == struct.pack("<IIII", 3, 11, 2, 0) and e[16:19] == b"xyz"


@pytest.mark.parametrize("kind", ["pv", "pvh", "hvm"])
def test_round_trip(tmp_path: Path, kind: str) -> None:
    physmap = [("physmap/f0000000/start_addr", "f0000000"), ("physmap/f0000000/size", "800000")]
    p = write(tmp_path, xl_file(kind, physmap=physmap))
    assert sniff(p) == "xl"
    info = read_save_file(p)
    assert info.size == p.stat().st_size
    assert info.guest_type == kind and info.name == "guest"
    assert info.config["c_info"]["domid"] == 0  # xl save resets it (no -D)
    assert json.loads(info.config_json) == info.config
    assert info.libxc_type == (1 if kind == "pv" else 2)
    assert info.xen_version == (4, 17) and info.page_shift == 12
    assert (info.pages, info.pages_with_data) == (4, 3)
    types = [t for t, _o, _n in info.libxl_records]
    if kind == "hvm":
        assert types == [1, 2, 3, 0] and info.emulator_context == len(b"QEVM device state")
    else:
        assert types == [1, 0] and info.emulator_context is None
    assert info.libxc_records["PAGE_DATA"] == 1 and info.libxc_records["END"] == 1
    # xl hands libxl the descriptor here: the stream header is there
    assert p.read_bytes()[info.stream_offset : info.stream_offset + 8] == b"LibxlFmt"
    assert info.summary()["libxl_records"][-1] == "END"


def test_sniff_tells_torpor_images_from_xl_files(tmp_path: Path) -> None:
    from torpor.image import SavedDomain

    img = b"".join(encode(SavedDomain(domain={"kind": "pv"}, memory=b"m" * 4096)))
    assert sniff(write(tmp_path, img, "t.img")) == "torpor"
    assert sniff(write(tmp_path, b"hello", "x")) == "unknown"
    assert sniff(write(tmp_path, b"", "e")) == "unknown"
    with pytest.raises(ImageError, match="not an xl save file"):
        read_save_file(write(tmp_path, img, "t.img"))


# --------------------------------------------------------------------------
# framing: refusals
# --------------------------------------------------------------------------

GOOD = xl_file("hvm", physmap=[("physmap/1/name", "vga")])


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_every_truncation_is_refused(tmp_path_factory: pytest.TempPathFactory, cut: int) -> None:
    p = tmp_path_factory.mktemp("cut") / "g.save"
    p.write_bytes(GOOD[:cut])
    with pytest.raises(ImageError) as ei:
        read_save_file(p)
    assert str(p) in str(ei.value)


def test_truncation_at_each_boundary_names_the_layer(tmp_path: Path) -> None:
    info = read_save_file(write(tmp_path, GOOD))
    cuts = {
        10: "xl header",
        60: "xl optional data",
        info.stream_offset + 4: "libxl stream header",
        info.stream_offset + 16 + 8 + 10: "libxc image header",
        info.libxl_records[1][1] + 4: "libxl record header",
        len(GOOD) - 8: "libxl record header",
    }
    for cut, what in cuts.items():
        with pytest.raises(ImageError, match=f"truncated: {what}"):
            read_save_file(write(tmp_path, GOOD[:cut], f"c{cut}"))


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def test_wrong_magic_byteorder_flags_and_versions_are_refused(tmp_path: Path) -> None:
    info = read_save_file(write(tmp_path, GOOD))
    so = info.stream_offset
    xc = so + 16 + 8  # libxc image header
    cases = {
        "wrong magic": patch(GOOD, 0, b"Xen saved domain, xm format"),
        "wrong byte order": patch(GOOD, 32, struct.pack(">I", 0x01020304)),
        "unsupported mandatory flags 0x4": patch(GOOD, 36, struct.pack("<I", 0b111)),
        "legacy": patch(GOOD, 36, struct.pack("<I", 0b01)),
        "libxl stream: wrong ident": patch(GOOD, so, b"LibxlFm!"),
        "libxl stream: version 3": patch(GOOD, so + 8, struct.pack(">I", 3)),
        "libxl stream: big-endian": patch(GOOD, so + 12, struct.pack(">I", 1)),
        "not a libxc image header": patch(GOOD, xc + 8, struct.pack(">I", 0x58454E47)),
        r"version 4 not in \(2, 3\)": patch(GOOD, xc + 12, struct.pack(">I", 4)),
        "page shift 16": patch(GOOD, xc + 24 + 4, struct.pack("<H", 16)),
        "unknown guest type 3": patch(GOOD, xc + 24, struct.pack("<I", 3)),
    }
    for why, data in cases.items():
        with pytest.raises(ImageError, match=why):
            read_save_file(write(tmp_path, data, "bad"))


def test_inconsistent_records_are_refused(tmp_path: Path) -> None:
    def pv(extra: bytes = b"", **kw: Any) -> bytes:
        return xl_file("pv", libxc=libxc_stream(extra=extra, **kw))

    page_hdr = struct.pack("<II", 2, 0) + struct.pack("<2Q", 0, 1)
    cases = {
        # two pfns with data announced, one page present
        r"length \d+ != header \+ 2 pfns \+ 2 pages": pv(
            rec(LibxcRecord.PAGE_DATA, page_hdr + b"\0" * PAGE)
        ),
        "unknown page type 0x5": pv(
            rec(
                LibxcRecord.PAGE_DATA,
                struct.pack("<II", 1, 0) + struct.pack("<Q", 5 << 60) + b"\0" * PAGE,
            )
        ),
        "no pfns": pv(rec(LibxcRecord.PAGE_DATA, struct.pack("<II", 0, 0))),
        "unknown mandatory record 0x13": pv(rec(0x13, b"x")),
        "X86_PV_INFO record: length 4": pv(rec(LibxcRecord.X86_PV_INFO, b"\0" * 4)),
        "HVM_CONTEXT record in a PV stream": pv(rec(LibxcRecord.HVM_CONTEXT, b"\0" * 8)),
        "no PAGE_DATA": pv(pages=[]),
        "exceeds the maximum": pv(struct.pack("<II", 1, (128 << 20) + 1)),
    }
    for why, data in cases.items():
        with pytest.raises(ImageError, match=why):
            read_save_file(write(tmp_path, data, "bad"))
    # an unknown *optional* libxc record is skipped, as libxenguest does
    ok = read_save_file(write(tmp_path, pv(rec(0x80000042, b"hello")), "ok"))
    assert ok.libxc_records["optional-0x80000042"] == 1


def test_libxl_layer_refusals(tmp_path: Path) -> None:
    base = xl_file("pv")
    end = libxl_record(LibxlRecord.END)
    body = base[: -len(end)]
    cases = {
        "octets after the libxl END": base + b"\0" * 8,
        "unknown record type 0x9": body + libxl_record(9) + end,
        "a checkpointed stream": body + libxl_record(LibxlRecord.CHECKPOINT_END) + end,
        "padding is not zero": body
        + libxl_record(LibxlRecord.EMULATOR_CONTEXT, struct.pack("<II", 2, 0) + b"abc")[:-1]
        + b"\1"
        + end,
        "unknown emulator id 7": body
        + libxl_record(LibxlRecord.EMULATOR_CONTEXT, struct.pack("<II", 7, 0))
        + end,
        "END record has length 8": body + struct.pack("<II", 0, 8) + b"\0" * 8,
    }
    for why, data in cases.items():
        with pytest.raises(ImageError, match=why):
            read_save_file(write(tmp_path, data, "bad"))
    with pytest.raises(ImageError, match="without an EMULATOR_CONTEXT"):
        read_save_file(write(tmp_path, xl_file("hvm", emulator=None), "hvm"))
    # PVH has no QEMU: its HVM libxc stream stands alone
    assert read_save_file(write(tmp_path, xl_file("pvh"), "pvh")).emulator_context is None
    # the config and libxc disagree on the guest type
    swapped = xl_file("pv", libxc=libxc_stream(hvm=True))
    with pytest.raises(ImageError, match="config says a pv guest but libxc's stream is x86 HVM"):
        read_save_file(write(tmp_path, swapped, "swapped"))


def test_config_refusals(tmp_path: Path) -> None:
    good = xl_file("pv")
    (optlen,) = struct.unpack_from("<I", good, 44)
    (clen,) = struct.unpack_from("<I", good, 48)
    # config length beyond the optional data
    with pytest.raises(ImageError, match="exceeds"):
        read_save_file(write(tmp_path, patch(good, 48, struct.pack("<I", optlen)), "a"))
    # no NUL at the end of the JSON
    with pytest.raises(ImageError, match="not NUL-terminated"):
        read_save_file(write(tmp_path, patch(good, 52 + clen - 1, b" "), "b"))
    # not JSON
    with pytest.raises(ImageError, match="not valid JSON"):
        read_save_file(write(tmp_path, patch(good, 52, b"!"), "c"))
    with pytest.raises(ImageError, match="no c_info"):
        config_for_save('{"b_info": {}}')
    with pytest.raises(ImageError, match="not JSON"):
        config_for_save("{")


def test_config_for_save_does_what_xl_does() -> None:
    raw = config_json(domid=12)
    saved = config_for_save(raw)
    assert saved.endswith(b"\0") and b"\0" not in saved[:-1]
    loaded = json.loads(saved[:-1])
    assert loaded["c_info"]["domid"] == 0
    assert {k: v for k, v in loaded["c_info"].items() if k != "domid"} == {
        k: v for k, v in json.loads(raw)["c_info"].items() if k != "domid"
    }
    assert json.loads(config_for_save(raw, preserve_domid=True)[:-1])["c_info"]["domid"] == 12
    # already 0 (or absent, libxl's default): libxl's own text, byte for byte
    zero = config_json(domid=0)
    assert config_for_save(zero) == zero.encode() + b"\0"
    with pytest.raises(ImageError):
        xenstore_data([("/absolute", "x")])


def test_config_type_reads_libxls_json_layout() -> None:
    assert config_type(json.loads(config_json("pvh"))) == "pvh"
    # no c_info.type: the key of b_info's type union says it
    assert config_type({"c_info": {}, "b_info": {"type.hvm": {"firmware": "bios"}}}) == "hvm"
    assert config_type({"c_info": {}, "b_info": {}}) is None


# --------------------------------------------------------------------------
# the callback bridge, on a simulated host
# --------------------------------------------------------------------------

LIBXL_TYPE = {"pv": "pv", "pvh": "pvh", "pvhvm": "hvm", "hvm": "hvm"}


class FakeLibxl:
    """libxl's part, done by the simulated host: config, restore, unpause, destroy.

    create_restore reads libxl's stream from the descriptor it is given, as
    libxl does, and rebuilds the domain from the simulated guest's state the
    stand-in ``xc_domain_save`` put in an optional libxc record.
    """

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.calls: list[tuple[str, Any]] = []
        self.fail_config: Exception | None = None

    def domain_config_json(self, domid: int) -> str:
        self.calls.append(("config", domid))
        if self.fail_config is not None:
            raise self.fail_config
        kind = LIBXL_TYPE[self.host.kinds[domid]]
        # libxl's stored config: the domain's name and UUID
        config = json.loads(config_json(kind, domid=domid, name=self.host.xen.domain(domid).name))
        config["c_info"]["uuid"] = self.host.xen.domain(domid).uuid
        return json.dumps(config, indent=4)

    def create_restore(self, config: str, fd: int) -> int:
        c_info = json.loads(config)["c_info"]
        self.calls.append(("create_restore", c_info["name"]))
        with os.fdopen(os.dup(fd), "rb") as f:
            stream = f.read()
        assert stream[:8] == b"LibxlFmt"  # handed over at libxl's stream
        start = stream.index(struct.pack("<I", SIM_STATE))
        (length,) = struct.unpack_from("<I", stream, start + 4)
        saved = decode(_io(stream[start + 8 : start + 8 + length]))
        # libxl builds the domain the config describes: its name and UUID
        domain = {**saved.domain, "name": c_info["name"], "uuid": c_info["uuid"]}
        domid = self.host.restore_guest(attrs.evolve(saved, domain=domain))
        return domid

    def unpause(self, domid: int) -> None:
        # libxl_domain_unpause of a freshly restored domain: the guest wakes in a
        # new domain (the simulated restore leaves it paused, as libxl does).
        self.calls.append(("unpause", domid))
        self.host.start_restored(domid)

    def destroy(self, domid: int) -> None:
        self.calls.append(("destroy", domid))
        self.host.destroy_guest(domid)

    def close(self) -> None:
        self.calls.append(("close", None))


def _io(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


class FakeDomainSave:
    """xc_domain_save as libxenguest runs it: headers and static data, then
    the suspend callback from this (the caller's) thread, then a check that
    the domain is shut down for suspend, then memory, state and END."""

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.thread: int | None = None
        self.suspend_returned: bool | None = None
        self.fail_after_suspend: Exception | None = None
        self.corrupt = False

    def __call__(self, fd: int, domid: int, suspend: Callable[[], bool], *, hvm: bool) -> None:
        self.thread = threading.get_ident()
        head = libxc_stream(hvm=hvm, pages=[])
        os.write(fd, head[: head.index(rec(LibxcRecord.STATIC_DATA_END)) + 8])
        self.suspend_returned = suspend()
        if not self.suspend_returned:
            raise HypervisorError("save callback suspend() failed: 0", errno=errno.EINVAL)
        info = self.host.xen.domain_info(domid)
        if not (info.shutdown and info.shutdown_reason == 2):
            raise HypervisorError("Domain has not been suspended", errno=errno.EINVAL)
        if self.fail_after_suspend is not None:
            raise self.fail_after_suspend
        saved = self.host.save_guest(domid)
        image = b"".join(encode(saved))
        pages = [saved.memory[i : i + PAGE] for i in range(0, len(saved.memory), PAGE)]
        body = libxc_stream(hvm=hvm, pages=pages, extra=rec(SIM_STATE, image))
        body = body[body.index(rec(LibxcRecord.STATIC_DATA_END)) + 8 :]
        if self.corrupt:
            body = body[:-8] + struct.pack("<II", 0, 8)  # END with a length
        os.write(fd, body)


@pytest.fixture
def xl_sim(short_dir: str) -> Iterator[tuple[SimHost, Torpor, FakeLibxl, FakeDomainSave]]:
    host = SimHost(short_dir, qemu=False)
    host.start()
    fake_libxl = FakeLibxl(host)
    fake_save = FakeDomainSave(host)
    toolstack = host.toolstack_host()
    toolstack.builder = XlBuilder(
        xenstore=lambda: toolstack.xenstore,
        libxl_factory=lambda: fake_libxl,
        domain_save=fake_save,
    )
    t = Torpor(toolstack, own_host=True, timeouts=Timeouts(ack=2.0, suspend=10.0))
    yield host, t, fake_libxl, fake_save
    t.close()
    host.stop()


def counters(host: SimHost, domid: int) -> dict[str, int]:
    c: dict[str, int] = host.run(host.guest_report(domid))["counters"]
    return c


@pytest.mark.parametrize("kind", ["pv", "pvh"])
def test_save_runs_torpors_suspend_inside_xc_domain_save_then_restores(
    xl_sim: tuple[SimHost, Torpor, FakeLibxl, FakeDomainSave], tmp_path: Path, kind: str
) -> None:
    host, t, libxl, xc_save = xl_sim
    domid = host.create_guest(kind)
    before = counters(host, domid)
    target = tmp_path / "g.save"
    res = t.save(domid, target)
    assert res.outcome == "saved" and res.state == "destroyed"
    # libxenguest called the suspend from the worker thread, not the loop's
    assert xc_save.thread is not None and xc_save.thread != t._thread.ident
    assert xc_save.thread != threading.get_ident()
    assert xc_save.suspend_returned is True
    phases = [str(p.phase) for p in res.timings]
    assert phases[:1] == ["validate"] and "ack" in phases and "shutdown" in phases
    assert phases[-2:] == ["save", "cleanup"]
    assert res.method is not None and str(res.method) == "xenstore"
    details = dict(res.details)
    assert details["format"] == "xl" and details["bytes"] == target.stat().st_size
    assert details["guest_type"] == LIBXL_TYPE[kind]
    assert details["libxl_records"] == ["LIBXC_CONTEXT", "END"]
    assert domid not in host.xen.domains  # destroyed, after the file was verified
    assert ("destroy", domid) in libxl.calls
    assert [p.name for p in tmp_path.iterdir()] == ["g.save"]  # no partial file left
    info = read_save_file(target)
    assert info.config["c_info"]["domid"] == 0 and info.name == f"{kind}-guest-{domid}"

    restored = t.restore(target)
    assert restored.outcome == "restored" and restored.state == "running"
    assert restored.cooperative is False and restored.domid != domid
    assert dict(restored.details)["format"] == "xl"
    assert [str(p.phase) for p in restored.timings][:2] == ["restore", "resume"]
    assert ("unpause", restored.domid) in libxl.calls
    after = host.run(host.guest_report(restored.domid))
    assert after["last_hypercall_return"] == 0  # woke in a new domain
    assert after["counters"]["boots"] == before["boots"]  # not rebooted
    assert after["counters"]["ticks"] >= before["ticks"]


def test_a_guest_that_never_acks_is_left_running_and_no_file_is_written(
    xl_sim: tuple[SimHost, Torpor, FakeLibxl, FakeDomainSave], tmp_path: Path
) -> None:
    host, t, _libxl, xc_save = xl_sim
    domid = host.create_guest("pv", behaviour=Behaviour(misbehaviour="never_ack"))
    target = tmp_path / "g.save"
    with pytest.raises(AckTimeout) as ei:
        t.save(domid, target)
    assert ei.value.state == "running" and ei.value.domid == domid
    assert xc_save.suspend_returned is False  # the callback said no to libxenguest
    assert host.xen.domain_info(domid).running
    assert list(tmp_path.iterdir()) == []


def test_failure_after_the_suspend_resumes_the_guest_cooperatively(
    xl_sim: tuple[SimHost, Torpor, FakeLibxl, FakeDomainSave], tmp_path: Path
) -> None:
    host, t, libxl, xc_save = xl_sim
    domid = host.create_guest("pv")
    xc_save.fail_after_suspend = HypervisorError("write failed: ENOSPC", errno=errno.ENOSPC)
    with pytest.raises(MigrationFailed) as ei:
        t.save(domid, tmp_path / "g.save")
    assert ei.value.state == "running"
    assert "ENOSPC" in str(ei.value) and "resumed cooperatively" in str(ei.value)
    report = host.run(host.guest_report(domid))
    assert report["state"] == "running"
    assert report["last_hypercall_return"] == 1  # cancelled: it carried on in place
    assert list(tmp_path.iterdir()) == []
    assert not [c for c in libxl.calls if c[0] == "destroy"]


def test_a_file_that_does_not_verify_is_removed_and_the_guest_resumed(
    xl_sim: tuple[SimHost, Torpor, FakeLibxl, FakeDomainSave], tmp_path: Path
) -> None:
    host, t, _libxl, xc_save = xl_sim
    domid = host.create_guest("pv")
    xc_save.corrupt = True
    with pytest.raises(MigrationFailed) as ei:
        t.save(domid, tmp_path / "g.save")
    assert "save failed in phase save" in str(ei.value)
    assert "libxc END record: length 8, expected 0" in str(ei.value)
    assert "guest resumed cooperatively" in str(ei.value)
    assert host.xen.domain_info(domid).running
    assert list(tmp_path.iterdir()) == []


def test_no_config_no_suspend(
    xl_sim: tuple[SimHost, Torpor, FakeLibxl, FakeDomainSave], tmp_path: Path
) -> None:
    host, t, libxl, xc_save = xl_sim
    domid = host.create_guest("pv")
    libxl.fail_config = HypervisorError(
        "libxl_retrieve_domain_configuration failed: ERROR_JSON_CONFIG_EMPTY",
        errno=errno.ENOENT,
    )
    with pytest.raises(MigrationFailed, match="before the guest was asked to suspend"):
        t.save(domid, tmp_path / "g.save")
    assert xc_save.suspend_returned is None  # never got as far as xc_domain_save
    xs = host.toolstack_host().xenstore
    assert xs.read_or(f"/local/domain/{domid}/control/shutdown", "") == ""
    assert host.xen.domain_info(domid).running
    assert list(tmp_path.iterdir()) == []


def test_restore_refuses_corrupt_or_foreign_files_before_building(
    xl_sim: tuple[SimHost, Torpor, FakeLibxl, FakeDomainSave],
    torpor: Torpor,
    tmp_path: Path,
) -> None:
    _host, t, libxl, _xc = xl_sim
    cut = write(tmp_path, GOOD[:-100], "cut.save")
    with pytest.raises(ImageError, match="truncated"):
        t.restore(cut)
    from torpor.image import SavedDomain

    img = write(tmp_path, b"".join(encode(SavedDomain(domain={"kind": "pv"}))), "t.img")
    with pytest.raises(ImageError, match="torpor's own image"):
        t.restore(img)
    with pytest.raises(ImageError, match="cannot read"):
        t.restore(tmp_path / "missing")
    assert not [c for c in libxl.calls if c[0] == "create_restore"]
    # ... and the simulated host refuses an xl file
    with pytest.raises(ImageError, match="not a torpor save image but an xl save file"):
        torpor.restore(write(tmp_path, GOOD, "x.save"))


def test_xl_restore_of_a_running_guests_file_is_refused_and_name_makes_a_copy(
    xl_sim: tuple[SimHost, Torpor, FakeLibxl, FakeDomainSave], tmp_path: Path
) -> None:
    """As xl refuses a second domain of one name, before libxl is asked to build;
    ``name=`` rewrites the config's c_info.name (and gives a fresh UUID)."""
    from torpor.errors import NameInUse

    host, t, libxl, _xc = xl_sim
    domid = host.create_guest("pv")
    uuid = host.xen.domain_info(domid).uuid
    target = tmp_path / "g.save"
    t.save(domid, target)
    name = f"pv-guest-{domid}"
    first = t.restore(target)
    assert dict(first.details)["name"] == name
    assert host.xen.domain_info(first.domid).uuid == uuid  # the guest itself, moved
    builds = len([c for c in libxl.calls if c[0] == "create_restore"])
    with pytest.raises(NameInUse) as ei:
        t.restore(target)
    assert ei.value.holder == first.domid and ei.value.state == "not created"
    assert len([c for c in libxl.calls if c[0] == "create_restore"]) == builds  # libxl not asked
    assert host.xen.domain_info(first.domid).running

    copy = t.restore(target, name="pv-copy")
    assert copy.state == "running" and dict(copy.details)["name"] == "pv-copy"
    assert libxl.calls[-2:] == [("create_restore", "pv-copy"), ("unpause", copy.domid)]
    xs = host.toolstack_host().xenstore
    try:
        assert xs.read(f"/local/domain/{copy.domid}/name") == "pv-copy"
        assert xs.read(f"/local/domain/{first.domid}/name") == name
    finally:
        xs.close()
    assert host.xen.domain_info(copy.domid).uuid not in (uuid, "")
    # the file itself is untouched: it still names the guest
    assert read_save_file(target).name == name


def test_renamed_config_sets_name_and_a_fresh_uuid() -> None:
    from torpor.xl_savefile import renamed_config

    original = config_json("hvm", name="web")
    out = json.loads(renamed_config(original, "web-2"))
    assert out["c_info"]["name"] == "web-2"
    again = json.loads(renamed_config(original, "web-2"))
    assert out["c_info"]["uuid"] != "u" and again["c_info"]["uuid"] != out["c_info"]["uuid"]
    assert out["b_info"] == json.loads(original)["b_info"]
    with pytest.raises(ImageError, match="no c_info"):
        renamed_config("[]", "x")


def test_migration_on_real_xen_is_refused_before_touching_the_guest(
    xl_sim: tuple[SimHost, Torpor, FakeLibxl, FakeDomainSave], torpor: Torpor
) -> None:
    host, t, _libxl, _xc = xl_sim
    domid = host.create_guest("pv")
    with pytest.raises(BackendUnavailable, match="xl's migration protocol"):
        t.migrate(domid, torpor)
    assert host.xen.domain_info(domid).running


def test_hvm_write_puts_qemus_state_and_physmap_in_the_stream(tmp_path: Path) -> None:
    class Xs:
        def exists(self, path: str) -> bool:
            return path.endswith("/physmap")

        def ls(self, path: str) -> list[str]:
            assert path == "/local/domain/0/device-model/9/physmap"
            return ["f0000000"]

        def read(self, path: str) -> str:
            return {"start_addr": "f0000000", "size": "800000", "name": "vga.vram"}[
                path.rsplit("/", 1)[1]
            ]

    def fake_save(fd: int, domid: int, suspend: Callable[[], bool], *, hvm: bool) -> None:
        assert hvm and suspend()
        os.write(fd, libxc_stream(hvm=True))

    class Cfg:
        def domain_config_json(self, domid: int) -> str:
            return config_json("hvm", domid=domid)

    b = XlBuilder(xenstore=Xs, libxl_factory=Cfg, domain_save=fake_save)  # type: ignore[arg-type]
    job = b.prepare_save(9)
    assert job.guest_type == "hvm" and job.hvm
    p = tmp_path / "h.save"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        b.write_save(job, fd, lambda: True, lambda: b"QEVM-state")
    finally:
        os.close(fd)
    info = b.verify_save(str(p))
    assert info["libxl_records"] == [
        "LIBXC_CONTEXT",
        "EMULATOR_XENSTORE_DATA",
        "EMULATOR_CONTEXT",
        "END",
    ]
    assert info["emulator_context_bytes"] == len(b"QEVM-state")
    data = p.read_bytes()
    assert b"physmap/f0000000/name\0vga.vram\0" in data
    # no device model state: refused rather than a file QEMU cannot restore from
    fd = os.open(tmp_path / "h2.save", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ImageError, match="no device model state"):
            b.write_save(job, fd, lambda: True, lambda: None)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# the cffi declarations vs Debian's Xen 4.17 headers
# --------------------------------------------------------------------------

_INCLUDES = """\
#include <stddef.h>
#include <stdio.h>
#include <xenctrl.h>
#include <xenguest.h>
#include <libxl.h>
#include <libxl_event.h>
"""


def _compile_and_run(tmp: Path, name: str, body: str) -> dict[str, int]:
    assert GCC is not None
    src = tmp / f"{name}.c"
    src.write_text(_INCLUDES + body)
    r = subprocess.run(
        [GCC, "-std=gnu11", "-Wall", "-Werror", "-o", str(tmp / name), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(tmp / name)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


@needs_gcc_and_headers
def test_libxl_layouts_match_headers(tmp_path: Path) -> None:
    from torpor.hypervisor import libxl

    ffi = libxl.get_ffi()
    expect: dict[str, int] = {}
    lines: list[str] = []

    def add(key: str, value: int, c_expr: str) -> None:
        expect[key] = value
        lines.append(f'    printf("{key} %zu\\n", (size_t)({c_expr}));')

    for cname in (
        "libxl_defbool",
        "libxl_domain_restore_params",
        "libxl_childproc_hooks",
        "struct precopy_stats",
        "struct save_callbacks",
    ):
        ctype = ffi.typeof(cname)
        add(f"sizeof {cname}", ffi.sizeof(ctype), f"sizeof({cname})")
        for fname, field in ctype.fields:
            add(f"offsetof {cname}.{fname}", field.offset, f"offsetof({cname}, {fname})")
            c_expr = f"sizeof((({cname} *)0)->{fname})"
            add(f"sizeof {cname}.{fname}", ffi.sizeof(field.type), c_expr)
    add("sizeof libxl_domain_config", libxl.LIBXL_DOMAIN_CONFIG_SIZE, "sizeof(libxl_domain_config)")
    consts = {
        "LIBXL_VERSION": libxl.LIBXL_VERSION,
        "libxl_sigchld_owner_libxl_always_selective_reap": libxl.SIGCHLD_OWNER_SELECTIVE_REAP,
        "XC_STREAM_PLAIN": libxl.XC_STREAM_PLAIN,
        "XCFLAGS_LIVE": libxl.XCFLAGS_LIVE,
        "LIBXL_CHECKPOINTED_STREAM_NONE": libxl.LIBXL_CHECKPOINTED_STREAM_NONE,
        "sizeof(xc_stream_type_t)": 4,
        "sizeof(libxl_error)": 4,
    }
    for name, value in consts.items():
        add(name, value, name)
    got = _compile_and_run(tmp_path, "layout", "int main(void)\n{\n" + "\n".join(lines) + "\n}\n")
    assert got == expect


@needs_gcc_and_headers
def test_libxl_prototypes_match_headers(tmp_path: Path) -> None:
    """Our prototypes compiled after the real ones: an incompatible one is an error."""
    from torpor.hypervisor import libxl

    decls = "".join(libxl.CDEF_FUNCTIONS.values())
    _compile_and_run(tmp_path, "protos", decls + "int main(void) { return 0; }\n")
    wrong = decls.replace(
        "int libxl_domain_destroy(libxl_ctx *ctx, uint32_t domid,",
        "int libxl_domain_destroy(libxl_ctx *ctx, uint16_t domid,",
    )
    assert wrong != decls
    with pytest.raises(AssertionError, match="conflicting types"):
        _compile_and_run(tmp_path, "wrong", wrong + "int main(void) { return 0; }\n")


def _xen_libs_or_skip() -> Any:
    from torpor.hypervisor import libxl

    try:
        return libxl._load()
    except BackendUnavailable as e:
        pytest.skip(f"Xen 4.17 libraries absent: {e}")


def test_each_function_is_exported_where_we_call_it() -> None:
    from torpor.hypervisor import libxl

    libs = _xen_libs_or_skip()
    for key, block in libxl.CDEF_FUNCTIONS.items():
        lib = libs.xenlight if key == "xenlight" else libs.xenguest
        for line in block.split(";"):
            if "(" not in line:
                continue
            name = line.split("(")[0].split()[-1].lstrip("*")
            assert callable(getattr(lib, name)), name


@pytest.mark.skipif(
    any(os.path.exists(p) for p in ("/dev/xen/privcmd", "/proc/xen/privcmd")),
    reason="this machine runs Xen",
)
def test_without_xen_libxl_is_unavailable_and_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    from torpor.hypervisor import libxl

    _xen_libs_or_skip()
    with pytest.raises(BackendUnavailable, match="libxl_ctx_alloc failed"):
        libxl.Libxl()
    missing = dict(libxl.SONAMES, xenlight="libxenlight.so.0.0-none")
    with pytest.raises(BackendUnavailable, match=r"libxenlight\.so\.0\.0-none"):
        libxl.Libxl(sonames=missing)
    assert capfd.readouterr() == ("", "")

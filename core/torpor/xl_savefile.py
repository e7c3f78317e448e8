"""xl's save file: what ``xl save`` writes and ``xl restore`` reads (Xen 4.17).

Three layers, one inside the other (the facts below are from the Xen 4.17
sources: tools/xl/xl.h and xl_saverestore.c; tools/libs/light/
libxl_sr_stream_format.h and libxl_stream_write.c; tools/libs/guest/
xg_sr_stream_format.h, xg_sr_save.c and xg_sr_restore.c; docs/specs/
libxl-migration-stream.pandoc and libxc-migration-stream.pandoc)::

    xl header        magic     char[32] "Xen saved domain, xl format\\n \\0 \\r"
    (host order)     byteorder u32 0x01020304
                     mandatory u32 XL_MANDATORY_FLAG_JSON (1) | ..._STREAMv2 (2)
                     optional  u32 0
                     optlen    u32 length of the optional data
    optional data    u32 config length, then the domain config as libxl JSON
                     (libxl_domain_config_to_json), NUL included in the length
    libxl stream v2  ident u64 0x4c6962786c466d74 ("LibxlFmt"), version u32 2,
    (header: big-    options u32 0 -- then records, host order:
     endian)         type u32, length u32, body, zero padding to 8 octets
      LIBXC_CONTEXT  length 0; *followed* by libxc's whole stream, written
                     straight to the same fd by xc_domain_save
      libxc stream   image header (marker u64 ~0, id u32 "XENF", version u32 3,
                     options u16 -- big-endian), domain header (type u32 1 PV /
                     2 HVM, page_shift u16, xen major/minor u32), records
                     (type u32, length u32, body, padding to 8) up to its END
      EMULATOR_XENSTORE_DATA  HVM only, if the device model has physmap keys:
                     emulator header {id u32 2 = qemu-xen, index u32 0}, then
                     NUL-terminated key/value pairs relative to its xenstore dir
      EMULATOR_CONTEXT  HVM only: emulator header, then QEMU's
                     xen-save-devices-state output
      END            length 0

:func:`xl_header` and :func:`libxl_record` write the layers torpor writes
itself (xc_domain_save writes the libxc stream); :func:`read_save_file` walks
a whole file -- every header, every record, every length -- and refuses a
truncated, corrupt, foreign or unsupported one with an
:class:`~torpor.errors.ImageError` saying where and why.  It reads the page
data's framing but not the pages (their lengths are checked against the
file's size), so a 1 GiB guest is verified in milliseconds.
"""

from __future__ import annotations

import enum
import json
import os
import struct
import uuid
from collections import Counter
from collections.abc import Callable
from typing import IO, Any, Final

import attrs

from torpor.errors import ImageError

__all__ = [
    "EMULATOR_QEMU_UPSTREAM",
    "LIBXL_IDENT",
    "LIBXL_VERSION",
    "XL_MAGIC",
    "LibxcRecord",
    "LibxlRecord",
    "SaveFile",
    "config_for_save",
    "config_type",
    "emulator_record",
    "libxl_record",
    "libxl_stream_header",
    "read_save_file",
    "read_xl_header",
    "renamed_config",
    "sniff",
    "xl_header",
]

# -- xl (tools/xl/xl.h) ---------------------------------------------------------

#: ``savefileheader_magic``: 32 octets, the C string's own NUL not included.
XL_MAGIC: Final = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER: Final = 0x01020304
XL_MANDATORY_FLAG_JSON: Final = 1 << 0
XL_MANDATORY_FLAG_STREAMV2: Final = 1 << 1
XL_MANDATORY_FLAG_ALL: Final = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2
_XL_HDR: Final = struct.Struct("<32sIIII")  # x86: "domain's byte order" = little-endian

# -- libxl (libxl_sr_stream_format.h) -------------------------------------------

LIBXL_IDENT: Final = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION: Final = 2
LIBXL_OPT_BIG_ENDIAN: Final = 1 << 0
LIBXL_OPT_LEGACY: Final = 1 << 1
_LIBXL_HDR: Final = struct.Struct(">QII")
_REC: Final = struct.Struct("<II")  # libxl and libxc record headers alike
_EMU: Final = struct.Struct("<II")
EMULATOR_UNKNOWN: Final = 0
EMULATOR_QEMU_TRADITIONAL: Final = 1
EMULATOR_QEMU_UPSTREAM: Final = 2


class LibxlRecord(enum.IntEnum):
    END = 0
    LIBXC_CONTEXT = 1
    EMULATOR_XENSTORE_DATA = 2
    EMULATOR_CONTEXT = 3
    CHECKPOINT_END = 4
    CHECKPOINT_STATE = 5


# -- libxc (xg_sr_stream_format.h) ----------------------------------------------

_IHDR: Final = struct.Struct(">QIIHHI")
IHDR_MARKER: Final = 0xFFFFFFFFFFFFFFFF
IHDR_ID: Final = 0x58454E46  # "XENF"
#: The versions libxenguest 4.17 restores (2 is inferred-compatible, 3 written).
LIBXC_VERSIONS: Final = (2, 3)
IHDR_OPT_BIG_ENDIAN: Final = 1 << 0
_DHDR: Final = struct.Struct("<IHHII")
DHDR_TYPE_X86_PV: Final = 1
DHDR_TYPE_X86_HVM: Final = 2
#: xg_sr_stream_format.h: "Somewhat arbitrary - 128MB"; read_record refuses more.
REC_LENGTH_MAX: Final = 128 << 20
REC_TYPE_OPTIONAL: Final = 0x80000000


class LibxcRecord(enum.IntEnum):
    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


#: Records whose length is fixed (the restorer refuses any other).
_FIXED_LENGTH: Final = {
    LibxcRecord.END: 0,
    LibxcRecord.STATIC_DATA_END: 0,
    LibxcRecord.CHECKPOINT: 0,
    LibxcRecord.X86_PV_INFO: 8,
    LibxcRecord.X86_TSC_INFO: 24,
    LibxcRecord.SHARED_INFO: 4096,
}
#: X86_PV_VCPU_* records start with {vcpu_id u32, _res1 u32}.
_VCPU_RECORDS: Final = {
    LibxcRecord.X86_PV_VCPU_BASIC,
    LibxcRecord.X86_PV_VCPU_EXTENDED,
    LibxcRecord.X86_PV_VCPU_XSAVE,
    LibxcRecord.X86_PV_VCPU_MSRS,
}
#: Records that only a PV or only an HVM stream carries.
_PV_ONLY: Final = {
    LibxcRecord.X86_PV_INFO,
    LibxcRecord.X86_PV_P2M_FRAMES,
    LibxcRecord.SHARED_INFO,
    *_VCPU_RECORDS,
}
_HVM_ONLY: Final = {LibxcRecord.HVM_CONTEXT, LibxcRecord.HVM_PARAMS}
#: PAGE_DATA pfn words: type in the top nibble (XEN_DOMCTL_PFINFO_* >> 28).
PAGE_DATA_PFN_MASK: Final = 0x000FFFFFFFFFFFFF
_PAGE_TYPE_SHIFT: Final = 60
#: NOTAB, L1-L4 and pinned L1-L4: a page of data follows (page_type_has_stream_data).
_TYPES_WITH_DATA: Final = frozenset({0x0, 0x1, 0x2, 0x3, 0x4, 0x9, 0xA, 0xB, 0xC})
#: ... and BROKEN, XALLOC, XTAB: known, no data (is_known_page_type).
_KNOWN_TYPES: Final = _TYPES_WITH_DATA | {0xD, 0xE, 0xF}


def _pad(length: int) -> int:
    return -length % 8


# -- writing ---------------------------------------------------------------------


def config_for_save(config_json: str, *, preserve_domid: bool = False) -> bytes:
    """The optional data's config: libxl JSON, as ``xl save`` puts it in the file.

    xl's ``save_domain_core_begin`` sets ``c_info.domid`` to 0 unless ``-D``
    (so ``xl restore`` picks a fresh domid); the length written includes the
    trailing NUL.  The JSON must be an object with ``c_info`` and ``b_info``.
    """
    try:
        config = json.loads(config_json)
    except ValueError as e:
        raise ImageError(f"the domain configuration is not JSON: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("c_info"), dict):
        raise ImageError("the domain configuration has no c_info object")
    if not isinstance(config.get("b_info"), dict):
        raise ImageError("the domain configuration has no b_info object")
    if not preserve_domid and config["c_info"].get("domid", 0) != 0:
        config["c_info"]["domid"] = 0
        text = json.dumps(config, indent=4) + "\n"
    else:
        text = config_json  # libxl's own text, untouched
    data = text.encode()
    if b"\0" in data:
        raise ImageError("the domain configuration contains a NUL")
    return data + b"\0"


def renamed_config(config_json: str, name: str, *, fresh_uuid: bool = True) -> str:
    """libxl JSON for a copy of the guest under ``name``: ``c_info.name`` set and
    ``c_info.uuid`` fresh (as xl gives a config without a UUID one), so the two
    domains share neither a name nor ``/vm/<uuid>`` in xenstore.
    ``fresh_uuid=False``: the same guest under another name (a migration's
    ``NAME--incoming``, as xl's create_domain names it)."""
    try:
        config = json.loads(config_json)
    except ValueError as e:
        raise ImageError(f"the domain configuration is not JSON: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("c_info"), dict):
        raise ImageError("the domain configuration has no c_info object")
    config["c_info"]["name"] = name
    if fresh_uuid:
        config["c_info"]["uuid"] = str(uuid.uuid4())
    return json.dumps(config, indent=4) + "\n"


def read_xl_header(read: Callable[[int, str], bytes]) -> str:
    """xl's header and optional data from a stream (``xl migrate-receive``:
    create_domain's restore path reads them from the migration fd, then
    hands the rest to libxl): the config JSON.  ``read(n, what)`` returns
    exactly ``n`` octets."""
    magic, byteorder, mandatory, _optional, optlen = _XL_HDR.unpack(read(_XL_HDR.size, "xl header"))
    if magic != XL_MAGIC:
        raise ImageError(f"not an xl migration stream (magic {magic[:28]!r})")
    if byteorder != XL_BYTEORDER:
        raise ImageError(f"xl header: wrong byte order mark {byteorder:#010x}")
    bad = mandatory & ~XL_MANDATORY_FLAG_ALL
    if bad:
        raise ImageError(f"xl header: unsupported mandatory flags {bad:#x}")
    if not mandatory & XL_MANDATORY_FLAG_STREAMV2:
        raise ImageError("xl header: a legacy (v1) stream; only stream v2 is supported")
    if not mandatory & XL_MANDATORY_FLAG_JSON:
        raise ImageError("xl header: the stream carries no JSON domain configuration")
    if not 4 <= optlen <= 16 * 1024 * 1024:
        raise ImageError(f"xl header: optional data of {optlen} octets")
    optdata = read(optlen, "xl optional data")
    (clen,) = struct.unpack_from("<I", optdata)
    raw = optdata[4 : 4 + clen]
    if clen > len(optdata) - 4 or not raw.endswith(b"\0") or b"\0" in raw[:-1]:
        raise ImageError("xl config: not a NUL-terminated string inside the optional data")
    try:
        text = raw[:-1].decode()
        loaded = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise ImageError(f"xl config: not valid JSON ({e})") from e
    if not isinstance(loaded, dict) or not isinstance(loaded.get("c_info"), dict):
        raise ImageError("xl config: JSON without c_info")
    return text


def xl_header(config: bytes) -> bytes:
    """xl's header and optional data for ``config`` (from :func:`config_for_save`)."""
    optdata = struct.pack("<I", len(config)) + config
    flags = XL_MANDATORY_FLAG_STREAMV2 | (XL_MANDATORY_FLAG_JSON if config else 0)
    return _XL_HDR.pack(XL_MAGIC, XL_BYTEORDER, flags, 0, len(optdata)) + optdata


def libxl_stream_header() -> bytes:
    """libxl's stream header: ident, version 2, options 0 (big-endian fields)."""
    return _LIBXL_HDR.pack(LIBXL_IDENT, LIBXL_VERSION, 0)


def libxl_record(rtype: int, body: bytes = b"") -> bytes:
    """One libxl record: header, body, zero padding to 8 octets."""
    return _REC.pack(rtype, len(body)) + body + b"\0" * _pad(len(body))


def emulator_record(rtype: int, body: bytes, *, emulator: int = EMULATOR_QEMU_UPSTREAM) -> bytes:
    """An EMULATOR_* record: the emulator sub-header {id, index 0}, then ``body``."""
    return libxl_record(rtype, _EMU.pack(emulator, 0) + body)


def xenstore_data(pairs: list[tuple[str, str]]) -> bytes:
    """EMULATOR_XENSTORE_DATA's body: NUL-terminated key, value, key, value..."""
    out = bytearray()
    for key, value in pairs:
        if not key or key.startswith("/") or "\0" in key or "\0" in value:
            raise ImageError(f"invalid emulator xenstore key/value {key!r}={value!r}")
        out += key.encode() + b"\0" + value.encode() + b"\0"
    return bytes(out)


# -- reading ---------------------------------------------------------------------


@attrs.frozen
class SaveFile:
    """What :func:`read_save_file` found: every layer walked to its END."""

    path: str
    size: int
    mandatory_flags: int
    optional_flags: int
    config: dict[str, Any]
    #: the config exactly as stored (libxl JSON, without its NUL)
    config_json: str
    #: where libxl's stream starts (xl restore hands libxl the fd from here)
    stream_offset: int
    #: libxl records in order: (type, offset of the header, body length)
    libxl_records: tuple[tuple[int, int, int], ...]
    #: libxc's domain type: 1 x86 PV, 2 x86 HVM
    libxc_type: int
    libxc_version: int
    xen_version: tuple[int, int]
    page_shift: int
    #: libxc records by type name
    libxc_records: dict[str, int]
    pages: int
    pages_with_data: int
    emulator_context: int | None

    @property
    def guest_type(self) -> str:
        """libxl's domain type (pv, pvh, hvm) from the config, else PV / HVM from libxc."""
        t = config_type(self.config)
        if t is not None:
            return t
        return "pv" if self.libxc_type == DHDR_TYPE_X86_PV else "hvm"

    @property
    def name(self) -> str | None:
        n = self.config.get("c_info", {}).get("name")
        return n if isinstance(n, str) else None

    def summary(self) -> dict[str, Any]:
        return {
            "format": "xl",
            "bytes": self.size,
            "guest_type": self.guest_type,
            "name": self.name,
            "libxc_type": "x86_pv" if self.libxc_type == DHDR_TYPE_X86_PV else "x86_hvm",
            "xen_version": f"{self.xen_version[0]}.{self.xen_version[1]}",
            "pages": self.pages,
            "pages_with_data": self.pages_with_data,
            "libxl_records": [LibxlRecord(t).name for t, _o, _n in self.libxl_records],
            "emulator_context_bytes": self.emulator_context,
        }


def config_type(config: dict[str, Any]) -> str | None:
    """libxl's domain type in a domain config as JSON: ``c_info.type``, else the
    key of b_info's type union (libxl writes it as ``"type.hvm": {...}``)."""
    c_info = config.get("c_info")
    if isinstance(c_info, dict) and isinstance(c_info.get("type"), str):
        return str(c_info["type"])
    b_info = config.get("b_info")
    if isinstance(b_info, dict):
        for key in b_info:
            if isinstance(key, str) and key.startswith("type."):
                return str(key[len("type.") :])
    return None


def sniff(path: str | os.PathLike[str]) -> str:
    """``"xl"``, ``"torpor"`` (torpor's own image) or ``"unknown"``, from the first octets."""
    from torpor.image import IDENT

    with open(path, "rb") as f:
        head = f.read(len(XL_MAGIC))
    if head == XL_MAGIC:
        return "xl"
    if len(head) >= 8 and struct.unpack(">Q", head[:8])[0] == IDENT:
        return "torpor"
    return "unknown"


class _Reader:
    def __init__(self, f: IO[bytes], path: str, size: int) -> None:
        self.f = f
        self.path = path
        self.size = size

    @property
    def pos(self) -> int:
        return self.f.tell()

    def fail(self, what: str, at: int | None = None) -> ImageError:
        where = self.pos if at is None else at
        return ImageError(f"{self.path}: {what} (at offset {where})")

    def exact(self, n: int, what: str) -> bytes:
        at = self.pos
        if n > self.size - at:
            raise self.fail(
                f"truncated: {what} needs {n} octets, the file has {self.size - at} left", at
            )
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail(f"short read of {what}", at)
        return data

    def skip(self, n: int, what: str) -> None:
        at = self.pos
        if n > self.size - at:
            raise self.fail(
                f"truncated: {what} needs {n} octets, the file has {self.size - at} left", at
            )
        self.f.seek(n, os.SEEK_CUR)

    def padding(self, length: int, what: str) -> None:
        pad = self.exact(_pad(length), f"{what} padding")
        if pad.strip(b"\0"):
            raise self.fail(f"{what}: padding is not zero")


def read_save_file(path: str | os.PathLike[str]) -> SaveFile:
    """Walk an xl save file from xl's header to libxl's END, checking every length.

    :raises ImageError: naming the layer, the record and the offset of the
        first thing that is wrong (truncated, corrupt, foreign, unsupported,
        or octets after the END record).
    """
    p = os.fspath(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 -- closed below
    except OSError as e:
        raise ImageError(f"{p}: cannot open: {e.strerror}", cause=e) from e
    with f:
        size = os.fstat(f.fileno()).st_size
        return _walk(_Reader(f, p, size))


def _walk(r: _Reader) -> SaveFile:
    magic, byteorder, mandatory, optional, optlen = _XL_HDR.unpack(
        r.exact(_XL_HDR.size, "xl header")
    )
    if magic != XL_MAGIC:
        raise r.fail("not an xl save file (wrong magic)", 0)
    if byteorder != XL_BYTEORDER:
        raise r.fail(f"xl header: wrong byte order mark {byteorder:#010x}", 32)
    bad = mandatory & ~XL_MANDATORY_FLAG_ALL
    if bad:
        raise r.fail(f"xl header: unsupported mandatory flags {bad:#x} (xl refuses them too)", 36)
    if not mandatory & XL_MANDATORY_FLAG_STREAMV2:
        raise r.fail("xl header: a legacy (v1) stream; only migration stream v2 is supported", 36)
    config: dict[str, Any] = {}
    config_json = ""
    optdata = r.exact(optlen, "xl optional data")
    if optdata:
        if len(optdata) < 4:
            raise r.fail("xl optional data truncated (no config length)", _XL_HDR.size)
        (clen,) = struct.unpack_from("<I", optdata)
        if clen > len(optdata) - 4:
            raise r.fail(
                f"xl optional data: config length {clen} exceeds the {len(optdata) - 4} "
                "octets there",
                _XL_HDR.size,
            )
        raw = optdata[4 : 4 + clen]
        if mandatory & XL_MANDATORY_FLAG_JSON:
            if not raw.endswith(b"\0") or b"\0" in raw[:-1]:
                raise r.fail("xl config: JSON not NUL-terminated", _XL_HDR.size + 4)
            try:
                loaded = json.loads(raw[:-1].decode())
            except (UnicodeDecodeError, ValueError) as e:
                raise r.fail(f"xl config: not valid JSON ({e})", _XL_HDR.size + 4) from e
            if not isinstance(loaded, dict) or not isinstance(loaded.get("c_info"), dict):
                raise r.fail("xl config: JSON without c_info", _XL_HDR.size + 4)
            config = loaded
            config_json = raw[:-1].decode()
    stream_offset = r.pos
    ident, version, options = _LIBXL_HDR.unpack(r.exact(_LIBXL_HDR.size, "libxl stream header"))
    if ident != LIBXL_IDENT:
        raise r.fail(f"libxl stream: wrong ident {ident:#018x}", stream_offset)
    if version != LIBXL_VERSION:
        raise r.fail(f"libxl stream: version {version}, expected {LIBXL_VERSION}", stream_offset)
    if options & LIBXL_OPT_BIG_ENDIAN:
        raise r.fail("libxl stream: big-endian records (not x86)", stream_offset)
    if options & LIBXL_OPT_LEGACY:
        raise r.fail("libxl stream: a converted legacy stream is not supported", stream_offset)
    if options & ~(LIBXL_OPT_BIG_ENDIAN | LIBXL_OPT_LEGACY):
        raise r.fail(f"libxl stream: unknown options {options:#x}", stream_offset)

    records: list[tuple[int, int, int]] = []
    libxc: dict[str, Any] | None = None
    emu_context: int | None = None
    while True:
        at = r.pos
        rtype, length = _REC.unpack(r.exact(_REC.size, "libxl record header"))
        try:
            name = LibxlRecord(rtype).name
        except ValueError:
            raise r.fail(f"libxl stream: unknown record type {rtype:#x}", at) from None
        records.append((rtype, at, length))
        if rtype == LibxlRecord.LIBXC_CONTEXT:
            if length != 0:
                raise r.fail(f"libxl LIBXC_CONTEXT record has length {length}, not 0", at)
            if libxc is not None:
                raise r.fail("libxl stream: a second LIBXC_CONTEXT record", at)
            libxc = _walk_libxc(r)
            continue
        if rtype == LibxlRecord.END:
            if length != 0:
                raise r.fail(f"libxl END record has length {length}, not 0", at)
            break
        if rtype in (LibxlRecord.CHECKPOINT_END, LibxlRecord.CHECKPOINT_STATE):
            raise r.fail(f"libxl {name}: a checkpointed stream, not a save file", at)
        # EMULATOR_XENSTORE_DATA / EMULATOR_CONTEXT
        if libxc is None:
            raise r.fail(f"libxl {name} before the LIBXC_CONTEXT record", at)
        if length < _EMU.size:
            raise r.fail(f"libxl {name}: length {length} < the emulator header", at)
        emu_id, _index = _EMU.unpack(r.exact(_EMU.size, f"{name} emulator header"))
        if emu_id not in (EMULATOR_QEMU_TRADITIONAL, EMULATOR_QEMU_UPSTREAM):
            raise r.fail(f"libxl {name}: unknown emulator id {emu_id}", at)
        body = length - _EMU.size
        if rtype == LibxlRecord.EMULATOR_XENSTORE_DATA:
            data = r.exact(body, name)
            if body and not data.endswith(b"\0"):
                raise r.fail(f"libxl {name}: key/value data not NUL-terminated", at)
            if data.count(b"\0") % 2:
                raise r.fail(f"libxl {name}: a key without a value", at)
        else:
            if emu_context is not None:
                raise r.fail(f"libxl {name}: a second emulator context", at)
            r.skip(body, name)
            emu_context = body
        r.padding(length, f"libxl {name}")
    if libxc is None:
        raise r.fail("libxl stream: END without a LIBXC_CONTEXT record")
    if r.pos != r.size:
        raise r.fail(f"{r.size - r.pos} octets after the libxl END record")
    want = config_type(config)
    if want == "hvm" and emu_context is None:
        # libxl writes QEMU's state for HVM guests (not PVH: no QEMU)
        raise r.fail("an HVM guest's stream without an EMULATOR_CONTEXT record (QEMU's state)")
    is_pv = libxc["type"] == DHDR_TYPE_X86_PV
    if isinstance(want, str) and (want == "pv") != is_pv:
        raise r.fail(
            f"the config says a {want} guest but libxc's stream is "
            f"{'x86 PV' if is_pv else 'x86 HVM'}"
        )
    return SaveFile(
        path=r.path,
        size=r.size,
        mandatory_flags=mandatory,
        optional_flags=optional,
        config=config,
        config_json=config_json,
        stream_offset=stream_offset,
        libxl_records=tuple(records),
        libxc_type=libxc["type"],
        libxc_version=libxc["version"],
        xen_version=libxc["xen"],
        page_shift=libxc["page_shift"],
        libxc_records=dict(libxc["records"]),
        pages=libxc["pages"],
        pages_with_data=libxc["pages_with_data"],
        emulator_context=emu_context,
    )


def _walk_libxc(r: _Reader) -> dict[str, Any]:
    at = r.pos
    marker, ident, version, options, _r1, _r2 = _IHDR.unpack(
        r.exact(_IHDR.size, "libxc image header")
    )
    if marker != IHDR_MARKER or ident != IHDR_ID:
        raise r.fail("libxc stream: not a libxc image header (marker/id)", at)
    if version not in LIBXC_VERSIONS:
        raise r.fail(f"libxc stream: version {version} not in {LIBXC_VERSIONS}", at)
    if options & IHDR_OPT_BIG_ENDIAN:
        raise r.fail("libxc stream: big-endian (not x86)", at)
    at = r.pos
    dtype, page_shift, _res, major, minor = _DHDR.unpack(r.exact(_DHDR.size, "libxc domain header"))
    if dtype not in (DHDR_TYPE_X86_PV, DHDR_TYPE_X86_HVM):
        raise r.fail(f"libxc domain header: unknown guest type {dtype}", at)
    if page_shift != 12:
        raise r.fail(f"libxc domain header: page shift {page_shift}, expected 12", at)
    page = 1 << page_shift
    counts: Counter[str] = Counter()
    pages = with_data = 0
    seen_static_end = version < 3
    while True:
        at = r.pos
        rtype, length = _REC.unpack(r.exact(_REC.size, "libxc record header"))
        if length > REC_LENGTH_MAX:
            raise r.fail(
                f"libxc record {rtype:#x}: length {length:#x} exceeds the maximum "
                f"{REC_LENGTH_MAX:#x}",
                at,
            )
        try:
            rec = LibxcRecord(rtype)
        except ValueError:
            if not rtype & REC_TYPE_OPTIONAL:
                raise r.fail(f"libxc stream: unknown mandatory record {rtype:#x}", at) from None
            counts[f"optional-{rtype:#x}"] += 1
            r.skip(length + _pad(length), f"libxc record {rtype:#x}")
            continue
        counts[rec.name] += 1
        what = f"libxc {rec.name} record"
        fixed = _FIXED_LENGTH.get(rec)
        if fixed is not None and length != fixed:
            raise r.fail(f"{what}: length {length}, expected {fixed}", at)
        if (rec in _PV_ONLY and dtype != DHDR_TYPE_X86_PV) or (
            rec in _HVM_ONLY and dtype != DHDR_TYPE_X86_HVM
        ):
            raise r.fail(f"{what} in a {'PV' if dtype == 1 else 'HVM'} stream", at)
        if rec == LibxcRecord.PAGE_DATA:
            if not seen_static_end:
                raise r.fail(f"{what} before STATIC_DATA_END", at)
            if length < 8:
                raise r.fail(f"{what}: truncated (length {length})", at)
            count, _res1 = struct.unpack("<II", r.exact(8, f"{what} header"))
            if count < 1:
                raise r.fail(f"{what}: no pfns", at)
            if length < 8 + 8 * count:
                raise r.fail(f"{what}: length {length} too short for {count} pfns", at)
            words = struct.unpack(f"<{count}Q", r.exact(8 * count, f"{what} pfns"))
            n_data = 0
            for w in words:
                ptype = w >> _PAGE_TYPE_SHIFT
                if ptype not in _KNOWN_TYPES:
                    raise r.fail(
                        f"{what}: unknown page type {ptype:#x} for pfn {w & PAGE_DATA_PFN_MASK:#x}",
                        at,
                    )
                n_data += ptype in _TYPES_WITH_DATA
            if length != 8 + 8 * count + n_data * page:
                raise r.fail(
                    f"{what}: length {length} != header + {count} pfns + {n_data} pages", at
                )
            r.skip(n_data * page, f"{what} pages")
            pages += count
            with_data += n_data
        elif rec == LibxcRecord.HVM_PARAMS:
            if length < 8:
                raise r.fail(f"{what}: truncated (length {length})", at)
            (count,) = struct.unpack("<I", r.exact(4, what))
            if length != 8 + 16 * count:
                raise r.fail(f"{what}: length {length} != 8 + 16 x {count} params", at)
            r.skip(length - 4, what)
        elif rec in _VCPU_RECORDS:
            if length < 8:
                raise r.fail(f"{what}: shorter than its vcpu header", at)
            r.skip(length, what)
        else:
            r.skip(length, what)
        r.padding(length, what)
        if rec == LibxcRecord.STATIC_DATA_END:
            seen_static_end = True
        elif rec == LibxcRecord.END:
            break
    if not pages:
        raise r.fail("libxc stream: no PAGE_DATA records (no guest memory)")
    return {
        "type": dtype,
        "version": version,
        "xen": (major, minor),
        "page_shift": page_shift,
        "records": counts,
        "pages": pages,
        "pages_with_data": with_data,
    }

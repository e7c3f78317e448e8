"""torpor's save image: versioned, self-describing, length-framed, checksummed.

Modelled on libxl's migration stream v2 (xen docs/specs/libxl-migration-stream.pandoc):
a header, then records, each aligned to 8 octets, ending with an END record.
Unlike libxl's, every record carries its own CRC-32 and the END record the
SHA-256 of everything before it, so a truncated, corrupt or foreign file is
refused *before* anything is built from it.

::

    header   ident    u64  0x546f72706f72496d ("TorporIm"), big-endian
             version  u32  1
             options  u32  bit 0: 0 = little-endian records
    record   type     u32  (RecordType)
             length   u32  body length, without padding
             crc32    u32  zlib.crc32 of the body
             reserved u32  0
             body     length octets, then zero padding to a multiple of 8
    END      type 0, body = SHA-256 of every octet before this record

All record fields after the header are little-endian.  Bodies are JSON
(UTF-8) except ``MEMORY``, ``PAGE_DATA`` and ``DEVICE_MODEL``, which are raw
bytes.  A reader refuses an unknown record type only if it is marked
mandatory (type < 0x80000000).

A save holds the guest's memory in one ``MEMORY`` record.  A live migration's
stream (:class:`StreamWriter`, libxc's ``PAGE_DATA`` records in spirit)
instead sends it as it goes: ``DOMAIN`` first (it gives the memory's size),
then a ``PAGE_DATA`` record per batch of pages -- every page in the first
precopy round, the pages dirtied meanwhile in each later one, the last dirty
pages after the guest suspended -- then the suspended guest's state and
``END``.  A page sent again replaces what was sent before::

    PAGE_DATA  count    u32  pages in this record
               reserved u32  0
               pfns     count x u64, each below DOMAIN's memory_pages
               pages    count x 4096 octets, in the same order
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import attrs

from torpor.errors import ImageError

__all__ = [
    "IDENT",
    "PAGE_SIZE",
    "VERSION",
    "PartialFile",
    "RecordType",
    "SavedDomain",
    "StreamWriter",
    "read_image",
    "read_stream",
    "write_image",
    "write_partial",
]

IDENT = 0x546F72706F72496D  # "TorporIm"
VERSION = 1
_HDR = struct.Struct(">QII")
_REC = struct.Struct("<IIII")
#: No record body may exceed this (the largest is an HVM device model's RAM).
MAX_RECORD = 256 * 1024 * 1024
_OPTIONAL_BIT = 0x80000000
#: A guest page, as PAGE_DATA records carry them.
PAGE_SIZE = 4096
_PAGE_HDR = struct.Struct("<II")


class RecordType(enum.IntEnum):
    """Record types; bit 31 set = optional (a reader may skip it)."""

    END = 0
    DOMAIN = 1  # JSON: kind, name, uuid, hvm, emulation flags, vCPUs, pages, behaviour
    VCPUS = 2  # JSON: per-vCPU registers that matter (start_info canonical as a PFN)
    START_INFO = 3  # JSON: PV start_info frames (canonical: PFNs)
    HVM_PARAMS = 4  # JSON: {param: value}
    MEMORY = 5  # raw guest memory, pfn 0 upwards
    GUEST = 6  # JSON: the guest kernel's own state (sim) / guest config (real)
    DEVICE_MODEL = 7  # raw device-model state (QEMU's stream)
    PAGE_DATA = 8  # a live stream's pages: u32 count, u32 0, count x u64 pfn, the pages
    SOURCE = _OPTIONAL_BIT | 1  # JSON: where and when it was saved (informational)


_JSON_RECORDS = {
    RecordType.DOMAIN,
    RecordType.VCPUS,
    RecordType.START_INFO,
    RecordType.HVM_PARAMS,
    RecordType.GUEST,
    RecordType.SOURCE,
}


@attrs.frozen
class SavedDomain:
    """A suspended domain's state, as a builder saved it and will restore it.

    :param domain: DOMAIN record (must have ``kind``).
    :param vcpus: VCPUS record.
    :param memory: MEMORY record.
    """

    domain: dict[str, Any]
    vcpus: list[dict[str, Any]] = attrs.Factory(list)
    start_info: dict[str, Any] | None = None
    hvm_params: dict[str, int] = attrs.Factory(dict)
    memory: bytes = b""
    guest: dict[str, Any] = attrs.Factory(dict)
    device_model: bytes | None = None
    source: dict[str, Any] = attrs.Factory(dict)

    @property
    def kind(self) -> str:
        return str(self.domain["kind"])

    def memory_checksum(self) -> str:
        """SHA-256 of the guest's memory alone (what the guest sees of itself)."""
        return hashlib.sha256(self.memory).hexdigest()

    def checksum(self) -> str:
        """SHA-256 of the guest's memory (and device-model state): what must arrive."""
        h = hashlib.sha256(self.memory)
        if self.device_model is not None:
            h.update(self.device_model)
        return h.hexdigest()


def _records(saved: SavedDomain) -> Iterator[tuple[RecordType, bytes]]:
    def js(obj: Any) -> bytes:
        return json.dumps(obj, sort_keys=True).encode()

    yield RecordType.SOURCE, js(saved.source)
    yield RecordType.DOMAIN, js(saved.domain)
    yield RecordType.VCPUS, js(saved.vcpus)
    if saved.start_info is not None:
        yield RecordType.START_INFO, js(saved.start_info)
    yield RecordType.HVM_PARAMS, js(saved.hvm_params)
    yield RecordType.GUEST, js(saved.guest)
    yield RecordType.MEMORY, saved.memory
    if saved.device_model is not None:
        yield RecordType.DEVICE_MODEL, saved.device_model


def encode(saved: SavedDomain) -> Iterator[bytes]:
    """The image, as a stream of chunks (for a file, a pipe or a socket)."""
    chunks: list[bytes] = []
    writer = StreamWriter(chunks.append)
    yield from chunks
    for rtype, body in _records(saved):
        chunks.clear()
        writer.record(rtype, body)
        yield from chunks
    chunks.clear()
    writer.end()
    yield from chunks


def page_data(pfns: Sequence[int], pages: bytes) -> bytes:
    """A ``PAGE_DATA`` record's body: ``pages`` holds one 4096-octet page per pfn."""
    if len(pages) != len(pfns) * PAGE_SIZE:
        raise ImageError(f"{len(pfns)} pfns but {len(pages)} octets of pages")
    return _PAGE_HDR.pack(len(pfns), 0) + struct.pack(f"<{len(pfns)}Q", *pfns) + pages


class StreamWriter:
    """An image written record by record as it is produced (a live migration's stream).

    The header is written at once; :meth:`end` writes the END record with the
    SHA-256 of everything before it.  ``write`` gets each chunk in order (a
    pipe, a socket, a transfer to another host); :attr:`size` counts them.
    """

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self._digest = hashlib.sha256()
        self.size = 0
        self._put(_HDR.pack(IDENT, VERSION, 0))

    def _put(self, chunk: bytes, *, digest: bool = True) -> None:
        if digest:
            self._digest.update(chunk)
        self._write(chunk)
        self.size += len(chunk)

    def record(self, rtype: RecordType, body: bytes) -> None:
        if len(body) > MAX_RECORD:
            raise ImageError(f"{rtype.name} record of {len(body)} bytes is too large")
        self._put(
            _REC.pack(rtype, len(body), zlib.crc32(body), 0) + body + b"\0" * (-len(body) % 8)
        )

    def json(self, rtype: RecordType, obj: Any) -> None:
        self.record(rtype, json.dumps(obj, sort_keys=True).encode())

    def pages(self, pfns: Sequence[int], pages: bytes) -> None:
        """One ``PAGE_DATA`` record (pages sent again replace those sent before)."""
        self.record(RecordType.PAGE_DATA, page_data(pfns, pages))

    def end(self) -> None:
        end = self._digest.digest()
        self._put(_REC.pack(RecordType.END, len(end), zlib.crc32(end), 0) + end, digest=False)


class PartialFile:
    """A save file while it is written: a new file next to its target, renamed
    over the target only when complete.

    It is created before the guest is touched, so a place torpor cannot write
    (no such directory, no permission, the target a directory) fails at once,
    as xl opens its file before it suspends.  ``mkstemp``: ``O_EXCL``, mode
    0600 and a name of its own, so no planted symlink or second save of the
    same target gets in its way.  A failed save never touches the target: a
    file already there stays as it was.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = os.path.abspath(target)
        if os.path.isdir(self.target):
            raise ImageError(f"cannot write save file {os.fspath(target)}: it is a directory")
        directory, base = os.path.split(self.target)
        try:
            self._fd, self.path = tempfile.mkstemp(dir=directory, prefix=f".{base}.torpor-partial-")
        except OSError as e:
            raise ImageError(
                f"cannot write save file {os.fspath(target)}: {e.strerror or e}", cause=e
            ) from e
        self.committed = False

    def take_fd(self) -> int:
        """The open file descriptor, now the caller's to close."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            raise ValueError("the partial file's descriptor was already taken")
        return fd

    def commit(self) -> None:
        """Rename the complete file over the target (ImageError if it cannot be)."""
        try:
            os.replace(self.path, self.target)
        except OSError as e:
            raise ImageError(
                f"cannot write save file {self.target}: {e.strerror or e}", cause=e
            ) from e
        self.committed = True

    def discard(self) -> None:
        """Close and remove what is left (nothing once committed); idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        if not self.committed:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def write_partial(saved: SavedDomain, partial: PartialFile) -> int:
    """Write the image into ``partial`` and fsync it; its size.  Not renamed:
    the caller verifies ``partial.path`` and then commits."""
    size = 0
    try:
        with os.fdopen(partial.take_fd(), "wb") as f:
            for chunk in encode(saved):
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ImageError(
            f"cannot write save image {partial.target}: {e.strerror or e}", cause=e
        ) from e
    return size


def write_image(saved: SavedDomain, path: str | os.PathLike[str]) -> int:
    """Write the image to ``path`` atomically (a :class:`PartialFile`, fsync,
    rename); its size.  On failure ``path`` is untouched."""
    partial = PartialFile(path)
    try:
        size = write_partial(saved, partial)
        partial.commit()
        return size
    finally:
        partial.discard()


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ImageError(f"save image is truncated ({what}: {len(data)} of {n} bytes)")
    return data


def decode(f: IO[bytes]) -> SavedDomain:
    """Parse and verify a whole image from a stream; ImageError on any defect."""
    digest = hashlib.sha256()
    head = f.read(_HDR.size)
    if len(head) < _HDR.size:
        raise ImageError("not a torpor save image: shorter than its header")
    ident, version, options = _HDR.unpack(head)
    if ident != IDENT:
        raise ImageError(
            f"not a torpor save image (ident {head[:8]!r}; xl's files start 'Xen saved domain')"
        )
    if version != VERSION:
        raise ImageError(
            f"torpor save image version {version} is not supported (this "
            f"torpor reads version {VERSION})"
        )
    if options & 1:
        raise ImageError("big-endian torpor save images are not supported")
    digest.update(head)
    fields: dict[RecordType, Any] = {}
    while True:
        rhead = _read_exact(f, _REC.size, "record header")
        rtype, length, crc, _reserved = _REC.unpack(rhead)
        if length > MAX_RECORD:
            raise ImageError(f"record of type {rtype:#x} claims {length} bytes: corrupt image")
        body = _read_exact(f, length, f"record {rtype:#x}")
        if zlib.crc32(body) != crc:
            raise ImageError(f"record of type {rtype:#x} fails its CRC-32: corrupt image")
        if rtype == RecordType.END:
            if body != digest.digest():
                raise ImageError("save image checksum (SHA-256) mismatch: corrupt image")
            if f.read(1):
                raise ImageError("data after the END record: corrupt image")
            break
        pad = _read_exact(f, -length % 8, "padding")
        digest.update(rhead)
        digest.update(body)
        digest.update(pad)
        try:
            kind = RecordType(rtype)
        except ValueError:
            if rtype & _OPTIONAL_BIT:
                continue
            raise ImageError(f"unknown mandatory record type {rtype:#x}") from None
        if kind == RecordType.PAGE_DATA:
            _apply_pages(fields, body)
            continue
        if kind in fields:
            raise ImageError(f"duplicate {kind.name} record")
        if kind == RecordType.MEMORY and RecordType.PAGE_DATA in fields:
            raise ImageError("MEMORY record in a stream that sent PAGE_DATA")
        if kind in _JSON_RECORDS:
            try:
                fields[kind] = json.loads(body)
            except ValueError as e:
                raise ImageError(f"{kind.name} record is not valid JSON", cause=e) from e
        else:
            fields[kind] = body
    if RecordType.PAGE_DATA in fields:
        fields[RecordType.MEMORY] = bytes(fields.pop(RecordType.PAGE_DATA))
    for required in (RecordType.DOMAIN, RecordType.VCPUS, RecordType.MEMORY):
        if required not in fields:
            raise ImageError(f"save image has no {required.name} record")
    domain = fields[RecordType.DOMAIN]
    if not isinstance(domain, dict) or not isinstance(domain.get("kind"), str):
        raise ImageError("DOMAIN record does not name the guest type")
    return SavedDomain(
        domain=domain,
        vcpus=fields[RecordType.VCPUS],
        start_info=fields.get(RecordType.START_INFO),
        hvm_params={str(k): int(v) for k, v in fields.get(RecordType.HVM_PARAMS, {}).items()},
        memory=fields[RecordType.MEMORY],
        guest=fields.get(RecordType.GUEST, {}),
        device_model=fields.get(RecordType.DEVICE_MODEL),
        source=fields.get(RecordType.SOURCE, {}),
    )


def _apply_pages(fields: dict[RecordType, Any], body: bytes) -> bytearray:
    """Put a ``PAGE_DATA`` record's pages in the memory it is building."""
    domain = fields.get(RecordType.DOMAIN)
    if not isinstance(domain, dict):
        raise ImageError("PAGE_DATA record before the DOMAIN record")
    if RecordType.MEMORY in fields:
        raise ImageError("PAGE_DATA record in an image that has a MEMORY record")
    memory = fields.get(RecordType.PAGE_DATA)
    if memory is None:
        pages = domain.get("memory_pages")
        if type(pages) is not int or not 0 <= pages <= MAX_RECORD // PAGE_SIZE:
            raise ImageError(f"DOMAIN record's memory_pages {pages!r} is not a page count")
        memory = fields[RecordType.PAGE_DATA] = bytearray(pages * PAGE_SIZE)
    if len(body) < _PAGE_HDR.size:
        raise ImageError("PAGE_DATA record shorter than its header")
    count, _reserved = _PAGE_HDR.unpack_from(body)
    if len(body) != _PAGE_HDR.size + count * (8 + PAGE_SIZE):
        raise ImageError(f"PAGE_DATA record of {len(body)} octets cannot hold {count} pages")
    pfns = struct.unpack_from(f"<{count}Q", body, _PAGE_HDR.size)
    data = memoryview(body)[_PAGE_HDR.size + 8 * count :]
    limit = len(memory) // PAGE_SIZE
    for i, pfn in enumerate(pfns):
        if pfn >= limit:
            raise ImageError(f"PAGE_DATA pfn {pfn:#x} is beyond the guest's {limit} pages")
        memory[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
    assert isinstance(memory, bytearray)
    return memory


def read_stream(read: Callable[[int, str], bytes]) -> bytes:
    """An image from a stream that goes on after it (a migration's channel):
    read record by record up to and including END, not one octet more.  The
    octets are returned unchecked: :func:`decode` checks them."""
    out = bytearray(read(_HDR.size, "image header"))
    ident, _version, _options = _HDR.unpack(out)
    if ident != IDENT:
        raise ImageError(
            f"not a torpor image stream (ident {bytes(out[:8])!r}; xl's start 'Xen saved domain')"
        )
    while True:
        rhead = read(_REC.size, "record header")
        out += rhead
        rtype, length, _crc, _reserved = _REC.unpack(rhead)
        if length > MAX_RECORD:
            raise ImageError(f"record of type {rtype:#x} claims {length} bytes: corrupt stream")
        if rtype == RecordType.END:
            out += read(length, "END record")
            return bytes(out)
        out += read(length + (-length % 8), f"record {rtype:#x}")


def read_image(path: str | os.PathLike[str]) -> SavedDomain:
    """Read and verify a save image file (ImageError if missing or defective)."""
    try:
        with open(path, "rb") as f:
            return decode(f)
    except OSError as e:
        raise ImageError(
            f"cannot read save image {os.fspath(path)}: {e.strerror or e}", cause=e
        ) from e

"""The save directory of ``torpor host save-all`` / ``restore-all``: its manifest and reports.

What :mod:`torpor.operations.hostwide` writes and reads, apart from the
operations themselves: the guest filter (``--only`` / ``--except``), each
guest's outcome and the host-wide report, and ``DIR/manifest.json`` -- written
atomically (a temporary file, ``fsync``, ``rename``, ``fsync`` of DIR, as a
host may lose power at any point), read back with its format checked -- the
images' names and SHA-256, and the directory's lock file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from torpor.errors import (
    ImageError,
    TorporError,
    UsageError,
)
from torpor.model import Result

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator


log = logging.getLogger("torpor")

#: The manifest's file name in the save directory, and its format.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "torpor-host-manifest"
MANIFEST_VERSION = 1
#: where restore-all moves the manifest once nothing in it is left to restore
DONE = "manifest.restored.json"
LOCK = ".torpor-host.lock"
RESERVE = ".torpor-host.reserve"
IMAGE_SUFFIX = ".save"

#: Saves (or restores) in flight at once by default: chosen from the
#: measurements in docs/performance.md ("Host-wide save and restore").
DEFAULT_CONCURRENCY = 4

#: How long a guest asked to power off (``shutdown_fallback``) may take; as
#: xendomains' XENDOMAINS_STOP_MAXWAIT (300 s).
DEFAULT_SHUTDOWN_TIMEOUT = 300.0


# ---------------------------------------------------------------------------
# which guests


@attrs.frozen
class GuestFilter:
    """Which guests an operation takes: ``only`` (none: all) minus ``exclude``.

    Each item is a domain name, a domid (all digits), or a regular expression
    written ``re:PATTERN`` and matched against the whole name.
    """

    only: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def parse(cls, only: Sequence[str] = (), exclude: Sequence[str] = ()) -> GuestFilter:
        """Items may also be comma-separated (``--only a,b``); a bad regex is a UsageError."""

        def items(values: Sequence[str]) -> tuple[str, ...]:
            out: list[str] = []
            for value in values:
                for raw in value.split(","):
                    item = raw.strip()
                    if not item:
                        continue
                    if item.startswith("re:"):
                        try:
                            re.compile(item[3:])
                        except re.error as e:
                            raise UsageError(f"invalid regular expression {item!r}: {e}") from None
                    out.append(item)
            return tuple(out)

        return cls(only=items(only), exclude=items(exclude))

    @staticmethod
    def _hit(item: str, name: str, domid: int | None) -> bool:
        if item.startswith("re:"):
            return re.fullmatch(item[3:], name) is not None
        if item.isascii() and item.isdigit():
            return domid is not None and int(item) == domid
        return item == name

    def selects(self, name: str, domid: int | None) -> bool:
        if self.only and not any(self._hit(i, name, domid) for i in self.only):
            return False
        return not any(self._hit(i, name, domid) for i in self.exclude)

    def __bool__(self) -> bool:
        return bool(self.only or self.exclude)


# ---------------------------------------------------------------------------
# what happened to each guest


@attrs.frozen
class GuestOutcome:
    """What a host-wide operation did with one guest.

    ``outcome`` -- save-all: ``saved``, ``left running`` (refused, timed out,
    failed: the save resumed it), ``shut down`` (the fallback powered it off),
    ``not running`` (not saved: it was suspended, crashed...), ``excluded``;
    restore-all: ``restored``, ``skipped`` (the image failed verification),
    ``refused`` (a domain has its name), ``failed`` (the restore failed; the
    image is kept), ``not saved`` (save-all never saved it), ``unlisted``
    (an image file the manifest does not name), ``stale``, ``excluded``,
    ``restored earlier``.  ``state`` is the domain's state as observed
    afterwards (``destroyed`` once saved; the new domain's once restored).
    """

    name: str
    domid: int | None
    guest_type: str
    outcome: str
    ok: bool
    state: str
    image: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    seconds: float = 0.0
    new_domid: int | None = None
    detail: str = ""
    error: TorporError | None = attrs.field(default=None, eq=False)
    result: Result | None = attrs.field(default=None, eq=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "domid": self.domid,
            "guest_type": self.guest_type,
            "outcome": self.outcome,
            "ok": self.ok,
            "state": self.state,
            "seconds": round(self.seconds, 6),
        }
        for key in ("image", "bytes", "sha256", "new_domid"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.detail:
            out["detail"] = self.detail
        if self.error is not None:
            out["error"] = self.error.to_dict()
        return out


@attrs.frozen
class Progress:
    """Totals so far, handed to the progress callback with each guest's outcome."""

    done: int
    total: int
    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second since the start."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@attrs.frozen
class HostReport:
    """The result of :func:`save_all` or :func:`restore_all`: every guest, in order."""

    operation: str
    directory: str
    guests: tuple[GuestOutcome, ...]
    seconds: float
    bytes: int
    concurrency: int
    #: problems with the manifest itself (it could not be written...)
    warnings: tuple[str, ...] = ()
    #: what else the operator should know (no manifest, the manifest archived...)
    notes: tuple[str, ...] = ()

    @property
    def attempted(self) -> tuple[GuestOutcome, ...]:
        """The guests the operation was about (not the excluded ones)."""
        return tuple(g for g in self.guests if g.outcome not in ("excluded", "restored earlier"))

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.guests) and not self.warnings

    def count(self, outcome: str) -> int:
        return sum(1 for g in self.guests if g.outcome == outcome)

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for g in self.guests:
            counts[g.outcome] = counts.get(g.outcome, 0) + 1
        return {
            "operation": self.operation,
            "directory": self.directory,
            "ok": self.ok,
            "guests": len(self.attempted),
            "counts": counts,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "bytes_per_second": round(self.rate, 1),
            "concurrency": self.concurrency,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


OnGuest = Callable[[GuestOutcome, Progress], None]


# ---------------------------------------------------------------------------
# the manifest


def image_name(name: str, domid: int) -> str:
    """The image's file name in the save directory: the domain's name where it is
    a safe file name, else a safe form of it plus a digest (names are unique on a
    host, so are these)."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    if not name:
        safe = f"domain-{domid}"
    elif safe != name or safe.startswith(".") or safe == MANIFEST:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        safe = f"{safe.lstrip('.') or 'domain'}-{digest}"
    return safe + IMAGE_SUFFIX


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    """``DIR/manifest.json``, atomically: a temporary file, fsync, rename, fsync DIR."""
    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{MANIFEST}.")
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(directory, MANIFEST))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest in ``directory`` (``None``: there is none); ImageError if it is
    not one this torpor reads."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}", cause=e) from e
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ImageError(f"{path} is not valid JSON: {e}", cause=e) from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ImageError(f"{path} is not a torpor host manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ImageError(
            f"{path} is manifest version {manifest.get('version')!r}; this torpor reads "
            f"version {MANIFEST_VERSION}"
        )
    guests = manifest.get("guests")
    if not isinstance(guests, list) or not all(
        isinstance(g, dict) and isinstance(g.get("name"), str) for g in guests
    ):
        raise ImageError(f"{path}: 'guests' is not a list of guests")
    return manifest


def file_digest(path: str) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class _Manifest:
    """The manifest of one run, rewritten (atomically) as each guest completes.

    A reserve file holds some space in DIR from the start: when the disk fills
    up (an image took the last of it), the reserve is given back and the
    manifest written again, so the guests saved so far stay on record.
    """

    def __init__(self, directory: str, data: dict[str, Any], *, reserve: int = 0) -> None:
        self.directory = directory
        self.data = data
        self.lock = asyncio.Lock()
        self.warnings: list[str] = []
        self._reserve = os.path.join(directory, RESERVE)
        if reserve:
            with contextlib.suppress(OSError):
                fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, reserve)
                finally:
                    os.close(fd)

    def release_reserve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._reserve)

    def _write(self) -> None:
        try:
            write_manifest(self.directory, self.data)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not os.path.exists(self._reserve):
                raise
            log.warning("%s: disk full; the reserve released for the manifest", self.directory)
            self.release_reserve()
            write_manifest(self.directory, self.data)

    async def save(self) -> None:
        async with self.lock:
            try:
                await asyncio.to_thread(self._write)
            except OSError as e:
                msg = (
                    f"cannot write {os.path.join(self.directory, MANIFEST)}: "
                    f"{e.strerror or e}; its last good version stays"
                )
                log.error("%s", msg)
                if msg not in self.warnings:
                    self.warnings.append(msg)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _xen_versions(orch: Orchestrator) -> dict[str, Any]:
    """What the manifest records of Xen: the hypervisor's version (read through
    libxenctrl where the host has it) and the libraries torpor found."""
    from torpor.versions import xen_libraries

    hv = orch.host.hypervisor
    version = getattr(hv, "xen_version", None)
    hypervisor: str | None = None
    if callable(version):
        try:
            hypervisor = str(version())
        except TorporError as e:
            hypervisor = f"unknown ({e.message})"
    elif orch.host.name.startswith("sim:") or "sim" in getattr(hv, "name", ""):
        hypervisor = "simulated"
    return {"hypervisor": hypervisor, "libraries": xen_libraries()}


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    path = os.path.join(directory, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise UsageError(
                f"{directory} is in use: {holder} holds {path} (a save-all or restore-all "
                "runs there)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"torpor pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _prepare_dir(directory: str | os.PathLike[str], *, create: bool) -> str:
    d = os.path.abspath(os.fspath(directory))
    if create:
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {d}: {e.strerror or e}") from None
    if not os.path.isdir(d):
        raise UsageError(f"{d} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UsageError(f"no permission to write in {d}")
    return d


def _carried(old: dict[str, Any] | None, directory: str, present: set[str]) -> list[dict[str, Any]]:
    """Entries of an earlier manifest still to be restored: saved, not restored,
    the image still there.  One whose name a domain on the host has now is
    ``stale`` (restoring it would bring back an old copy of a guest that went
    on): kept on record, its image kept, never restored."""
    if old is None:
        return []
    out = []
    for was in old.get("guests", []):
        if was.get("status") not in ("saved", "stale") or not was.get("image"):
            continue
        if not os.path.exists(os.path.join(directory, str(was["image"]))):
            continue
        g = dict(was, carried=True)
        if g["name"] in present and g.get("status") == "saved":
            g["status"] = "stale"
            g["detail"] = (
                f"saved {g.get('saved_at', '?')} and never restored, but a domain named "
                f"{g['name']!r} ran when save-all ran again ({_now()}): not restored"
            )
        out.append(g)
    return out


def _torpor_version() -> str:
    from torpor import __version__

    return __version__


def _entry_of(o: GuestOutcome) -> dict[str, Any]:
    out: dict[str, Any] = {
        "status": "saved" if o.outcome == "saved" else "not saved",
        "outcome": o.outcome,
        "state": o.state,
        "seconds": round(o.seconds, 3),
    }
    if o.outcome == "saved":
        out.update(bytes=o.bytes, sha256=o.sha256, saved_at=_now())
    else:
        out["image"] = None
    if o.result is not None and o.result.method is not None:
        out["method"] = str(o.result.method)
    if o.detail:
        out["detail"] = o.detail
    if o.error is not None:
        out["error"] = o.error.to_dict()
    return out


def _remove_image(directory: str, image: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, image))
    _fsync_dir(directory)


def _leftovers(directory: str, entries: list[dict[str, Any]]) -> list[GuestOutcome]:
    """Image files the manifest does not name, and partial files a save that never
    finished left (removed: they are incomplete by construction)."""
    named = {str(e.get("image")) for e in entries if e.get("image")}
    pending = {image_name(str(e["name"]), int(e.get("domid") or 0)) for e in entries}
    out = []
    for fn in sorted(os.listdir(directory)):
        if fn.startswith(".") and ".torpor-partial-" in fn:
            target = fn[1:].split(".torpor-partial-", 1)[0]
            if target in pending or target in named:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, fn))
                log.info("removed %s: a save that never finished", fn)
            continue
        if fn.endswith(IMAGE_SUFFIX) and fn not in named:
            out.append(
                GuestOutcome(
                    fn.removesuffix(IMAGE_SUFFIX),
                    None,
                    "?",
                    "unlisted",
                    False,
                    "not restored",
                    image=fn,
                    detail=f"{fn} is not in {MANIFEST}: not restored, left in place",
                )
            )
    return out

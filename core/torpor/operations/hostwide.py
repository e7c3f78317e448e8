"""The host's lifecycle: every guest saved at shutdown, brought back at boot.

What Xen's ``xendomains`` script does (tools/hotplug/Linux/xendomains.in:
``xl save`` of each domain in turn at stop, ``xl restore`` of each file at
start), built on torpor's own :mod:`.save` and :mod:`.restore` -- every
check, deadline, cancel and rollback of one save applies to each guest --
and run concurrently, with a bound:

``save_all(DIR)``
    lists the host's guest domains (dom0 left out), picks those the filter
    selects, writes ``DIR/manifest.json`` naming each one ``pending``, then
    saves them, at most ``concurrency`` at a time (and, with ``max_rate``,
    starting a save only when the bytes already started fit the rate since
    the start).  Each save writes ``DIR/<name>.save`` (xl's format on real
    Xen, torpor's image on a simulated host), verified before the domain is
    destroyed; the manifest is then rewritten *atomically* (a temporary
    file, ``fsync``, ``rename``, ``fsync`` of DIR) with the image, its size
    and SHA-256.  A guest that refuses or times out is resumed where it was
    by the save itself and reported ``left running`` -- or, with
    ``shutdown_fallback``, asked to power off (``control/shutdown`` =
    ``poweroff``, as ``xl shutdown`` does; QMP ``system_powerdown`` for an
    HVM guest without PV drivers) and waited for, as xendomains does.
    Guests that are not running (suspended, crashed...) are reported too:
    nothing on the host is left out of the report.

``restore_all(DIR)``
    reads the manifest, and for each guest saved there, in the manifest's
    order: verifies the image (size, SHA-256, then the format's own walk by
    the restore), restores it (refused, ``NameInUse``, if a domain has its
    name), and removes the image only once the guest runs in its new domain,
    recording that in the manifest.  Guests the manifest names but never
    saved (``pending``: the host lost power mid-way; ``not saved``) and image
    files it does not name are reported, never silently dropped.

A lock file (``DIR/.torpor-host.lock``) keeps two of these off one directory.
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
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from torpor.engine import observed_state
from torpor.errors import (
    HypervisorError,
    ImageError,
    TorporError,
    UnsupportedGuest,
    UsageError,
)
from torpor.model import Result
from torpor.monitor import Waker

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator

__all__ = [
    "DEFAULT_CONCURRENCY",
    "IMAGE_SUFFIX",
    "MANIFEST",
    "GuestFilter",
    "GuestOutcome",
    "HostReport",
    "Progress",
    "read_manifest",
    "restore_all",
    "save_all",
]

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


# ---------------------------------------------------------------------------
# save-all


class _Pacer:
    """Start saves no faster than ``rate`` bytes per second, on average.

    A save's image is written at full speed once started (on real Xen
    ``xc_domain_save`` writes it); the pacing is in when each starts: the
    bytes of the saves already started (estimated from each domain's memory
    until its real size is known) never run ahead of ``rate`` times the time
    since the first started.
    """

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.t0: float | None = None
        self.committed = 0.0

    async def admit(self, estimate: int) -> None:
        if not self.rate:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.t0 is None:
            self.t0 = now
        start_at = self.t0 + self.committed / self.rate
        self.committed += estimate
        if start_at > now:
            # A deliberate delay (the rate cap), not a wait for an event.
            await asyncio.sleep(start_at - now)

    def settle(self, estimate: int, actual: int) -> None:
        self.committed += actual - estimate


@attrs.define
class _Candidate:
    domid: int
    name: str
    guest_type: str
    state: str
    alive: bool
    estimate: int


async def _host_guests(orch: Orchestrator) -> list[_Candidate]:
    """Every guest domain (dom0 left out), in domid order, as observed now."""
    xs = orch.host.xenstore.aio
    out: list[_Candidate] = []
    infos = sorted(orch.host.hypervisor.domain_info_list(), key=lambda i: i.domid)
    for info in infos:
        if info.domid == 0:
            continue
        try:
            gt: str = (await orch.classify(info)).name
        except UnsupportedGuest:
            gt = "?"
        name = await xs.read_or(f"/local/domain/{info.domid}/name", "")
        s3 = not info.shutdown and orch._in_s3(info)
        state = "S3" if s3 else info.state_word()
        out.append(
            _Candidate(
                domid=info.domid,
                name=name,
                guest_type=gt,
                state=state,
                alive=not info.shutdown and not info.dying,
                estimate=max(info.tot_pages, 1) * 4096,
            )
        )
    return out


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


async def save_all(
    orch: Orchestrator,
    directory: str | os.PathLike[str],
    *,
    select: GuestFilter | None = None,
    concurrency: int | None = None,
    max_rate: float | None = None,
    shutdown_fallback: bool = False,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    on_guest: OnGuest | None = None,
) -> HostReport:
    """Save every running guest of the host (or those ``select`` picks) into ``directory``.

    See the module's docstring.  Never raises for one guest's failure: each
    guest's outcome is in the report (and the manifest).
    """
    orch._check_loop()
    select = select or GuestFilter()
    width = _width(concurrency)
    if max_rate is not None and not max_rate > 0:
        raise UsageError(f"max_rate must be a positive number of bytes per second, not {max_rate}")
    d = _prepare_dir(directory, create=True)
    t0 = time.perf_counter()
    with _locked(d):
        old = await asyncio.to_thread(read_manifest, d)
        guests = await _host_guests(orch)
        present = {g.name for g in guests if g.name}
        outcomes: dict[int, GuestOutcome] = {}
        chosen: list[_Candidate] = []
        for g in guests:
            if not select.selects(g.name, g.domid):
                outcomes[g.domid] = GuestOutcome(
                    g.name, g.domid, g.guest_type, "excluded", True, g.state
                )
            elif not g.alive:
                outcomes[g.domid] = GuestOutcome(
                    g.name,
                    g.domid,
                    g.guest_type,
                    "not running",
                    False,
                    g.state,
                    detail=f"domain is {g.state}: only running guests are saved",
                )
            else:
                chosen.append(g)
        entries: dict[int, dict[str, Any]] = {
            g.domid: {
                "name": g.name,
                "domid": g.domid,
                "guest_type": g.guest_type,
                "status": "pending",
                "image": image_name(g.name, g.domid),
            }
            for g in chosen
        }
        carried = _carried(old, d, present)
        manifest = _Manifest(
            d,
            {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "torpor": _torpor_version(),
                "xen": _xen_versions(orch),
                "host": orch.host.name,
                "hostname": socket.gethostname(),
                "started": _now(),
                "finished": None,
                "complete": False,
                "concurrency": width,
                # restore-all restores in this order: what an earlier run left
                # first, then this run's guests in domid order
                "guests": [*carried, *(entries[g.domid] for g in chosen)],
            },
            reserve=65536 + 1024 * len(chosen),
        )
        await manifest.save()
        pacer = _Pacer(max_rate)
        sem = asyncio.Semaphore(width)
        total_bytes = 0
        done = 0

        def report(o: GuestOutcome) -> None:
            nonlocal done
            done += 1
            if on_guest is not None:
                try:
                    on_guest(o, Progress(done, len(chosen), total_bytes, time.perf_counter() - t0))
                except Exception:  # a progress display must not stop a host's shutdown
                    log.exception("save-all progress callback failed")

        async def one(g: _Candidate) -> None:
            nonlocal total_bytes
            entry = entries[g.domid]
            async with sem:
                await pacer.admit(g.estimate)
                o = await _save_one(
                    orch,
                    d,
                    g,
                    entry,
                    shutdown_fallback=shutdown_fallback,
                    shutdown_timeout=shutdown_timeout,
                )
            pacer.settle(g.estimate, o.bytes or 0)
            total_bytes += o.bytes or 0
            entry.update(_entry_of(o))
            await manifest.save()
            outcomes[g.domid] = o
            report(o)

        try:
            await asyncio.gather(*(one(g) for g in chosen))
        finally:
            manifest.data["finished"] = _now()
            manifest.data["complete"] = all(g.domid in outcomes for g in chosen)
            manifest.release_reserve()
            await manifest.save()
    ordered = [outcomes[g.domid] for g in guests if g.domid in outcomes]
    return HostReport(
        operation="save-all",
        directory=d,
        guests=tuple(ordered),
        seconds=time.perf_counter() - t0,
        bytes=total_bytes,
        concurrency=width,
        warnings=tuple(manifest.warnings),
    )


def _width(concurrency: int | None) -> int:
    if concurrency is None:
        return DEFAULT_CONCURRENCY
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise UsageError(f"concurrency must be a whole number of at least 1, not {concurrency!r}")
    return concurrency


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


async def _save_one(
    orch: Orchestrator,
    directory: str,
    g: _Candidate,
    entry: dict[str, Any],
    *,
    shutdown_fallback: bool,
    shutdown_timeout: float,
) -> GuestOutcome:
    path = os.path.join(directory, str(entry["image"]))
    t = time.perf_counter()
    try:
        result = await orch.save(g.domid, path)
    except TorporError as e:
        seconds = time.perf_counter() - t
        state = getattr(e, "state", None) or observed_state(orch.host.hypervisor, g.domid)
        if state in ("gone", "destroyed"):
            # Destroyed under us (by someone else): there is nothing to save.
            return GuestOutcome(
                g.name,
                g.domid,
                g.guest_type,
                "gone",
                False,
                "gone",
                seconds=seconds,
                error=e,
                detail="the domain was destroyed while it was being saved",
            )
        if shutdown_fallback and state in ("running", "paused"):
            off, how = await _power_off(orch, g.domid, shutdown_timeout)
            seconds = time.perf_counter() - t
            observed = observed_state(orch.host.hypervisor, g.domid)
            return GuestOutcome(
                g.name,
                g.domid,
                g.guest_type,
                "shut down" if off else "left running",
                off,  # shut down cleanly: what xendomains would have done
                observed,
                seconds=seconds,
                error=e,
                detail=f"not saved ({e.message}); {how}",
            )
        observed = observed_state(orch.host.hypervisor, g.domid)
        return GuestOutcome(
            g.name,
            g.domid,
            g.guest_type,
            "left running" if observed in ("running", "paused") else "not saved",
            False,
            observed,
            seconds=seconds,
            error=e,
            detail=e.message,
        )
    seconds = time.perf_counter() - t
    size, digest = await asyncio.to_thread(file_digest, path)
    return GuestOutcome(
        g.name,
        g.domid,
        result.guest_type,
        "saved",
        True,
        result.state,
        image=os.path.basename(path),
        bytes=size,
        sha256=digest,
        seconds=seconds,
        result=result,
    )


async def _power_off(orch: Orchestrator, domid: int, timeout: float) -> tuple[bool, str]:
    """Shut a guest down cleanly, as ``xl shutdown -w`` (xendomains) does, and wait.

    PV drivers: ``control/shutdown`` = ``poweroff`` (libxl_domain_shutdown);
    an HVM guest without them: the ACPI power button (QMP ``system_powerdown``,
    as ``xl shutdown -F``).  Then wait, on ``@releaseDomain``, for the domain
    to be shut down (or gone) within ``timeout``.  (True, what happened) if it
    is; (False, why not) otherwise -- the guest is then still there.
    """
    from torpor.errors import NoSuchDomain

    hv = orch.host.hypervisor
    try:
        async with orch._claim(domid, "shutdown"):
            ctx = await orch._context("shutdown", domid)
            try:
                gt = ctx.guest_type
                if gt is not None and not gt.xenstore_handshake and gt.device_model:
                    how = "ACPI power button (QMP system_powerdown)"
                    dm = await ctx.device_model()
                    await dm.execute("system_powerdown", timeout=orch.timeouts.device_model)
                else:
                    how = "control/shutdown = poweroff"
                    await orch.host.xenstore.aio.write(
                        f"/local/domain/{domid}/control/shutdown", "poweroff"
                    )
                wake = Waker()
                await orch.monitor.start()
                undo = orch.monitor.listen_domain(domid, wake.set)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                try:
                    while True:
                        wake.clear()
                        try:
                            info = hv.domain_info(domid)
                        except HypervisorError as e:
                            if e.errno == errno.ESRCH:
                                return True, f"shut down cleanly ({how}); the domain is gone"
                            raise
                        if info.shutdown:
                            return True, (
                                f"shut down cleanly ({how}): shut down with reason "
                                f"{info.shutdown_reason}"
                            )
                        remaining = deadline - loop.time()
                        if remaining <= 0 or not await wake.wait(remaining):
                            return False, (
                                f"asked to power off ({how}) but still {info.state_word()} "
                                f"after {timeout:g}s: left as it is"
                            )
                finally:
                    undo()
            finally:
                await ctx.close()
    except NoSuchDomain:
        return True, "the domain is gone"
    except TorporError as e:
        return False, f"could not ask it to power off: {e.message}"


# ---------------------------------------------------------------------------
# restore-all


async def restore_all(
    orch: Orchestrator,
    directory: str | os.PathLike[str],
    *,
    select: GuestFilter | None = None,
    concurrency: int | None = None,
    on_guest: OnGuest | None = None,
) -> HostReport:
    """Restore what :func:`save_all` saved in ``directory``, in the manifest's order.

    See the module's docstring.  Never raises for one guest's failure.
    """
    orch._check_loop()
    select = select or GuestFilter()
    width = _width(concurrency)
    d = _prepare_dir(directory, create=False)
    t0 = time.perf_counter()
    with _locked(d):
        data = await asyncio.to_thread(read_manifest, d)
        if data is None:
            return HostReport(
                "restore-all",
                d,
                (),
                time.perf_counter() - t0,
                0,
                width,
                notes=(f"no {MANIFEST} in {d}: nothing to restore",),
            )
        manifest = _Manifest(d, data)
        entries: list[dict[str, Any]] = data["guests"]
        outcomes: dict[int, GuestOutcome] = {}
        todo: list[tuple[int, dict[str, Any]]] = []
        for i, e in enumerate(entries):
            name, domid = str(e["name"]), e.get("domid")
            gt = str(e.get("guest_type", "?"))
            status = e.get("status")
            if status == "restored":
                outcomes[i] = GuestOutcome(
                    name,
                    domid,
                    gt,
                    "restored earlier",
                    True,
                    "restored",
                    new_domid=(e.get("restored") or {}).get("domid"),
                    detail=f"restored {(e.get('restored') or {}).get('at', '?')}",
                )
            elif not select.selects(name, domid if isinstance(domid, int) else None):
                outcomes[i] = GuestOutcome(name, domid, gt, "excluded", True, "not restored")
            elif status == "saved":
                todo.append((i, e))
            elif status == "stale":
                outcomes[i] = GuestOutcome(
                    name,
                    domid,
                    gt,
                    "stale",
                    False,
                    "not restored",
                    image=e.get("image"),
                    detail=str(e.get("detail", "")),
                )
            else:
                why = (
                    "save-all did not finish it (interrupted, or the host went down "
                    "mid-way): nothing was saved"
                    if status == "pending"
                    else f"save-all did not save it: {e.get('detail') or e.get('outcome')}"
                )
                outcomes[i] = GuestOutcome(
                    name, domid, gt, "not saved", False, "not restored", detail=why
                )
        leftovers = _leftovers(d, entries)
        total_bytes = 0
        done = 0

        def report(o: GuestOutcome) -> None:
            nonlocal done
            done += 1
            if on_guest is not None:
                try:
                    on_guest(o, Progress(done, len(todo), total_bytes, time.perf_counter() - t0))
                except Exception:
                    log.exception("restore-all progress callback failed")

        queue = list(todo)  # restores start in the manifest's order

        async def worker() -> None:
            nonlocal total_bytes
            while queue:
                i, e = queue.pop(0)
                o = await _restore_one(orch, d, e)
                if o.outcome == "restored":
                    total_bytes += o.bytes or 0
                    e["status"] = "restored"
                    e["restored"] = {"domid": o.new_domid, "at": _now()}
                    await manifest.save()
                    await asyncio.to_thread(_remove_image, d, str(e["image"]))
                outcomes[i] = o
                report(o)

        await asyncio.gather(*(worker() for _ in range(min(width, len(todo)) or 1)))
        notes: list[str] = []
        if not any(e.get("status") in ("saved", "stale") for e in entries):
            # Nothing left to restore: the manifest is done with (kept for the
            # record), so the next boot's restore-all finds nothing to do.
            done_path = os.path.join(d, DONE)
            await asyncio.to_thread(os.replace, os.path.join(d, MANIFEST), done_path)
            await asyncio.to_thread(_fsync_dir, d)
            notes.append(f"every saved guest is restored: {MANIFEST} moved to {done_path}")
    ordered = [outcomes[i] for i in range(len(entries)) if i in outcomes]
    return HostReport(
        operation="restore-all",
        directory=d,
        guests=(*ordered, *leftovers),
        seconds=time.perf_counter() - t0,
        bytes=total_bytes,
        concurrency=width,
        warnings=tuple(manifest.warnings),
        notes=tuple(notes),
    )


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


async def _restore_one(orch: Orchestrator, directory: str, e: dict[str, Any]) -> GuestOutcome:
    name, domid = str(e["name"]), e.get("domid")
    gt = str(e.get("guest_type", "?"))
    image = str(e.get("image") or "")
    path = os.path.join(directory, image)
    t = time.perf_counter()

    def fail(outcome: str, detail: str, err: TorporError | None = None) -> GuestOutcome:
        return GuestOutcome(
            name,
            domid,
            gt,
            outcome,
            False,
            "not restored",
            image=image,
            seconds=time.perf_counter() - t,
            detail=detail,
            error=err,
        )

    # Verified before anything is built: the size and SHA-256 the manifest holds.
    try:
        size, digest = await asyncio.to_thread(file_digest, path)
    except OSError as err:
        return fail("skipped", f"image {image}: {err.strerror or err}; not restored")
    if size != e.get("bytes") or digest != e.get("sha256"):
        what = (
            f"{size} bytes, the manifest says {e.get('bytes')}"
            if size != e.get("bytes")
            else "its SHA-256 differs from the manifest's"
        )
        return fail("skipped", f"image {image} fails verification ({what}); kept, not restored")
    try:
        result = await orch.restore(path)
    except TorporError as err:
        from torpor.errors import NameInUse

        if isinstance(err, NameInUse):
            return fail("refused", f"{err.message}; image kept", err)
        if isinstance(err, ImageError):
            return fail("skipped", f"image {image} fails verification: {err.message}; kept", err)
        state = getattr(err, "state", None) or "not restored"
        o = fail("failed", f"restore failed: {err.message}; image kept", err)
        return attrs.evolve(o, state=state)
    state = observed_state(orch.host.hypervisor, result.domid)
    if state != "running":
        # The restore saw it run; it no longer does: keep the image.
        return GuestOutcome(
            name,
            domid,
            result.guest_type,
            "failed",
            False,
            state,
            image=image,
            seconds=time.perf_counter() - t,
            new_domid=result.domid,
            result=result,
            detail=f"restored as domain {result.domid} but it is {state}; image kept",
        )
    return GuestOutcome(
        name,
        domid,
        result.guest_type,
        "restored",
        True,
        state,
        image=image,
        bytes=size,
        sha256=digest,
        seconds=time.perf_counter() - t,
        new_domid=result.domid,
        result=result,
    )

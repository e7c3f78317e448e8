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
The directory's format -- manifest, images, filter and report values -- is
:mod:`torpor.savedir`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import attrs

from torpor.engine import observed_state
from torpor.errors import (
    ImageError,
    TorporError,
    UnsupportedGuest,
    UsageError,
)
from torpor.operations.shutdown import power_off
from torpor.savedir import (  # the save directory's format and values
    DEFAULT_CONCURRENCY,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DONE,
    IMAGE_SUFFIX,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    GuestFilter,
    GuestOutcome,
    HostReport,
    OnGuest,
    Progress,
    _carried,
    _entry_of,
    _fsync_dir,
    _leftovers,
    _locked,
    _Manifest,
    _now,
    _prepare_dir,
    _remove_image,
    _torpor_version,
    _xen_versions,
    file_digest,
    image_name,
    read_manifest,
)

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator

__all__ = [  # the save directory's names re-exported: one place to import from
    "DEFAULT_CONCURRENCY",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DONE",
    "IMAGE_SUFFIX",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "GuestFilter",
    "GuestOutcome",
    "HostReport",
    "OnGuest",
    "Progress",
    "read_manifest",
    "restore_all",
    "save_all",
]

log = logging.getLogger("torpor")

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
            off, how = await power_off(orch, g.domid, shutdown_timeout)
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

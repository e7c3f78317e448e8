"""Live saves: libxenguest's precopy, its callbacks, and the image as it arrives.

A live migration copies a guest's memory while the guest runs, in rounds,
then stops it and copies what it dirtied meanwhile.  On real Xen libxenguest
does it (``xc_domain_save`` with ``XCFLAGS_LIVE``, tools/libs/guest/
xg_sr_save.c ``send_domain_memory_live``); on a simulated host
:func:`sim_live_save` does the same, in the same order, asking the same
callbacks -- so the orchestrator drives both alike:

1. log-dirty on (the hypervisor marks every page the guest writes; for an
   HVM guest its QEMU too: ``switch_qemu_logdirty``);
2. round 1 sends every page; then, until the precopy policy says stop and
   copy, each round reads-and-clears the dirty log and sends those pages;
3. ``suspend`` (torpor's own suspend, every hook and deadline included);
4. the last dirty pages, then the suspended guest's state, then ``END``.

The policy is asked exactly as libxenguest asks ``precopy_policy``
(:class:`PrecopyTracker`): once before each round with the dirty count, and
once after it with ``dirty_count = -1``.  The tracker turns those questions
into :class:`~torpor.model.PrecopyRound` reports -- the same on real Xen,
where the questions come from C.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import attrs

from torpor.errors import ImageError, MigrationFailed, OperationError, TorporError
from torpor.image import PAGE_SIZE, RecordType, SavedDomain, StreamWriter
from torpor.model import PrecopyPolicy, PrecopyRound, PrecopyStats

__all__ = [
    "BATCH_PAGES",
    "IncomingImage",
    "LiveSaveReport",
    "PrecopyTracker",
    "SaveCallbacks",
    "SimMemory",
    "sim_live_save",
    "sim_save_stream",
]

#: Pages per PAGE_DATA record (libxenguest: MAX_BATCH_SIZE = 1024 pages).
BATCH_PAGES = 1024


@attrs.frozen
class SaveCallbacks:
    """What a live save asks of the toolstack (libxenguest's ``struct save_callbacks``).

    :param suspend: torpor's suspend; True once the domain is shut down for
        suspend, False if it failed (the guest then runs as the suspend left it).
    :param precopy_policy: True: stop and copy now; False: another round.
    :param device_model_logdirty: QEMU's log-dirty on or off
        (``switch_qemu_logdirty``: QMP ``xen-set-global-dirty-log``); a no-op
        for guests without a device model.
    :param device_model_state: QEMU's saved device state (after the suspend),
        or None.
    """

    suspend: Callable[[], bool]
    precopy_policy: Callable[[PrecopyStats], bool]
    device_model_logdirty: Callable[[bool], None]
    device_model_state: Callable[[], bytes | None]


class PrecopyTracker:
    """The precopy policy as libxenguest calls it, and the rounds it reports.

    libxenguest asks before each round with the pages dirty (the first time
    with every page), and after sending it with ``dirty_count = -1``; a
    round's report (``on_round``) is made once its dirty count is known, or
    when the policy stops before it is read (``dirty`` -1 then).  When it
    stops with pages known dirty, libxenguest still sends those while the
    guest runs: that last round is reported when the suspend begins
    (:meth:`stopping`), its dirty count -1 (the stop-and-copy reads it).
    """

    def __init__(
        self,
        policy: PrecopyPolicy,
        on_round: Callable[[PrecopyRound], None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.policy = policy
        self.on_round = on_round
        self.clock = clock
        self.rounds: list[PrecopyRound] = []
        #: why precopy stopped: "converged" or "iteration bound" (None: not yet)
        self.stopped: str | None = None
        self.last = PrecopyStats(0, 0, -1)
        self._round_start = clock()
        self._written_before = 0
        self._sent = 0
        self._pending: PrecopyStats | None = None

    def __call__(self, stats: PrecopyStats) -> bool:
        now = self.clock()
        if stats.iteration == 0:
            self._round_start = now  # round 1 begins when the policy lets it
        elif stats.dirty_count < 0:
            # round ``iteration`` was sent; its dirty pages are not read yet
            self._sent = stats.total_written - self._written_before
            self._written_before = stats.total_written
        else:
            self._report(stats.iteration, stats.total_written, stats.dirty_count, now)
        self.last = stats
        stop = self.policy.stop_and_copy(stats)
        if stop:
            if stats.iteration > 0 and stats.dirty_count < 0:
                self._report(stats.iteration, stats.total_written, -1, now)
            elif stats.dirty_count > 0:
                self._pending = stats  # sent now, while the guest still runs
            self.stopped = self.policy.why_stopped(stats)
        return stop

    def stopping(self) -> None:
        """The suspend begins: report the round sent after the policy said stop."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._sent = pending.dirty_count
            self._report(
                pending.iteration + 1, pending.total_written + pending.dirty_count, -1, self.clock()
            )

    def _report(self, iteration: int, total: int, dirty: int, now: float) -> None:
        seconds = max(now - self._round_start, 1e-9)
        self._round_start = now
        r = PrecopyRound(
            iteration=iteration,
            pages=self._sent,
            total_pages=total,
            dirty=dirty,
            seconds=seconds,
            dirty_rate=max(dirty, 0) / seconds,
        )
        self.rounds.append(r)
        self.on_round(r)


@attrs.frozen
class LiveSaveReport:
    """What a live save sent (the result's ``precopy``)."""

    #: pages sent while the guest ran, in all rounds
    precopy_pages: int
    #: pages sent after the suspend (the stop-and-copy)
    final_pages: int
    #: octets of the stream
    size: int
    #: the stream's memory, as the receiver rebuilds it (sha256), when known
    memory_checksum: str | None = None


@runtime_checkable
class SimMemory(Protocol):
    """What a simulated host's builder offers a live save (libxenguest's view of Xen)."""

    def describe(self, domid: int) -> dict[str, Any]:
        """The DOMAIN record of a running domain (kind, name, uuid, memory_pages...)."""
        ...

    def logdirty(self, domid: int, enable: bool) -> None:
        """Log-dirty mode on or off (EOPNOTSUPP where the hypervisor can't)."""
        ...

    def dirty_pages(self, domid: int) -> list[int]:
        """Read and clear the dirty log: the pfns written since the last read."""
        ...

    def pages(self, domid: int, pfns: list[int]) -> bytes:
        """The pages' contents, one 4096-octet page per pfn."""
        ...

    def suspended_state(self, domid: int) -> dict[str, Any]:
        """A suspended domain's state but its memory: vcpus, start_info,
        hvm_params, guest (JSON)."""
        ...

    def save(self, domid: int) -> SavedDomain:
        """A suspended domain's whole state (a non-live save)."""
        ...

    def live_refusal(self, domid: int) -> str | None:
        """Why this host cannot save ``domid`` live beyond the hypervisor's
        capabilities (a simulated plain HVM guest's memory is its QEMU's)."""
        ...


def sim_live_save(
    memory: SimMemory,
    domid: int,
    write: Callable[[bytes], object],
    callbacks: SaveCallbacks,
    *,
    domain: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> LiveSaveReport:
    """``xc_domain_save(..., XCFLAGS_LIVE, callbacks)`` for a simulated host.

    Writes torpor's image as a stream to ``write``: DOMAIN, PAGE_DATA records
    round by round, then (after ``callbacks.suspend``) the last dirty pages,
    the vCPUs, start_info, HVM params, the guest kernel's state, the device
    model's state and END.  ``domain`` overrides the DOMAIN record (a
    same-host migration's ``NAME--incoming``).  Log-dirty is switched off
    however it ends.

    :raises MigrationFailed: the suspend failed (the guest runs: it was never
        stopped, or the failed suspend left it so).
    """
    info = dict(domain if domain is not None else memory.describe(domid))
    total = int(info["memory_pages"])
    image = bytearray(total * PAGE_SIZE)
    stream = StreamWriter(write)
    stream.json(RecordType.SOURCE, source or {})
    stream.json(RecordType.DOMAIN, info)

    def send(pfns: list[int]) -> None:
        for i in range(0, len(pfns), BATCH_PAGES):
            batch = pfns[i : i + BATCH_PAGES]
            data = memory.pages(domid, batch)
            if len(data) != len(batch) * PAGE_SIZE:
                raise ImageError(f"domain {domid}: {len(batch)} pages read as {len(data)} octets")
            for j, pfn in enumerate(batch):
                image[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = data[
                    j * PAGE_SIZE : (j + 1) * PAGE_SIZE
                ]
            stream.pages(batch, data)

    memory.logdirty(domid, True)
    dm_logdirty = False
    try:
        callbacks.device_model_logdirty(True)
        dm_logdirty = True
        # send_memory_live(): the same questions, in the same order, as libxenguest.
        stats = PrecopyStats(0, 0, total)
        dirty = list(range(total))
        written = 0
        x = 0
        while True:
            stop = callbacks.precopy_policy(stats)
            x += 1
            if dirty:
                send(dirty)
            if stop:
                break
            written += len(dirty)
            stats = PrecopyStats(x, written, -1)
            if callbacks.precopy_policy(stats):
                break
            dirty = memory.dirty_pages(domid)
            stats = PrecopyStats(x, written, len(dirty))
        precopy_pages = written + (len(dirty) if stop else 0)
        # suspend_and_send_dirty()
        if not callbacks.suspend():
            raise MigrationFailed(
                f"domain {domid}: the suspend for the stop-and-copy failed", domid=domid
            )
        final = memory.dirty_pages(domid)
        send(final)
        state = memory.suspended_state(domid)
        stream.json(RecordType.VCPUS, state["vcpus"])
        if state.get("start_info") is not None:
            stream.json(RecordType.START_INFO, state["start_info"])
        stream.json(RecordType.HVM_PARAMS, state.get("hvm_params", {}))
        stream.json(RecordType.GUEST, state.get("guest", {}))
        dm = callbacks.device_model_state()
        if dm is not None:
            stream.record(RecordType.DEVICE_MODEL, dm)
        stream.end()
    finally:
        with _quietly():
            memory.logdirty(domid, False)
        if dm_logdirty:
            with _quietly():
                callbacks.device_model_logdirty(False)
    import hashlib

    return LiveSaveReport(
        precopy_pages=precopy_pages,
        final_pages=len(final),
        size=stream.size,
        memory_checksum=hashlib.sha256(image).hexdigest(),
    )


def sim_save_stream(
    memory: SimMemory,
    domid: int,
    write: Callable[[bytes], object],
    callbacks: SaveCallbacks,
    *,
    live: bool,
    domain: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> LiveSaveReport:
    """A simulated host's save stream: live (:func:`sim_live_save`), or the
    guest suspended first and its whole image sent (``xc_domain_save``
    without ``XCFLAGS_LIVE``)."""
    if live:
        return sim_live_save(memory, domid, write, callbacks, domain=domain, source=source)
    import attrs as _attrs

    from torpor.image import encode

    if not callbacks.suspend():
        raise MigrationFailed(f"domain {domid}: the suspend for the save failed", domid=domid)
    saved = memory.save(domid)
    dm = callbacks.device_model_state()
    if dm is not None and saved.device_model is None:
        saved = _attrs.evolve(saved, device_model=dm)
    if domain is not None:
        saved = _attrs.evolve(saved, domain={**saved.domain, "name": domain.get("name")})
    saved = _attrs.evolve(saved, source={**saved.source, **(source or {})})
    size = 0
    for chunk in encode(saved):
        write(chunk)
        size += len(chunk)
    return LiveSaveReport(
        precopy_pages=0,
        final_pages=len(saved.memory) // PAGE_SIZE,
        size=size,
        memory_checksum=saved.memory_checksum(),
    )


class _quietly:
    """Clean-up after a failure must not hide the failure (TorporError only)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, (TorporError, OSError))


class IncomingImage:
    """A save image arriving at a destination host while it is produced.

    The sending side writes the stream (:meth:`write`, from any one thread)
    and tells what the DOMAIN record says (:attr:`domain`); the destination's
    restore then builds the domain from it (:meth:`build`, left paused) --
    the simulated hosts' counterpart of ``xc_domain_restore`` reading a
    migration stream.

    :param open_: starts the transfer at the destination; returns a handle.
    :param write_: ``write_(handle, data)``.
    :param build_: ``build_(handle) -> (domid, checksum, memory_checksum)``.
    :param close_: drops the transfer (idempotent).
    """

    def __init__(
        self,
        *,
        write_: Callable[[bytes], object],
        build_: Callable[[], tuple[int, str, str]],
        close_: Callable[[], None],
        chunk: int = 512 * 1024,
    ) -> None:
        self._write = write_
        self._build = build_
        self._close = close_
        self._chunk = chunk
        self._pending = io.BytesIO()
        #: the DOMAIN record, as the sender wrote it (name, kind...)
        self.domain: dict[str, Any] = {}
        #: set by :meth:`build`: sha256 of the guest's memory (+ device model state)
        self.checksum: str | None = None
        self.memory_checksum: str | None = None
        self.size = 0

    @property
    def kind(self) -> str:
        return str(self.domain.get("kind", ""))

    def write(self, data: bytes) -> None:
        self._pending.write(data)
        self.size += len(data)
        if self._pending.tell() >= self._chunk:
            self.flush()

    def flush(self) -> None:
        data = self._pending.getvalue()
        self._pending = io.BytesIO()
        for i in range(0, len(data), self._chunk):
            self._write(data[i : i + self._chunk])

    def build(self) -> int:
        """Everything sent arrived: build the domain, paused; its domid."""
        self.flush()
        domid, self.checksum, self.memory_checksum = self._build()
        return domid

    def destroy_unbuilt(self) -> None:
        """Drop what arrived (a migration that failed before the build)."""
        self._close()


def suspend_failed(domid: int, error: BaseException) -> TorporError:
    """The error a live save's failed suspend is reported as."""
    if isinstance(error, TorporError):
        return error
    return OperationError(f"suspend inside the live save failed: {error!r}", domid=domid)

"""Migrate: stream the guest to another host, restore it there, destroy it here.

xl's ``migrate`` (tools/xl/xl_migrate.c): the source is destroyed only after
the guest runs at the destination; any failure before that resumes the
source cooperatively and destroys a half-built copy, so one copy of the guest
runs at the end, never two with one name.  On one host the copy is built as
``NAME--incoming`` and renamed once the source is gone, as ``xl migrate`` to
localhost does.

Live (``xl migrate`` always is; libxl ``LIBXL_SUSPEND_LIVE``): the guest's
memory is copied while it runs, in precopy rounds (:mod:`torpor.livesave`),
until the precopy policy says stop and copy; only then is it suspended --
torpor's own suspend, as the live save's suspend callback -- and what it
dirtied meanwhile sent.  Where the hypervisor cannot track the guest's dirty
pages (a PV guest on a Xen without shadow paging) it migrates non-live:
suspend, save, transfer, restore, saying why in the result; ``live=True``
demands live and is refused there (:class:`~torpor.errors.LiveUnavailable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from torpor.context import OperationContext
from torpor.engine import PhaseScope, locate, observed_state
from torpor.errors import (
    BackendUnavailable,
    Interrupted,
    LiveUnavailable,
    MigrationFailed,
    OperationError,
    TorporError,
)
from torpor.host import validate_domid
from torpor.model import (
    Phase,
    PhaseTiming,
    PrecopyPolicy,
    PrecopyRound,
    Result,
)
from torpor.operations.restore import domain_named
from torpor.operations.save import rollback_migration, save_state
from torpor.operations.suspend import suspend_domain
from torpor.operations.threads import builder_of, completing, in_thread

if TYPE_CHECKING:
    from torpor.image import SavedDomain
    from torpor.livesave import LiveSaveReport, PrecopyTracker, SaveCallbacks
    from torpor.orchestrator import Orchestrator

log = logging.getLogger("torpor")
T = TypeVar("T")


async def migrate(
    orch: Orchestrator,
    domid: int,
    destination: Orchestrator,
    *,
    live: bool | None = None,
    precopy: PrecopyPolicy | None = None,
) -> Result:
    """Move a domain to another host; the source is destroyed once the copy runs there.

    ``live``: ``None`` -- live where the guest can be (its dirty pages
    tracked), else non-live, saying why in the result (``live_refusal``);
    ``True`` -- live or refused (:class:`~torpor.errors.LiveUnavailable`,
    nothing touched); ``False`` -- suspend first, then copy.  ``precopy``:
    when a live migration stops copying while the guest runs (default
    libxl's: 5 rounds, 50 pages).  If anything fails before the destination
    guest runs, the source is resumed cooperatively (or was never stopped)
    and any half-built destination domain destroyed.
    """
    orch._check_loop()
    domid = validate_domid(domid)
    from torpor.builder import FileSaver

    source_builder = builder_of(orch.host, "migrate")  # refuse before touching the guest
    dest_builder = builder_of(destination.host, "restore")
    if isinstance(source_builder, FileSaver) or isinstance(dest_builder, FileSaver):
        raise BackendUnavailable(
            "migration to or from real Xen goes through xl's migration protocol: "
            "`torpor migrate DOMID --to xl://HOST` (or localhost)",
            domid=domid,
        )
    policy = precopy if precopy is not None else PrecopyPolicy()
    async with orch._claim(domid, "migrate"):
        ctx = await orch._context("migrate", domid)
        async with orch._reporting(ctx):
            renaming = await _migration_names(orch, ctx, destination)
            refusal = await in_thread(live_refusal, orch, ctx, source_builder)
            if refusal is None and not hasattr(dest_builder, "incoming"):
                refusal = "the destination cannot receive a live stream"
            if live and refusal is not None:
                raise LiveUnavailable(
                    f"a live migration of domain {domid} cannot be had: {refusal}; "
                    "the guest was not touched (without --live it migrates non-live)",
                    reason=refusal,
                    state=ctx.domain.state_word(),
                    phase=Phase.VALIDATE,
                )
            if live is not False and refusal is None:
                return await _migrate_live(orch, ctx, destination, renaming, policy)
            why = refusal if refusal is not None else "non-live migration requested"
            return await _migrate_stopped(orch, ctx, destination, renaming, why)


def live_refusal(orch: Orchestrator, ctx: OperationContext, source: Any) -> str | None:
    """Why ``ctx.domid`` cannot be saved live here (``None``: it can).

    Log-dirty needs the hypervisor's help (``xc_physinfo``'s capabilities,
    ``xl info``'s ``virt_caps``): a PV guest's runs on shadow paging, an HVM
    or PVH guest's on HAP or shadow; then the builder must be able to save
    live at all.
    """
    from torpor.builder import FileSaver
    from torpor.livesave import SimMemory

    caps = orch.host.hypervisor.virt_caps()
    hvm = ctx.domain.hvm
    need = {"hap", "shadow"} if hvm else {"shadow"}
    if not need & caps:
        what = "HAP or shadow paging, which an HVM" if hvm else "shadow paging, which a PV"
        return (
            f"the hypervisor has no {what} guest's log-dirty needs (virt_caps: "
            f"{' '.join(sorted(caps))}); its dirty pages cannot be tracked"
        )
    if isinstance(source, FileSaver):
        return None  # xc_domain_save with XCFLAGS_LIVE
    if not isinstance(source, SimMemory):
        return "this host's domain builder cannot save a guest live"
    return source.live_refusal(ctx.domid)


async def _migrate_stopped(
    orch: Orchestrator,
    ctx: OperationContext,
    destination: Orchestrator,
    renaming: tuple[str, str] | None,
    why: str,
) -> Result:
    """The non-live migration: suspend, save, transfer, restore there, destroy here."""
    domid = ctx.domid
    timings: list[PhaseTiming] = []
    suspended = await suspend_domain(orch, ctx)
    timings.extend(suspended.timings)
    try:
        async with orch._phase(ctx, Phase.SAVE, timings):
            saved = await save_state(orch, ctx)
            if renaming is not None:  # same host: restored as NAME--incoming
                saved = attrs.evolve(saved, domain={**saved.domain, "name": renaming[1]})
        async with orch._phase(ctx, Phase.TRANSFER, timings):
            # The image format is the wire format: verified on arrival.
            saved = await in_thread(_through_image, saved)
        # The destination times its own phases (restore, resume,
        # guest-resume, verify); the result counts each once.
        ctx.phase = Phase.RESTORE
        arrived = await _arrival(destination.restore(saved, expect_kind=saved.kind))
        timings.extend(arrived.timings)
    except TorporError as e:
        await rollback_migration(orch, ctx, e)
    async with orch._phase(ctx, Phase.CLEANUP, timings):
        await completing(orch, builder_of(orch.host, "migrate").destroy, domid)
        if renaming is not None:
            await _rename_arrived(orch, arrived.domid, *renaming)
    return Result(
        domid=arrived.domid,
        operation="migrate",
        guest_type=ctx.guest_type_name,
        outcome="migrated",
        state=arrived.state,
        method=ctx.method,
        cooperative=False,
        timings=tuple(timings),
        details=(
            ("source_domid", domid),
            ("source", orch.host.name),
            ("destination", destination.host.name),
            ("live", False),
            ("live_refusal", why),
            ("downtime", round(downtime_of(timings), 6)),
            ("checksum", saved.checksum()),
            ("memory_checksum", saved.memory_checksum()),
        ),
    )


#: The phases during which the guest runs nowhere: from the suspend request to
#: the destination's unpause (``resume`` is where a restored domain is started).
DOWNTIME_PHASES = frozenset(
    {
        Phase.REQUEST,
        Phase.ACK,
        Phase.SHUTDOWN,
        Phase.DEVICE_MODEL_SUSPEND,
        Phase.SAVE,
        Phase.TRANSFER,
        Phase.RESTORE,
        Phase.RESUME,
    }
)


def downtime_of(timings: list[PhaseTiming] | tuple[PhaseTiming, ...]) -> float:
    """A migration's downtime as the toolstack sees it: from the suspend request
    to the destination's unpause (an upper bound of the guest's own gap: it
    runs until it takes the request, and again once unpaused)."""
    return sum(t.seconds for t in timings if t.phase in DOWNTIME_PHASES)


@attrs.define
class Streamed:
    """What :func:`stream_guest` did: the guest is suspended (or the call raised)."""

    #: the suspend's own result (its phases' timings)
    suspended: Result
    #: precopy (live), then save -- the suspend's phases go between them
    timings: list[PhaseTiming]
    #: what was sent
    sent: LiveSaveReport
    #: the precopy rounds (live)
    tracker: PrecopyTracker | None

    def all_timings(self) -> list[PhaseTiming]:
        """Every phase in the order it ran: precopy, the suspend's, save."""
        if self.tracker is None:  # suspended first, then saved
            return [*self.suspended.timings, *self.timings]
        return [*self.timings[:1], *self.suspended.timings, *self.timings[1:]]

    def details(self, policy: PrecopyPolicy) -> list[tuple[str, object]]:
        if self.tracker is None:
            return [("bytes", self.sent.size)]
        return [
            ("rounds", [r.to_dict() for r in self.tracker.rounds]),
            ("precopy", self.tracker.stopped),
            ("precopy_pages", self.sent.precopy_pages),
            ("final_pages", self.sent.final_pages),
            ("max_iterations", policy.max_iterations),
            ("dirty_threshold", policy.dirty_threshold),
            ("bytes", self.sent.size),
        ]


async def stream_guest(
    orch: Orchestrator,
    ctx: OperationContext,
    send: Callable[[SaveCallbacks], LiveSaveReport],
    *,
    live: bool,
    policy: PrecopyPolicy,
) -> Streamed:
    """Run a builder's save stream (``send``, in a worker thread) with torpor's
    suspend as its suspend callback, and the phases around it.  Once the guest
    is suspended, ``ctx.facts["stopped"]`` is set.

    Live: phase ``precopy`` while the rounds go (each one notified through
    ``torpor_precopy_round``), then the suspend's own phases, then ``save``
    (the last dirty pages, the guest's state).  Non-live: the suspend, then
    ``save``.  If it fails before the guest was suspended the guest was
    never stopped: :class:`~torpor.errors.MigrationFailed` saying so (or the
    suspend's own error, e.g. a veto or an ack timeout).  After the suspend,
    the error as raised: the caller resumes the guest.
    """
    from torpor.devicemodel import set_dirty_log
    from torpor.livesave import PrecopyTracker, SaveCallbacks

    loop = asyncio.get_running_loop()
    domid = ctx.domid
    ctx.facts["live"] = live
    timings: list[PhaseTiming] = []
    suspended: list[Result] = []
    suspend_errors: list[BaseException] = []
    scope: list[PhaseScope | None] = [None]

    def run(coro: Any) -> Any:  # from the save thread: on the loop, and wait
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def open_phase(phase: Phase) -> None:
        s = orch._phase(ctx, phase, timings)
        await s.__aenter__()
        scope[0] = s

    async def close_phase(error: BaseException | None = None) -> None:
        s, scope[0] = scope[0], None
        if s is not None:
            await s.__aexit__(type(error) if error else None, error, None)

    async def notify_round(r: PrecopyRound) -> None:
        await orch._notify("torpor_precopy_round", ctx=ctx, precopy=r)

    async def suspend_in_save() -> Result:
        await close_phase()  # precopy ends: the stop-and-copy begins
        if orch._interrupted is not None:
            raise Interrupted(
                f"migration interrupted ({orch._interrupted}) before the guest was "
                "suspended; it was never stopped",
                reason=orch._interrupted,
                clean=True,
            )
        orch._refresh(ctx)
        result = await suspend_domain(orch, ctx)
        ctx.facts["stopped"] = True  # from here, a failure resumes the guest
        orch._refresh(ctx)
        if not ctx.domain.suspended:
            raise OperationError(
                f"domain {domid} is {ctx.domain.state_word()}, not shut down for suspend",
                state=ctx.domain.state_word(),
            )
        await open_phase(Phase.SAVE)  # the last dirty pages, the guest's state
        return result

    tracker = PrecopyTracker(policy, lambda r: run(notify_round(r))) if live else None

    def suspend() -> bool:  # the save's suspend callback, in its thread
        if tracker is not None:
            tracker.stopping()
        try:
            suspended.append(run(suspend_in_save()))
            return True
        except BaseException as e:  # reported below, never into the save loop
            suspend_errors.append(e)
            return False

    def dm_logdirty(enable: bool) -> None:
        gt = ctx.guest_type
        if gt is not None and gt.device_model:
            run(set_dirty_log(ctx, enable))

    def dm_state() -> bytes | None:
        path = ctx.facts.pop("device_model_state", None)
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)

    callbacks = SaveCallbacks(
        suspend=suspend,
        precopy_policy=tracker if tracker is not None else policy.stop_and_copy,
        device_model_logdirty=dm_logdirty,
        device_model_state=dm_state,
    )
    if live:
        await open_phase(Phase.PRECOPY)
    try:
        sent = await in_thread(send, callbacks)
        await close_phase()
    except (TorporError, OSError, asyncio.CancelledError) as raw:
        await close_phase(raw)
        with contextlib.suppress(OSError):
            path = ctx.facts.pop("device_model_state", None)
            if path:
                os.unlink(path)
        if isinstance(raw, asyncio.CancelledError):
            raise
        e = (
            raw
            if isinstance(raw, TorporError)
            else MigrationFailed(f"sending the guest failed: {raw.strerror or raw}", cause=raw)
        )
        if suspended:
            raise e from None
        first = suspend_errors[0] if suspend_errors else None
        if isinstance(first, TorporError):
            raise first from e
        locate(e, ctx)
        state = observed_state(orch.host.hypervisor, domid)
        raise MigrationFailed(
            f"migration failed before the guest was stopped: {e.message}; "
            f"domain {domid} was never suspended and is {state}",
            state=state,
            cause=e,
            phase=e.phase,
            domid=domid,
        ) from e
    assert suspended, "the save returned without suspending the guest"
    return Streamed(suspended=suspended[0], timings=timings, sent=sent, tracker=tracker)


async def _migrate_live(
    orch: Orchestrator,
    ctx: OperationContext,
    destination: Orchestrator,
    renaming: tuple[str, str] | None,
    policy: PrecopyPolicy,
) -> Result:
    """Precopy rounds while the guest runs, then the stop-and-copy, restore there."""
    from torpor.livesave import sim_live_save

    domid = ctx.domid
    source = builder_of(orch.host, "migrate")
    dest = builder_of(destination.host, "restore")
    domain = await in_thread(source.describe, domid)  # type: ignore[attr-defined]
    if renaming is not None:  # same host: built as NAME--incoming
        domain = {**domain, "name": renaming[1]}
    incoming = await in_thread(dest.incoming)  # type: ignore[attr-defined]
    incoming.domain = domain
    send = functools.partial(
        sim_live_save,
        source,  # type: ignore[arg-type]
        domid,
        incoming.write,
        domain=domain,
        source={"host": orch.host.name, "domid": domid, "live": True},
    )
    try:
        streamed = await stream_guest(orch, ctx, send, live=True, policy=policy)
    except BaseException as e:
        with contextlib.suppress(TorporError, OSError):
            await in_thread(incoming.destroy_unbuilt)
        if isinstance(e, TorporError) and ctx.facts.get("stopped"):
            await rollback_migration(orch, ctx, e)
        raise
    timings = streamed.all_timings()
    try:
        ctx.phase = Phase.RESTORE
        arrived = await _arrival(destination.restore(incoming, expect_kind=domain["kind"]))
        timings.extend(arrived.timings)
    except TorporError as e:
        with contextlib.suppress(TorporError, OSError):
            await in_thread(incoming.destroy_unbuilt)
        await rollback_migration(orch, ctx, e)
    async with orch._phase(ctx, Phase.CLEANUP, timings):
        await completing(orch, source.destroy, domid)
        if renaming is not None:
            await _rename_arrived(orch, arrived.domid, *renaming)
    return Result(
        domid=arrived.domid,
        operation="migrate",
        guest_type=ctx.guest_type_name,
        outcome="migrated",
        state=arrived.state,
        method=ctx.method,
        cooperative=False,
        timings=tuple(timings),
        details=(
            ("source_domid", domid),
            ("source", orch.host.name),
            ("destination", destination.host.name),
            ("live", True),
            ("downtime", round(downtime_of(timings), 6)),
            *streamed.details(policy),
            ("checksum", incoming.checksum),
            ("memory_checksum", incoming.memory_checksum),
        ),
    )


async def _migration_names(
    orch: Orchestrator, ctx: OperationContext, destination: Orchestrator
) -> tuple[str, str] | None:
    """Before the guest is touched: the guest's name must be free at the destination.

    On another host a domain of that name refuses the migration
    (:class:`~torpor.errors.NameInUse`); the destination's restore checks
    again.  On the same host the name is the source's own until the source
    is destroyed: as ``xl migrate`` to localhost does, the copy is built as
    ``NAME--incoming`` and renamed once the source is gone.  Returns
    ``(NAME, NAME--incoming)`` for that, else ``None``.
    """
    from torpor.errors import NameInUse

    name = await ctx.xenstore.read_or(f"{ctx.dompath}/name", None)
    if not name:
        return None
    same = os.path.realpath(destination.host.xenstore_path) == os.path.realpath(
        orch.host.xenstore_path
    )
    wanted = f"{name}--incoming" if same else name
    for asked in (name, wanted) if same else (name,):
        holder = await destination.domain_named(asked)
        if holder is not None and not (same and asked == name and holder == ctx.domid):
            raise NameInUse(
                f"domain {holder} on {destination.host.name} is already named {asked!r}; "
                "the guest was not touched",
                name=asked,
                holder=holder,
                state=ctx.domain.state_word(),
                phase=Phase.VALIDATE,
            )
    return (name, wanted) if same else None


async def _rename_arrived(orch: Orchestrator, domid: int, name: str, incoming: str) -> None:
    """A same-host migration's copy takes the guest's name once the source is gone
    (``libxl_domain_rename``: in a transaction, from the name it has)."""
    xs = orch.host.xenstore.aio
    path = f"/local/domain/{domid}/name"

    async def body(tx: Any) -> None:
        got = await xs.read_or(path, None, tx=tx)
        if got != incoming:
            raise MigrationFailed(
                f"the guest runs in domain {domid}, but it is named {got!r}, not "
                f"{incoming!r}: not renamed to {name!r}",
                state="running",
                domid=domid,
                phase=Phase.CLEANUP,
            )
        await xs.write(path, name, tx=tx)

    holder = await domain_named(orch, name)
    if holder not in (None, domid):
        raise MigrationFailed(
            f"the guest runs in domain {domid} as {incoming!r}: domain {holder} took the "
            f"name {name!r} meanwhile",
            state="running",
            domid=domid,
            phase=Phase.CLEANUP,
        )
    await xs.run_transaction(body)


async def _arrival(restore: Awaitable[Result]) -> Result:
    """The destination's restore decides a migration's fate.

    Cancelled while it runs, the restore is cancelled too (the destination
    then destroys what it built, and the source is resumed here).  If it
    had finished anyway, the guest runs at the destination: the migration
    must complete (destroying the source), or two copies would run.
    """
    task = asyncio.ensure_future(restore)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None:
            raise
        me = asyncio.current_task()
        if me is not None:
            me.uncancel()
        return task.result()


def _through_image(saved: SavedDomain) -> SavedDomain:
    """Encode and decode: what crosses to the destination is exactly the image format."""
    import io

    from torpor.image import decode, encode

    return decode(io.BytesIO(b"".join(encode(saved))))

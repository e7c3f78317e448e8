"""Migrate: suspend, stream the image, restore at the destination, destroy here.

xl's ``migrate`` (tools/xl/xl_migrate.c) in its non-live form: the source is
destroyed only after the guest runs at the destination; any failure before
that resumes the source cooperatively and destroys a half-built copy, so one
copy of the guest runs at the end, never two with one name.  On one host the
copy is built as ``NAME--incoming`` and renamed once the source is gone, as
``xl migrate`` to localhost does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from torpor.context import OperationContext
from torpor.errors import (
    BackendUnavailable,
    MigrationFailed,
    TorporError,
)
from torpor.host import validate_domid
from torpor.model import (
    Phase,
    PhaseTiming,
    Result,
)
from torpor.operations.restore import domain_named
from torpor.operations.save import rollback_migration, save_state
from torpor.operations.suspend import suspend_domain
from torpor.operations.threads import builder_of, completing, in_thread

if TYPE_CHECKING:
    from torpor.image import SavedDomain
    from torpor.orchestrator import Orchestrator

log = logging.getLogger("torpor")
T = TypeVar("T")


async def migrate(orch: Orchestrator, domid: int, destination: Orchestrator) -> Result:
    """Move a domain to another host: suspend, stream, restore there, destroy here.

    The source is destroyed only after the destination guest runs; if
    anything fails before that, the source is resumed cooperatively and
    any half-built destination domain destroyed.  Nothing is lost either way.
    """
    orch._check_loop()
    domid = validate_domid(domid)
    timings: list[PhaseTiming] = []
    from torpor.builder import FileSaver

    source_builder = builder_of(orch.host, "migrate")  # refuse before touching the guest
    dest_builder = builder_of(destination.host, "restore")
    if isinstance(source_builder, FileSaver) or isinstance(dest_builder, FileSaver):
        raise BackendUnavailable(
            "migration to or from real Xen is not implemented: save with `torpor save` "
            "and restore the xl save file with `torpor restore` or `xl restore`",
            domid=domid,
        )
    async with orch._claim(domid, "migrate"):
        ctx = await orch._context("migrate", domid)
        async with orch._reporting(ctx):
            renaming = await _migration_names(orch, ctx, destination)
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
            ("checksum", saved.checksum()),
            ("memory_checksum", saved.memory_checksum()),
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

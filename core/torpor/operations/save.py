"""Save: suspend a domain, write its state to a file, destroy it.

libxl: ``libxl_domain_suspend`` (libxl_domain.c) with the save helper
(``libxl__xc_domain_save``, libxl_save_callout.c / libxl_stream_write.c):
the guest is suspended through the same path as :mod:`.suspend` -- on real
Xen from inside ``xc_domain_save``, as its suspend callback -- the image is
written under a temporary name, read back and verified, renamed over FILE,
and only then is the domain destroyed.  Any failure before that resumes the
guest cooperatively where it was (libxl: ``libxl__domain_resume`` after a
failed save).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from torpor.context import OperationContext
from torpor.engine import locate, observed_state
from torpor.errors import (
    ImageError,
    Interrupted,
    MigrationFailed,
    OperationError,
    TorporError,
)
from torpor.host import validate_domid
from torpor.model import (
    Phase,
    PhaseTiming,
    Result,
)
from torpor.operations.suspend import rollback, suspend_domain
from torpor.operations.threads import builder_of, completing, in_thread

if TYPE_CHECKING:
    from torpor.builder import FileSaver
    from torpor.image import PartialFile, SavedDomain
    from torpor.orchestrator import Orchestrator

log = logging.getLogger("torpor")
T = TypeVar("T")


async def save(orch: Orchestrator, domid: int, path: str | os.PathLike[str]) -> Result:
    """Suspend a domain, write its state to ``path``, then destroy it.

    The domain is destroyed only once the file is complete and verified
    (read back, every checksum checked).  A failure at any point before
    that resumes the guest cooperatively where it was, and says why.
    """
    orch._check_loop()
    from torpor.builder import FileSaver
    from torpor.image import PartialFile, read_image, write_partial

    domid = validate_domid(domid)
    target = os.fspath(path)
    builder = builder_of(orch.host, "save")  # refuse before touching the guest
    partial = await in_thread(PartialFile, target)  # so is a place we can't write
    try:
        async with orch._claim(domid, "save"):
            ctx = await orch._context("save", domid)
            timings: list[PhaseTiming] = []
            async with orch._reporting(ctx):
                if isinstance(builder, FileSaver):
                    return await _save_file(orch, ctx, builder, partial)
                suspended = await suspend_domain(orch, ctx)
                timings.extend(suspended.timings)
                try:
                    async with orch._phase(ctx, Phase.SAVE, timings):
                        saved = await save_state(orch, ctx)
                        size = await in_thread(write_partial, saved, partial)
                        # Verified before it takes FILE's place: a file
                        # already there stays until the new one is good.
                        check = await in_thread(read_image, partial.path)
                        if check.checksum() != saved.checksum():
                            raise ImageError(f"{target} does not read back as written")
                        partial.commit()
                except TorporError as e:
                    await rollback_migration(orch, ctx, e)
                async with orch._phase(ctx, Phase.CLEANUP, timings):
                    await completing(orch, builder.destroy, domid)
    finally:
        partial.discard()
    return Result(
        domid=domid,
        operation="save",
        guest_type=ctx.guest_type_name,
        outcome="saved",
        state=_destroyed_state(orch.host.hypervisor, domid),
        method=ctx.method,
        timings=tuple(timings),
        details=(
            ("file", target),
            ("bytes", size),
            ("checksum", saved.checksum()),
            ("memory_checksum", saved.memory_checksum()),
        ),
    )


async def _save_file(
    orch: Orchestrator, ctx: OperationContext, builder: FileSaver, partial: PartialFile
) -> Result:
    """Save through a builder that writes the file itself (real Xen: xl's format).

    ``xc_domain_save`` calls the suspend from inside: the builder runs in a
    worker thread and its ``suspend`` callable runs :meth:`_suspend` on this
    loop, blocking that thread until the domain is shut down for suspend
    (True) or the suspend failed (False; the guest then runs, as the
    suspend left it).  The file is written under a temporary name next to
    ``target``, read back and walked to its end, renamed, and only then is
    the domain destroyed.  Any failure before that removes the partial
    file and, if the guest had suspended, resumes it cooperatively.
    """
    loop = asyncio.get_running_loop()
    domid = ctx.domid
    suspended: list[Result] = []
    suspend_errors: list[BaseException] = []
    waited = [0.0]

    async def suspend_in_save() -> Result:
        try:
            if orch._interrupted is not None:  # the save was interrupted: do not start
                raise Interrupted(
                    f"save interrupted ({orch._interrupted}) before the guest was asked",
                    reason=orch._interrupted,
                    clean=True,
                )
            result = await suspend_domain(orch, ctx)
            orch._refresh(ctx)
            if not ctx.domain.suspended:
                raise OperationError(
                    f"domain {domid} is {ctx.domain.state_word()}, not shut down for "
                    "suspend; xc_domain_save needs it shut down",
                    state=ctx.domain.state_word(),
                )
            return result
        finally:
            ctx.phase = Phase.SAVE

    def suspend() -> bool:  # called by xc_domain_save, in its thread
        t = time.perf_counter()
        try:
            suspended.append(asyncio.run_coroutine_threadsafe(suspend_in_save(), loop).result())
            return True
        except BaseException as e:  # reported below, never into C
            suspend_errors.append(e)
            return False
        finally:
            waited[0] = time.perf_counter() - t

    def device_model_state() -> bytes | None:
        dm_state = ctx.facts.get("device_model_state")
        if not dm_state:
            return None
        with open(dm_state, "rb") as f:
            return f.read()

    def drop_device_model_state() -> None:
        # QEMU's saved state is in the file now, or no longer wanted.
        dm_state = ctx.facts.pop("device_model_state", None)
        if dm_state:
            with contextlib.suppress(OSError):
                os.unlink(dm_state)

    timings: list[PhaseTiming] = []
    save_timings: list[PhaseTiming] = []
    target = partial.target
    try:
        async with orch._phase(ctx, Phase.VALIDATE, timings):
            job = await in_thread(builder.prepare_save, domid)
        async with orch._phase(ctx, Phase.SAVE, save_timings):
            fd = partial.take_fd()
            try:
                await in_thread(builder.write_save, job, fd, suspend, device_model_state)
                await in_thread(os.fsync, fd)
            finally:
                os.close(fd)
            check = await in_thread(builder.verify_save, partial.path)
            partial.commit()
    except asyncio.CancelledError:
        partial.discard()
        drop_device_model_state()
        raise
    except (TorporError, OSError) as raw:
        partial.discard()
        drop_device_model_state()
        e = (
            raw
            if isinstance(raw, TorporError)
            else ImageError(f"writing {target}: {raw.strerror or raw}", cause=raw)
        )
        if suspend_errors:
            first = suspend_errors[0]
            if isinstance(first, TorporError):
                raise first from e
            raise OperationError(
                f"suspend inside the save failed: {first!r}",
                state=observed_state(orch.host.hypervisor, domid),
                cause=first,
            ) from e
        if not suspended:
            locate(e, ctx)
            raise MigrationFailed(
                f"save failed before the guest was asked to suspend: {e.message}; "
                f"nothing written, guest left {observed_state(orch.host.hypervisor, domid)}",
                state=observed_state(orch.host.hypervisor, domid),
                cause=e,
                phase=e.phase,
                domid=domid,
            ) from e
        ctx.phase = Phase.SAVE
        await rollback_migration(orch, ctx, e)
    drop_device_model_state()
    # The suspend ran inside the save phase (xc_domain_save called it).
    save_seconds = sum(t.seconds for t in save_timings) - waited[0]
    async with orch._phase(ctx, Phase.CLEANUP, save_timings):
        await completing(orch, builder.destroy, domid)
    return Result(
        domid=domid,
        operation="save",
        guest_type=ctx.guest_type_name,
        outcome="saved",
        state=_destroyed_state(orch.host.hypervisor, domid),
        method=ctx.method,
        timings=(
            *timings,
            *suspended[0].timings,
            PhaseTiming(Phase.SAVE, max(save_seconds, 0.0)),
            *save_timings[1:],
        ),
        details=(("file", target), *sorted(check.items())),
    )


async def save_state(orch: Orchestrator, ctx: OperationContext) -> SavedDomain:
    """The builder's state plus the device model's saved state."""
    builder = builder_of(orch.host, "save")
    saved = await in_thread(builder.save, ctx.domid)
    dm_state = ctx.facts.get("device_model_state")
    if dm_state:
        # libxl puts QEMU's saved device state in the stream (EMULATOR_CONTEXT),
        # unless the builder already carried the device model's state itself.
        if saved.device_model is None:
            with open(dm_state, "rb") as f:
                saved = attrs.evolve(saved, device_model=f.read())
        os.unlink(dm_state)
    return attrs.evolve(
        saved, source={**saved.source, "host": orch.host.name, "saved_at": time.time()}
    )


async def rollback_migration(orch: Orchestrator, ctx: OperationContext, error: TorporError) -> None:
    """Saving failed after the guest suspended: resume it where it was, then raise."""
    try:
        await rollback(orch, ctx, error)
    except OperationError as e:
        raise MigrationFailed(
            e.message, state=e.state, cause=error, phase=ctx.phase, domid=ctx.domid
        ) from error


def _destroyed_state(hv: Any, domid: int) -> str:
    """After the builder destroyed a domain: ``destroyed`` if the hypervisor no
    longer knows it, else what it says (``dying`` while Xen tears it down)."""
    state = observed_state(hv, domid)
    return "destroyed" if state == "gone" else state

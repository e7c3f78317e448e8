"""Restore: build a new domain from a save image and start it.

libxl: ``libxl_domain_create_restore`` (libxl_create.c), which builds the
domain paused, then ``libxl_domain_unpause`` (device model ``cont``, then
unpause).  The image is verified before anything is built; a name another
domain holds is refused first (``libxl__domain_make`` refuses it too); the
guest wakes in a new domain (its suspend hypercall returns 0), rebuilds, and
its frontends reconnect -- which the plugins' checks wait for.  A domain that
was built but did not come up is destroyed; the image is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TypeVar

import attrs

from torpor.engine import observed_state
from torpor.errors import (
    ImageError,
    Interrupted,
    MigrationFailed,
    ResumeFailed,
    TorporError,
)
from torpor.livesave import IncomingImage
from torpor.model import (
    Phase,
    PhaseTiming,
    Result,
)
from torpor.operations.resume import verify_resumed
from torpor.operations.threads import builder_of, in_thread, interruption

if TYPE_CHECKING:
    from torpor.builder import DomainBuilder, FileSaver
    from torpor.image import SavedDomain
    from torpor.orchestrator import Orchestrator

log = logging.getLogger("torpor")
T = TypeVar("T")


async def restore(
    orch: Orchestrator,
    source: str | os.PathLike[str] | SavedDomain | IncomingImage,
    *,
    expect_kind: str | None = None,
    name: str | None = None,
) -> Result:
    """Build a new domain from a save image and resume it non-cooperatively.

    The image is read and verified before anything is created.  The guest
    takes the full rebuild path (its suspend hypercall returns 0) and its
    frontends reconnect to this host's backends.  If the resume fails the
    new domain is destroyed; the image is untouched.

    A domain's name is unique on a host, as xl keeps it: if a domain
    already has the guest's name (the one the image carries, or ``name``),
    the restore is refused before anything is built --
    :class:`~torpor.errors.NameInUse`, naming that domain.  ``name``
    restores the guest under another name: a copy of the guest, which
    also gets a fresh UUID (two domains sharing one would share
    ``/vm/<uuid>`` in xenstore), as ``xl restore`` of a config file with a
    new name and no UUID does.
    """
    orch._check_loop()
    from torpor.builder import FileSaver
    from torpor.host import validate_domain_name
    from torpor.image import read_image

    if name is not None:
        name = validate_domain_name(name)
    if isinstance(source, IncomingImage):
        return await _restore_incoming(orch, source, expect_kind)
    if isinstance(source, (str, os.PathLike)):
        from torpor.xl_savefile import sniff

        path = os.fspath(source)
        builder = builder_of(orch.host, "restore")
        try:
            fmt = await in_thread(sniff, path)
        except OSError as e:
            raise ImageError(f"cannot read save file {path}: {e.strerror or e}", cause=e) from e
        if isinstance(builder, FileSaver):
            if fmt != builder.file_format:
                what = (
                    "torpor's own image, written on a simulated host"
                    if fmt == "torpor"
                    else f"not an {builder.file_format} save file"
                )
                raise ImageError(
                    f"{path} is {what}; host {orch.host.name} restores "
                    f"{builder.file_format} save files"
                )
            return await _restore_file(orch, builder, path, expect_kind, name)
        if fmt == "xl":
            raise ImageError(
                f"{path} is not a torpor save image but an xl save file (real Xen); "
                f"host {orch.host.name} restores torpor's own images"
            )

    t0 = time.perf_counter()
    saved = (
        source
        if not isinstance(source, (str, os.PathLike))
        else await in_thread(read_image, source)
    )
    if expect_kind is not None and saved.kind != expect_kind:
        raise ImageError(f"image holds a {saved.kind} guest, not {expect_kind}")
    saved_name = saved.domain.get("name")
    if name is not None and name != saved_name:
        import uuid

        # The builder builds what the image describes: a copy under ``name``.
        saved = attrs.evolve(
            saved, domain={**saved.domain, "name": name, "uuid": str(uuid.uuid4())}
        )
    builder = builder_of(orch.host, "restore")
    wanted = saved.domain.get("name")
    async with _name_free(orch, wanted if isinstance(wanted, str) else None):
        result = await _build_and_start(
            orch, builder, functools.partial(builder.restore, saved), t0=t0, intact="the image"
        )
    return attrs.evolve(
        result,
        details=(
            *result.details,
            ("name", wanted),
            ("checksum", saved.checksum()),
            ("memory_checksum", saved.memory_checksum()),
        ),
    )


async def _restore_incoming(
    orch: Orchestrator, incoming: IncomingImage, expect_kind: str | None
) -> Result:
    """Restore a live migration's stream, which arrived here while it was sent.

    The name it carries must be free, as for any restore; the builder then
    builds the domain from what arrived, paused, and it is started.
    """
    t0 = time.perf_counter()
    if expect_kind is not None and incoming.kind != expect_kind:
        raise ImageError(f"the stream holds a {incoming.kind} guest, not {expect_kind}")
    builder = builder_of(orch.host, "restore")
    wanted = incoming.domain.get("name")
    async with _name_free(orch, wanted if isinstance(wanted, str) else None):
        result = await _build_and_start(orch, builder, incoming.build, t0=t0, intact="the source")
    return attrs.evolve(
        result,
        details=(
            *result.details,
            ("name", wanted),
            ("checksum", incoming.checksum),
            ("memory_checksum", incoming.memory_checksum),
        ),
    )


async def _restore_file(
    orch: Orchestrator,
    builder: FileSaver,
    path: str,
    expect_kind: str | None,
    name: str | None = None,
) -> Result:
    """Restore from a file the builder reads itself (real Xen: an xl save file).

    The file is walked to its end first (nothing is built from a corrupt
    or truncated file) and the name it carries (or ``name``) must be free;
    the builder then builds the domain, paused, under that name, and
    starts it; torpor waits for the guest to run again in its new domain.
    """
    t0 = time.perf_counter()
    info = await in_thread(builder.verify_save, path)
    if expect_kind is not None and info.get("guest_type") != expect_kind:
        raise ImageError(f"{path} holds a {info.get('guest_type')} guest, not {expect_kind}")
    wanted = name if name is not None else info.get("name")
    async with _name_free(orch, wanted if isinstance(wanted, str) else None):
        result = await _build_and_start(
            orch,
            builder,
            functools.partial(builder.restore_file, path, name=name),
            t0=t0,
            intact=path,
        )
    details = {**info, "name": wanted}
    return attrs.evolve(result, details=(*result.details, ("file", path), *sorted(details.items())))


async def domain_named(orch: Orchestrator, name: str) -> int | None:
    """The domid of the domain called ``name`` on this host, or ``None``.

    As ``libxl_name_to_domid``: every domain the hypervisor lists (running,
    paused, shut down, dying), named by its xenstore
    ``/local/domain/<domid>/name``; the lowest domid if several are.
    """
    from torpor.errors import XenstoreError

    hv = orch.host.hypervisor
    xs = orch.host.xenstore.aio
    domids: list[int] = []
    first = 0
    while True:  # xc_domain_getinfolist pages: libxl_list_domain reads them all
        batch = hv.domain_info_list(first, 1024)
        domids += [i.domid for i in batch]
        if len(batch) < 1024:
            break
        first = batch[-1].domid + 1
    names = await asyncio.gather(
        *(xs.read_or(f"/local/domain/{d}/name", None) for d in domids),
        return_exceptions=True,
    )
    for domid, got in zip(domids, names, strict=True):
        if isinstance(got, BaseException):
            if isinstance(got, XenstoreError):
                continue  # gone meanwhile, or not ours to read: libxl skips it too
            raise got
        if got == name:
            return domid
    return None


@contextlib.asynccontextmanager
async def _name_free(orch: Orchestrator, name: str | None) -> AsyncIterator[None]:
    """Hold ``name`` for a restore: refuse (NameInUse) if a domain has it.

    A lock file per name in :attr:`Host.lock_dir` keeps two restores under
    one name (in this process or another) from both passing the check
    before either has built its domain.  ``None``: the image names no
    guest; the builder decides (libxl refuses a config without a name).
    """
    if name is None:
        yield
        return
    import hashlib

    from torpor.errors import NameInUse

    os.makedirs(orch.host.lock_dir, mode=0o700, exist_ok=True)
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    lock = os.path.join(orch.host.lock_dir, f"name-{digest}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NameInUse(
                f"another restore under the name {name!r} is under way ({lock}); nothing was built",
                name=name,
                holder=None,
                phase=Phase.VALIDATE,
            ) from None
        holder = await domain_named(orch, name)
        if holder is not None:
            raise NameInUse(
                f"domain {holder} ({observed_state(orch.host.hypervisor, holder)}) is "
                f"already named {name!r}: a second domain of that name would be a "
                "second copy of one guest; nothing was built. Restore it under "
                "another name (name=..., `torpor restore FILE --name NEW`)",
                name=name,
                holder=holder,
                phase=Phase.VALIDATE,
            )
        yield
    finally:
        os.close(fd)


async def _build_and_start(
    orch: Orchestrator,
    builder: DomainBuilder | FileSaver,
    build: Callable[[], int],
    *,
    t0: float,
    intact: str,
) -> Result:
    """Build the new domain (phase ``restore``, timed from ``t0``), then start it.

    Either the guest runs in its new domain, or no new domain is left:
    one that was built but did not come up is destroyed, and the error
    says the source (``intact``: the image, the file) was not touched.
    """
    building = asyncio.ensure_future(asyncio.to_thread(build))
    try:
        domid = await asyncio.shield(building)
    except TorporError as e:
        raise MigrationFailed(
            f"building the domain failed: {e.message}",
            state="not created",
            phase=Phase.RESTORE,
            cause=e,
        ) from e
    except asyncio.CancelledError:
        await asyncio.wait([building])  # the build cannot be stopped: undo it after
        if not building.cancelled() and building.exception() is None:
            with contextlib.suppress(TorporError):
                await in_thread(builder.destroy, building.result())
        interrupted = interruption(
            orch,
            f"restore interrupted ({orch._interrupted}) while building the domain; "
            f"what was built is destroyed, {intact} is intact",
            state="not created",
        )
        if interrupted is None:
            raise
        raise interrupted from None
    built = PhaseTiming(Phase.RESTORE, time.perf_counter() - t0)
    try:
        result = await _start_restored(orch, domid, builder)
    except asyncio.CancelledError:
        with contextlib.suppress(TorporError):
            await in_thread(builder.destroy, domid)
        raise
    except TorporError as e:
        with contextlib.suppress(TorporError):
            await in_thread(builder.destroy, domid)
        if isinstance(e, Interrupted):
            raise Interrupted(
                f"{e.message}; new domain {domid} destroyed, {intact} is intact",
                reason=e.reason,
                clean=True,
                domid=domid,
                phase=e.phase,
                state="not restored",
            ) from e
        raise MigrationFailed(
            f"the restored guest did not resume: {e}; new domain {domid} "
            f"destroyed, {intact} is intact",
            state="not restored",
            domid=domid,
            phase=e.phase,
            cause=e,
        ) from e
    return attrs.evolve(
        result, operation="restore", outcome="restored", timings=(built, *result.timings)
    )


async def _start_restored(
    orch: Orchestrator, domid: int, builder: DomainBuilder | FileSaver
) -> Result:
    """A domain the builder restored and left paused: start it, see it run.

    The guest wakes in a new domain (its suspend hypercall returns 0): it
    rebuilds and its frontends reconnect, which the plugins' verify
    hooks wait for, as after a non-cooperative resume.
    """
    async with orch._claim(domid, "restore"):
        ctx = await orch._context("restore", domid)
        ctx.cooperative = False
        ctx.in_place = False
        async with orch._reporting(ctx):
            gt = ctx.guest_type
            assert gt is not None
            timings: list[PhaseTiming] = []
            await orch._notify("torpor_before_resume", ctx=ctx)
            async with orch._phase(ctx, Phase.RESUME, timings):
                await in_thread(builder.start, domid)
                orch._refresh(ctx)
                if ctx.domain.paused:
                    raise ResumeFailed(
                        f"domain {domid} is still paused after the builder started it",
                        state="paused",
                    )
            async with orch._phase(ctx, Phase.GUEST_RESUME, timings):
                await orch._all("torpor_resume_guest", ctx=ctx)
            async with orch._phase(ctx, Phase.VERIFY, timings):
                await verify_resumed(orch, ctx, shut=True, s3=False)
            result = Result(
                domid=domid,
                operation="restore",
                guest_type=gt.name,
                outcome="restored",  # what the caller's Result says, hooks included
                state=ctx.domain.state_word(),
                cooperative=False,
                timings=tuple(timings),
            )
            await orch._notify("torpor_after_resume", ctx=ctx, result=result)
            return result

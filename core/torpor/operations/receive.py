"""Receive a migration over xl's protocol: ``torpor migrate-receive``.

xl's ``migrate_receive`` (tools/xl/xl_migrate.c, 4.17), on a channel (the
command's stdin and stdout, which ``ssh`` connects to the sender):

1. the banner;
2. the save stream -- on real Xen xl's header and config (the domain built
   as ``NAME--incoming``, as xl's create_domain names it, same UUID), then
   libxl's stream, read by ``libxl_domain_create_restore`` straight from the
   channel; on a simulated host torpor's image -- built paused (``restore``);
3. "ready"; then the sender's permission to go.  No permission (the sender
   gave up, or died): the copy never ran and is destroyed -- the sender still
   has the guest;
4. the copy renamed ``NAME`` and started (``libxl_domain_unpause``, QEMU
   first), then torpor waits for the guest to run in its new domain and its
   frontends to reconnect (``resume``, ``guest-resume``, ``verify``);
5. the report: 0, or -rc of libxl (3, ``ERROR_FAIL``...) after destroying the
   copy, followed by permission for the sender to resume its own.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import time
from typing import TYPE_CHECKING

import attrs

from torpor.errors import MigrationFailed, NameInUse, TorporError
from torpor.model import Phase, PhaseTiming, Result
from torpor.operations.names import rename_domain
from torpor.operations.restore import _name_free, _start_restored
from torpor.operations.threads import builder_of, in_thread

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator
    from torpor.xlmigrate import Channel

log = logging.getLogger("torpor")

__all__ = ["migrate_receive"]

#: libxl's ERROR_FAIL, ERROR_INVAL: what the report's status octet carries (-rc).
STATUS_FAIL = 3
STATUS_INVAL = 6


async def migrate_receive(
    orch: Orchestrator,
    channel: Channel,
    *,
    pause_after: bool = False,
    go_timeout: float | None = None,
) -> Result:
    """Receive one domain on ``channel``; see the module's docstring.

    :param pause_after: leave the copy paused once renamed (xl's ``-p``).
    :param go_timeout: how long to wait for permission to go (xl: for ever).
    :raises MigrationFailed: nothing of the guest is left here (the sender has it).
    """
    orch._check_loop()
    from torpor.builder import FileSaver
    from torpor.xlmigrate import BANNER, GO, READY, REPORT

    builder = builder_of(orch.host, "restore")
    await in_thread(channel.write_all, BANNER, "banner")
    t0 = time.perf_counter()

    def read(n: int, what: str) -> bytes:
        return channel.read_exact(n, what, None)

    if isinstance(builder, FileSaver):
        from torpor.xl import XlBuilder
        from torpor.xl_savefile import read_xl_header, renamed_config

        assert isinstance(builder, XlBuilder)
        config = await in_thread(read_xl_header, read)
        name = json.loads(config)["c_info"].get("name") or None
        incoming = f"{name}--incoming" if name else None
        if incoming is not None:
            config = renamed_config(config, incoming, fresh_uuid=False)
        build = functools.partial(builder.restore_stream, config, channel.recv_fd)
    else:
        from torpor.image import decode, read_stream

        raw = await in_thread(read_stream, read)
        saved = await in_thread(decode, io.BytesIO(raw))
        name = saved.domain.get("name") or None
        incoming = f"{name}--incoming" if name else None
        if incoming is not None:
            saved = attrs.evolve(saved, domain={**saved.domain, "name": incoming})
        build = functools.partial(builder.restore, saved)
    async with _name_free(orch, incoming):
        try:
            domid = await in_thread(build)  # left paused
        except TorporError as e:
            raise MigrationFailed(
                f"building the incoming domain failed: {e.message}",
                state="not created",
                phase=Phase.RESTORE,
                cause=e,
            ) from e
    timings = [PhaseTiming(Phase.RESTORE, time.perf_counter() - t0)]

    async def destroy() -> None:
        with contextlib.suppress(TorporError):
            await in_thread(builder.destroy, domid)

    try:
        await in_thread(channel.write_all, READY, "ready message")
        await in_thread(channel.expect, GO, "GO message", go_timeout)
    except BaseException as e:
        await destroy()  # it never ran: the sender still has the guest
        if not isinstance(e, Exception):
            raise
        raise MigrationFailed(
            f"no permission to start domain {domid} ({e}); it never ran and was destroyed",
            state="not restored",
            domid=domid,
            phase=Phase.RESTORE,
            cause=e,
        ) from e
    failure: TorporError | None = None
    status = 0
    started: Result | None = None
    try:
        if name and incoming:
            await rename_domain(orch, domid, incoming, name)
        if not pause_after:
            started = await _start_restored(orch, domid, builder)
    except NameInUse as e:
        failure, status = e, STATUS_INVAL
    except TorporError as e:
        failure, status = e, STATUS_FAIL
    if failure is not None:
        await destroy()
    try:
        await in_thread(channel.write_all, REPORT + bytes([status]), "success/failure report")
        if failure is not None:
            await in_thread(channel.write_all, GO, "permission to sender to have domain back")
    except TorporError as e:
        if failure is None:
            log.warning("domain %d runs here, but the sender did not hear so: %s", domid, e)
        raise MigrationFailed(
            f"the sender did not take the report: {e.message}", domid=domid, cause=e
        ) from e
    if failure is not None:
        raise MigrationFailed(
            f"the guest could not be started here: {failure.message}; the copy was "
            "destroyed and the sender told to resume its own",
            state="not restored",
            domid=domid,
            phase=failure.phase,
            cause=failure,
        ) from failure
    from torpor.engine import observed_state

    if started is not None:
        timings += list(started.timings)
    return Result(
        domid=domid,
        operation="migrate-receive",
        guest_type=started.guest_type if started is not None else "?",
        outcome="received",
        state=observed_state(orch.host.hypervisor, domid),
        cooperative=False,
        timings=tuple(timings),
        details=(("name", name), ("paused", pause_after)),
    )

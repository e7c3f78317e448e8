"""Migrate over xl's migration protocol: ``torpor migrate DOMID --to xl://HOST``.

xl's ``migrate_domain`` (tools/xl/xl_migrate.c, 4.17), step by step, with
torpor's suspend inside the save stream:

1. ``connect`` -- run ``exec SSH HOST xl migrate-receive`` (``--ssh-command``,
   xl's ``-s``) and read its banner; nothing has touched the guest yet;
2. the save stream, as ``xl migrate`` sends it: xl's header and the domain's
   config, then libxl's stream -- live where the guest's dirty pages can be
   tracked (``precopy`` rounds), then torpor's suspend and ``save`` (on a
   simulated host: torpor's image, live or not);
3. ``restore`` -- the receiver builds the domain (``NAME--incoming``,
   paused) and says it is ready;
4. the source is renamed ``NAME--migratedaway``; permission to go is sent
   (the point of no return);
5. ``resume`` -- the receiver renames its copy ``NAME``, starts it and
   reports: 0, and the source is destroyed (``cleanup``); anything else,
   and once the receiver has destroyed its copy and sent permission back,
   the source is renamed back and resumed cooperatively.

Every failure before step 4 leaves the guest running here: never stopped
(during precopy), or resumed.  After it, xl's "Domain state is now
undefined": if the receiver goes silent after permission to go, the source
stays suspended and renamed, its intent record says so (``torpor status``),
and ``torpor recover`` refuses to start a second copy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any, NoReturn

from torpor.errors import (
    BackendUnavailable,
    LiveUnavailable,
    MigrationFailed,
    TorporError,
)
from torpor.host import validate_domid
from torpor.model import Phase, PhaseTiming, PrecopyPolicy, Result
from torpor.operations.migrate import downtime_of, live_refusal, stream_guest
from torpor.operations.names import rename_domain
from torpor.operations.restore import domain_named
from torpor.operations.save import rollback_migration
from torpor.operations.threads import builder_of, completing, in_thread

if TYPE_CHECKING:
    from torpor.context import OperationContext
    from torpor.livesave import LiveSaveReport, SaveCallbacks
    from torpor.orchestrator import Orchestrator
    from torpor.xlmigrate import ReceiverProcess

log = logging.getLogger("torpor")

#: How long the receiver may take to answer: its banner, and each of its
#: messages after the stream (it builds, then starts the domain).
BANNER_TIMEOUT = 60.0
ANSWER_TIMEOUT = 600.0


async def migrate_xl(
    orch: Orchestrator,
    domid: int,
    host: str,
    *,
    ssh_command: str = "ssh",
    live: bool | None = None,
    precopy: PrecopyPolicy | None = None,
    receive_flags: str = "",
    answer_timeout: float = ANSWER_TIMEOUT,
) -> Result:
    """Send a domain to ``xl migrate-receive`` (or ``torpor migrate-receive``) on
    ``host`` over xl's migration protocol; see the module's docstring."""
    orch._check_loop()
    domid = validate_domid(domid)
    from torpor.builder import FileSaver
    from torpor.livesave import SimMemory
    from torpor.xlmigrate import ProtocolError, ReceiverProcess, rune

    builder = builder_of(orch.host, "migrate")
    if not isinstance(builder, (FileSaver, SimMemory)):
        raise BackendUnavailable(
            f"host {orch.host.name} cannot write a migration stream", domid=domid
        )
    policy = precopy if precopy is not None else PrecopyPolicy()
    target = f"xl://{host}"
    async with orch._claim(domid, "migrate"):
        ctx = await orch._context("migrate", domid)
        async with orch._reporting(ctx):
            name = await ctx.xenstore.read_or(f"{ctx.dompath}/name", None) or None
            refusal = await in_thread(live_refusal, orch, ctx, builder)
            if live and refusal is not None:
                raise LiveUnavailable(
                    f"a live migration of domain {domid} cannot be had: {refusal}; "
                    "the guest was not touched (without --live it migrates non-live)",
                    reason=refusal,
                    state=ctx.domain.state_word(),
                    phase=Phase.VALIDATE,
                )
            is_live = live is not False and refusal is None
            send = await _sender(orch, ctx, builder, is_live)
            timings: list[PhaseTiming] = []
            async with orch._phase(ctx, Phase.CONNECT, timings):
                receiver = await in_thread(ReceiverProcess, rune(ssh_command, host, receive_flags))
                try:
                    await in_thread(receiver.channel.expect, _BANNER(), "banner", BANNER_TIMEOUT)
                except TorporError as e:
                    await in_thread(receiver.finish, 2.0)
                    raise MigrationFailed(
                        receiver.why(f"no migration receiver on {host}: {e.message}")
                        + "; the guest was not touched",
                        state=ctx.domain.state_word(),
                        cause=e,
                    ) from e
            if orch.record_intent:
                await orch._intent.begin(
                    domid, "migrate", migration="streaming", to=target, name=name
                )
            try:
                return await _handshake(
                    orch,
                    ctx,
                    receiver,
                    send,
                    timings,
                    target=target,
                    host=host,
                    name=name,
                    live=is_live,
                    refusal=refusal,
                    policy=policy,
                    answer_timeout=answer_timeout,
                )
            except ProtocolError as e:
                raise MigrationFailed(
                    receiver.why(e.message), state=e.state, cause=e.cause, phase=e.phase
                ) from e
            finally:
                await in_thread(receiver.finish, 10.0)


def _BANNER() -> bytes:
    from torpor.xlmigrate import BANNER

    return BANNER


async def _sender(orch: Orchestrator, ctx: OperationContext, builder: Any, live: bool) -> Any:
    """What writes the save stream to the channel's descriptor: ``send(fd)``
    returning ``send(callbacks) -> LiveSaveReport``."""
    from torpor.builder import FileSaver
    from torpor.livesave import LiveSaveReport, sim_save_stream

    domid = ctx.domid
    if isinstance(builder, FileSaver):
        job = await in_thread(builder.prepare_save, domid)  # the config; nothing touched

        def xen(fd: int, cb: SaveCallbacks) -> LiveSaveReport:
            builder.write_save(  # type: ignore[call-arg]
                job,
                fd,
                cb.suspend,
                cb.device_model_state,
                live=live,
                precopy_policy=cb.precopy_policy,
                qemu_logdirty=cb.device_model_logdirty,
            )
            return LiveSaveReport(precopy_pages=-1, final_pages=-1, size=-1)

        return xen
    domain = await in_thread(builder.describe, domid)
    source = {"host": orch.host.name, "domid": domid, "live": live}

    def sim(fd: int, cb: SaveCallbacks) -> LiveSaveReport:
        from torpor.xlmigrate import Channel

        channel = Channel(fd, -1)
        return sim_save_stream(
            builder,
            domid,
            lambda data: channel.write_all(data, "save stream"),
            cb,
            live=live,
            domain=domain,
            source=source,
        )

    return sim


async def _handshake(
    orch: Orchestrator,
    ctx: OperationContext,
    receiver: ReceiverProcess,
    send: Any,
    timings: list[PhaseTiming],
    *,
    target: str,
    host: str,
    name: str | None,
    live: bool,
    refusal: str | None,
    policy: PrecopyPolicy,
    answer_timeout: float,
) -> Result:
    from torpor.xlmigrate import GO, READY, REPORT

    domid = ctx.domid
    channel = receiver.channel
    streamed = None
    away: str | None = None
    try:
        streamed = await stream_guest(
            orch,
            ctx,
            functools.partial(send, channel.send_fd),
            live=live,
            policy=policy,
        )
        orch._intent.update(domid, migration="sent")
        # The receiver builds the domain (paused) and says so.
        async with orch._phase(ctx, Phase.RESTORE, timings):
            await in_thread(channel.expect, READY, "ready message", answer_timeout)
        # "right, at this point we are about give the destination permission to
        # rename and resume, so we must first rename the domain away ourselves"
        if name:
            await rename_domain(orch, domid, name, f"{name}--migratedaway")
            away = f"{name}--migratedaway"
            orch._intent.update(domid, migration="renamed", away=away)
    except TorporError as e:
        await _give_back(orch, ctx, receiver, e, name=name, away=None)
    # The point of no return: the receiver may start the guest from here.
    orch._intent.update(domid, migration="go")
    try:
        await in_thread(channel.write_all, GO, "GO message")
    except TorporError as e:
        # A message shorter than PIPE_BUF goes whole or not at all: it did not.
        await _give_back(orch, ctx, receiver, e, name=name, away=away)
    resume_timing: list[PhaseTiming] = []
    try:
        async with orch._phase(ctx, Phase.RESUME, resume_timing):
            await in_thread(
                channel.expect, REPORT, "success/failure report message", answer_timeout
            )
            status = (
                await in_thread(channel.read_exact, 1, "success/failure status", answer_timeout)
            )[0]
    except TorporError as e:
        raise _undefined(orch, ctx, host, away, e) from e
    timings.extend(resume_timing)
    if status:
        # "Target reports startup failure": it destroys its copy, then gives ours back.
        try:
            await in_thread(channel.expect, GO, "permission for sender to resume", answer_timeout)
        except TorporError as e:
            raise _undefined(orch, ctx, host, away, e) from e
        failure = MigrationFailed(
            f"the receiver on {host} could not start the guest (status {status}: "
            f"{_libxl_error(status)})",
            domid=domid,
            phase=Phase.RESUME,
        )
        await _give_back(orch, ctx, receiver, failure, name=name, away=away)
    orch._intent.update(domid, migration="done")
    async with orch._phase(ctx, Phase.CLEANUP, timings):
        await completing(orch, builder_of(orch.host, "migrate").destroy, domid)  # "bang!"
    assert streamed is not None
    all_timings = [*streamed.all_timings(), *timings[1:]]
    all_timings.insert(0, timings[0])  # the connection came first
    there = await _observe_there(orch, host, name)
    details: list[tuple[str, object]] = [
        ("source_domid", domid),
        ("source", orch.host.name),
        ("destination", target),
        ("destination_domid", there[0]),
        ("protocol", "xl"),
        ("live", live),
        ("downtime", round(downtime_of(all_timings), 6)),
    ]
    if live:
        details += streamed.details(policy)
        if streamed.sent.precopy_pages < 0:
            details = [d for d in details if d[0] not in ("precopy_pages", "final_pages", "bytes")]
    else:
        details.append(("live_refusal", refusal or "non-live migration requested"))
    return Result(
        domid=there[0] if there[0] is not None else domid,
        operation="migrate",
        guest_type=ctx.guest_type_name,
        outcome="migrated",
        state=there[1],
        method=ctx.method,
        cooperative=False,
        timings=tuple(all_timings),
        details=tuple(details),
    )


async def _give_back(
    orch: Orchestrator,
    ctx: OperationContext,
    receiver: ReceiverProcess,
    error: TorporError,
    *,
    name: str | None,
    away: str | None,
) -> NoReturn:
    """The guest stays here: close the stream, rename it back, resume it if it was
    suspended (``failed_resume``), then raise saying so."""
    from torpor.xlmigrate import ProtocolError

    receiver.close_send()
    message = receiver.why(error.message) if isinstance(error, ProtocolError) else error.message
    e: TorporError = (
        error if not isinstance(error, ProtocolError) else MigrationFailed(message, cause=error)
    )
    if away and name:
        with contextlib.suppress(TorporError):
            await rename_domain(orch, ctx.domid, away, name)
    orch._intent.update(ctx.domid, migration="given back")
    if ctx.facts.get("stopped"):
        await rollback_migration(orch, ctx, e)  # raises, saying the guest was resumed
    raise e


def _undefined(
    orch: Orchestrator, ctx: OperationContext, host: str, away: str | None, e: TorporError
) -> MigrationFailed:
    """xl's ``failed_badly``: the receiver had permission to start the guest and then
    went silent.  Whether its copy runs cannot be known from here: the source
    stays suspended (renamed ``away``), its intent record kept saying so."""
    orch._intent.keep(
        ctx.domid,
        migration="go",
        undefined=True,
        away=away,
        interrupted=f"the receiver on {host} went silent after permission to go",
    )
    return MigrationFailed(
        f"migration failed during the final handshake: {e.message}. The receiver on "
        f"{host} was given permission to start the guest; whether its copy runs is "
        f"unknown. Domain {ctx.domid} stays suspended here"
        + (f" as {away!r}" if away else "")
        + ": check the destination before destroying it here, or renaming it back and "
        "resuming it (two copies of one guest must never run)",
        state="suspended",
        cause=e,
        phase=Phase.RESUME,
        domid=ctx.domid,
    )


async def _observe_there(orch: Orchestrator, host: str, name: str | None) -> tuple[int | None, str]:
    """The copy's domid and state, where they can be observed: on this host (the
    receiver was local: its name is here now).  Elsewhere only its report is
    known."""
    from torpor.engine import observed_state

    if name is not None and _local(host):
        there = await domain_named(orch, name)
        if there is not None:
            return there, observed_state(orch.host.hypervisor, there)
    return None, "reported running"


def _local(host: str) -> bool:
    import socket

    return host in ("localhost", "127.0.0.1", "::1", socket.gethostname())


_LIBXL_ERRORS = {
    3: "ERROR_FAIL",
    6: "ERROR_INVAL",
    9: "ERROR_TIMEDOUT",
    21: "ERROR_DOMAIN_NOTFOUND",
}


def _libxl_error(status: int) -> str:
    return _LIBXL_ERRORS.get(status, f"libxl error -{status}")


__all__ = ["migrate_xl"]

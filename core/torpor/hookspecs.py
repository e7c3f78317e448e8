"""The plugin API: every hook torpor calls, when it calls it, and what it expects.

A guest-type plugin is a module (or object) with functions decorated with
:data:`torpor.hookimpl`, named after the specs below, registered through the
``torpor`` entry-point group::

    [project.entry-points.torpor]
    pvh = "torpor_pvh.plugin"

torpor calls hooks with keyword arguments only; an implementation may accept
any subset of a spec's parameters.  An implementation may be a coroutine
function (``async def``): torpor awaits it.  Hooks run on the orchestrator's
event loop, so an implementation must not block -- do I/O with ``await``
(``ctx.xenstore``, ``await ctx.device_model()``); quick hypervisor calls
(``ctx.hypervisor``) are fine.

Ordering, deadlines, waiting, cancelling and the result are the
orchestrator's.  A plugin *acts* (requests a suspend, stops a device model)
and *judges* (is the domain suspended yet?); it never loops or sleeps waiting
for something: the orchestrator re-asks a ``torpor_check_*`` hook each time
an event arrives (``@releaseDomain``, the suspend event channel, a device
model event, a watched xenstore node) until it answers done or failed, or
the deadline passes.

``firstresult`` hooks stop at the first implementation that returns something
other than ``None``; the most recently registered plugin is asked first, and
torpor's own generic implementations (:mod:`torpor.protocol`) are registered
first, so they answer last.

Hooks are grouped as: classification, suspend, resume, lifecycle
notifications (for embedding toolstacks; their return values are ignored).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torpor.context import OperationContext
    from torpor.errors import TorporError
    from torpor.host import Host
    from torpor.model import (
        DomainInfo,
        GuestType,
        Phase,
        PrecopyRound,
        Result,
        SuspendMethod,
        Verdict,
    )

__all__ = [
    "hookimpl",
    "hookspec",
    "torpor_after_resume",
    "torpor_after_suspend",
    "torpor_before_resume",
    "torpor_before_suspend",
    "torpor_check_resumed",
    "torpor_check_suspended",
    "torpor_choose_suspend_method",
    "torpor_classify_domain",
    "torpor_device_model_resume",
    "torpor_device_model_suspend",
    "torpor_operation_failed",
    "torpor_phase_finished",
    "torpor_phase_started",
    "torpor_precopy_round",
    "torpor_request_suspend",
    "torpor_resume_guest",
    "torpor_veto_suspend",
]

#: Marks a hook specification (torpor's own use).
hookspec = pluggy.HookspecMarker("torpor")
#: Marks a hook implementation: decorate your plugin's functions with it.
hookimpl = pluggy.HookimplMarker("torpor")


# ---------------------------------------------------------------------------
# classification


@hookspec(firstresult=True)
def torpor_classify_domain(domain: DomainInfo, host: Host) -> GuestType | None:
    """Claim a domain: say which guest type it is, or ``None`` if not yours.

    Called at the start of every operation (suspend, resume, save, restore,
    migrate, recover; a checkpoint is a suspend and a resume), and by
    ``torpor list`` and ``torpor status``, before anything is touched.  Look
    only: read the domain info, HVM params (``host.hypervisor.get_hvm_param``),
    never change the domain.  To read xenstore, make the implementation
    ``async def`` and use ``host.xenstore.aio``: the hook runs on the event loop.

    ``firstresult``: the first plugin to return a :class:`~torpor.model.GuestType`
    owns the domain for the whole operation.  A domain no plugin claims gets
    :class:`~torpor.errors.UnsupportedGuest`.

    :param domain: the hypervisor's view of the domain (flags, emulation flags).
    :param host: the host, for read-only probes (hypervisor, xenstore).
    :return: the guest type and its capabilities, or ``None``.
    """


# ---------------------------------------------------------------------------
# suspend


@hookspec(firstresult=True)
def torpor_choose_suspend_method(
    ctx: OperationContext, default: SuspendMethod
) -> SuspendMethod | None:
    """Pick how to ask this guest to suspend.

    Called once per suspend, after classification, with ``default`` = libxl's
    choice: the suspend event channel if the guest published one and is not
    in S3; a hard ``shutdown(suspend)`` for an HVM guest without PV drivers or
    one already in S3; else the xenstore handshake.  ``ctx.facts`` holds what
    that choice was made from (``suspend_event_channel``, ``s3``).

    ``firstresult``: return a method to override the default (the HVM plugin
    returns ``ACPI_S3`` when the guest has an agent that can put it to sleep),
    or ``None`` to keep it.

    :param ctx: the operation; ``ctx.guest_type`` is set.
    :param default: the method libxl would use.
    :return: a :class:`~torpor.model.SuspendMethod`, or ``None`` to keep ``default``.
    """


@hookspec(firstresult=True)
def torpor_veto_suspend(ctx: OperationContext) -> str | None:
    """Refuse a suspend before the guest is asked -- or make the guest ready for it.

    Called once per suspend: of a ``suspend`` (each domain of a bulk
    suspend), of every checkpoint of a checkpoint session, of a ``save`` and
    of a ``migrate``.  It runs last in the ``validate`` phase, after
    classification, the state checks and the choice of method
    (``ctx.method`` is set), and before anything is asked of the guest: no
    intent record, no request, no :func:`torpor_before_suspend` yet.  This
    is where a plugin quiesces what must be quiet before a suspend (qemu-ga
    ``guest-fsfreeze-freeze``, a database flush) and says no when it cannot.
    It is called once, not re-asked on events; an ``async def``
    implementation may take as long as its work takes (an interrupt cancels
    it like any other wait).

    ``firstresult``: the first implementation to return a reason (a ``str``)
    vetoes the suspend, and those after it are not asked.  The operation then
    fails with :class:`~torpor.errors.Vetoed`, which names the plugin
    (``plugin``) and its ``reason``; nothing is sent to the guest, and the
    error's ``state`` is the state observed afterwards (``running``).  Raising
    a :class:`~torpor.errors.TorporError` vetoes it too: ``Vetoed``, the error
    as its ``cause``.  Any other exception is a plugin bug: an
    :class:`~torpor.errors.OperationError` naming the plugin and the hook,
    nothing sent to the guest either.  Return ``None`` to let the suspend go on.

    After a veto :func:`torpor_operation_failed` is called on every plugin,
    the one that vetoed included, with the ``Vetoed``: a plugin that
    quiesced something and returned ``None`` undoes it there when a plugin
    asked after it vetoes (it undoes it there too when the suspend fails
    later, and in :func:`torpor_after_resume` once the guest is back).

    :param ctx: the operation: ``ctx.operation`` names it (``suspend``,
        ``checkpoint``, ``save``, ``migrate``), ``ctx.method`` is how the
        guest will be asked, ``ctx.guest_type`` what it is.
    :return: why the suspend must not happen, or ``None`` to allow it.
    """


@hookspec(firstresult=True)
def torpor_request_suspend(ctx: OperationContext, method: SuspendMethod) -> bool | None:
    """Ask the guest to suspend by ``method``; return ``True`` once asked.

    Called once per suspend, in the ``request`` phase.  Do the asking only
    (write ``control/shutdown``, notify the channel, send the QMP / agent
    command) and return at once; the orchestrator then waits for the ack (for
    ``XENSTORE``) and for the suspended state, with its deadlines.

    ``firstresult``: torpor's generic implementation handles ``XENSTORE``,
    ``EVENT_CHANNEL`` and ``HARD_SHUTDOWN``; a plugin handles a method of its
    own (``ACPI_S3``) or returns ``None`` to let the next one try.  If nobody
    returns ``True`` the suspend fails with the method named.

    :param ctx: the operation; ``ctx.method`` is ``method``.
    :param method: the method chosen by :func:`torpor_choose_suspend_method`.
    :return: ``True`` once the guest was asked; ``None`` to let the next
        implementation try.
    """


@hookspec(firstresult=True)
def torpor_check_suspended(ctx: OperationContext) -> Verdict | None:
    """Judge whether the domain has reached its suspended state.

    Called once the guest was asked (for the xenstore handshake: once it
    acked), then each time an event arrives that might change the answer
    (``@releaseDomain``, the suspend event channel, a device model event),
    until a verdict is done or failed or the suspend deadline passes.
    ``ctx.domain`` is fresh domain info.  ``torpor recover`` also asks it, for
    a few seconds, about a guest that was asked before torpor died.

    ``firstresult``: torpor's generic implementation answers done for a domain
    shut down with reason suspend, failed for any other shutdown reason;
    the HVM plugin answers for ``ACPI_S3`` (the guest is asleep: ACPI_S_STATE
    3, QEMU ``suspended``).  Return ``None`` to defer to it.  A failure may
    carry the exception that explains it (``Verdict.fail(..., cause=err)``, as
    the HVM plugin does with its guest agent's refusal): the orchestrator's
    ``OperationError`` then keeps it as ``cause``.

    :param ctx: the operation.
    :return: :meth:`Verdict.ok`, :meth:`Verdict.fail`, :meth:`Verdict.pending`.
    """


@hookspec(firstresult=True)
def torpor_device_model_suspend(ctx: OperationContext) -> bool | None:
    """Quiesce the guest's device model once the guest is suspended.

    Called in the ``device-model-suspend`` phase, after the domain reached its
    suspended state, for guest types with ``device_model=True`` (not for a
    guest that went to sleep in ACPI S3: QEMU must stay up to wake it).

    ``firstresult``: torpor's generic implementation (:mod:`torpor.protocol`)
    does what libxl does for every such guest -- QMP ``stop`` then
    ``xen-save-devices-state`` (:func:`torpor.devicemodel.suspend_device_model`)
    -- so a guest type declaring ``device_model=True`` needs no code for it.
    Return ``True`` when you did it your own way (the generic one is then
    skipped), ``None`` to let it run.  Raise
    :class:`~torpor.errors.DeviceModelError` on failure; the orchestrator then
    resumes the guest cooperatively and reports the suspend as failed.

    :param ctx: the operation (``await ctx.device_model()`` for QMP).
    :return: ``True`` if handled, else ``None``.
    """


# ---------------------------------------------------------------------------
# resume


@hookspec(firstresult=True)
def torpor_device_model_resume(ctx: OperationContext) -> bool | None:
    """Let the device model run again, *before* the domain resumes.

    Called in the ``device-model-resume`` phase for guest types with
    ``device_model=True`` when the domain is shut down.  It must come first --
    resuming the device model after the domain made HVM resume fail silently
    (libxl commit f33b4fc4ef).  Also called in the rollback of a suspend,
    save or migration that failed after the guest suspended, and by
    ``torpor recover`` for a domain that runs while its device model is
    stopped.

    ``firstresult``: the generic implementation sends QMP ``cont`` if the
    device model is stopped (:func:`torpor.devicemodel.resume_device_model`);
    return ``True`` when you did it your own way, ``None`` to let it run.

    :param ctx: the operation.
    :return: ``True`` if handled, else ``None``.
    """


@hookspec
def torpor_resume_guest(ctx: OperationContext) -> None:
    """Guest-type work once the domain has resumed and XS_RESUME was sent.

    Called in the ``guest-resume`` phase of every resume.  A guest asleep in
    S3 was never shut down, so for it this comes straight after validation
    (no ``xc_domain_resume``, no XS_RESUME).  The HVM plugin wakes a guest in
    S3 here (``system_wakeup``).  Act only; the orchestrator then waits on
    :func:`torpor_check_resumed`.

    :param ctx: the operation; ``ctx.cooperative`` says fast or not.
    """


@hookspec(firstresult=True)
def torpor_check_resumed(ctx: OperationContext) -> Verdict | None:
    """Judge whether the resumed guest is really back.

    Called at once after :func:`torpor_resume_guest` and again on each event
    (``@releaseDomain``; device model events when the guest was in S3;
    changes under the domain's ``device/`` tree after a non-cooperative
    resume) until done or failed or the resume deadline passes.

    ``firstresult``: torpor's generic implementation answers done when the
    domain runs (not shut down, not in S3) and failed when it shut down
    again (a crash, a reboot).  A plugin may demand more (frontends
    reconnected after a resume in a new domain) or return ``None``.

    :param ctx: the operation; ``ctx.cooperative`` and ``ctx.in_place`` say
        which kind of resume it was.
    :return: :meth:`Verdict.ok`, :meth:`Verdict.fail`, :meth:`Verdict.pending`,
        or ``None``.
    """


# ---------------------------------------------------------------------------
# lifecycle notifications (for embedding toolstacks); return values ignored


@hookspec
def torpor_before_suspend(ctx: OperationContext) -> None:
    """A suspend of ``ctx.domid`` is about to start (after validation).

    Not called for a suspend that :func:`torpor_veto_suspend` refused: this
    comes after the veto, just before the guest is asked.

    :param ctx: the operation.
    """


@hookspec
def torpor_after_suspend(ctx: OperationContext, result: Result) -> None:
    """A suspend succeeded.

    :param ctx: the operation.
    :param result: what it did, with per-phase timings.
    """


@hookspec
def torpor_before_resume(ctx: OperationContext) -> None:
    """A resume of ``ctx.domid`` is about to start (after validation).

    :param ctx: the operation.
    """


@hookspec
def torpor_after_resume(ctx: OperationContext, result: Result) -> None:
    """A resume succeeded.

    :param ctx: the operation.
    :param result: what it did, with per-phase timings.
    """


@hookspec
def torpor_phase_started(ctx: OperationContext, phase: Phase) -> None:
    """A phase begins (progress displays, tracing).

    :param ctx: the operation.
    :param phase: the phase starting.
    """


@hookspec
def torpor_phase_finished(
    ctx: OperationContext, phase: Phase, seconds: float, error: TorporError | None
) -> None:
    """A phase ended, successfully (``error`` is ``None``) or not.

    Called exactly once for each :func:`torpor_phase_started`.

    :param ctx: the operation.
    :param phase: the phase that ended.
    :param seconds: how long it took.
    :param error: why it failed, or ``None``.
    """


@hookspec
def torpor_precopy_round(ctx: OperationContext, precopy: PrecopyRound) -> None:
    """A live migration sent one precopy round while the guest ran (progress).

    Called in the ``precopy`` phase once per round, after the round's pages
    were sent and the pages the guest dirtied meanwhile were counted: the
    first round sends every page, each later one the pages dirtied during the
    one before, until the precopy policy
    (:class:`~torpor.model.PrecopyPolicy`) says stop and copy -- the guest
    is then suspended and the last dirty pages sent.  The rounds also appear
    in the migration's result (``rounds``).

    :param ctx: the migration (``ctx.operation`` is ``migrate``).
    :param precopy: the round: pages sent, pages dirtied meanwhile, the
        guest's dirty rate.
    """


@hookspec
def torpor_operation_failed(ctx: OperationContext, error: TorporError) -> None:
    """An operation failed; ``error.state`` says what the domain was left in.

    Called exactly once when an operation on a classified domain fails -- a
    suspend, resume, checkpoint (its callback's failure included), save,
    migration, recovery, or the start of a restored domain -- after any
    rollback (a cooperative resume after a failed suspend) has been done.
    A suspend vetoed by :func:`torpor_veto_suspend` is a failure too: every
    plugin gets the :class:`~torpor.errors.Vetoed`, the one that vetoed
    included.
    Every :class:`~torpor.errors.TorporError` raised inside the operation (a
    plugin's ``DeviceModelError``, a lost xenstore connection, a failing
    hypervisor call) is made an :class:`~torpor.errors.OperationError` first,
    carrying the state the domain was seen in afterwards and the original as
    ``cause``.  Not called for refusals raised before classification
    (``NoSuchDomain``, ``UnsupportedGuest``, ``DomainBusy``), nor when a
    restore fails before its new domain exists.

    :param ctx: the operation (``ctx.operation`` names it).
    :param error: the error the caller receives; a restore wraps it once more
        in ``MigrationFailed``, naming the new domain it destroyed.
    """

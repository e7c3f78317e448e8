"""HVM guests without PV drivers: ACPI S3 through the QEMU device model.

What is HVM-specific:

* recognition -- an HVM guest (not PVH) whose ``HVM_PARAM_CALLBACK_IRQ`` is 0
  (no PV drivers), or any HVM guest already asleep (``HVM_PARAM_ACPI_S_STATE``
  != 0) -- the method table of docs/protocol.md;
* capabilities -- no xenstore handshake; a QEMU device model; ACPI S3;
* the suspend method -- where the guest has a QEMU guest agent and QEMU can
  wake it (``query-current-machine`` ``wakeup-suspend-support``), ask the
  agent for ``guest-suspend-ram``: the guest sleeps in S3 (``ACPI_S3``).
  Otherwise the core's hard ``shutdown(suspend)``, as libxl does; a guest
  already in S3 is hard-suspended too;
* judging -- asleep = ``ACPI_S_STATE`` 3 or QEMU's run state ``suspended``
  (qemu-xen sets the param before it emits ``SUSPEND``; either is evidence);
* the device model -- declared (``device_model=True``): torpor's generic
  steps ``stop`` + ``xen-save-devices-state`` after a hard suspend (never
  for S3: QEMU must stay up to wake the guest) and ``cont`` it before the
  domain resumes;
* waking -- ``system_wakeup`` after the domain resumed, once QEMU says it can
  wake this machine; awake = QEMU ``running`` again (``WAKEUP``).
"""

from __future__ import annotations

from torpor import hookimpl
from torpor.context import OperationContext
from torpor.errors import DeviceModelError, TorporError
from torpor.host import Host
from torpor.model import (
    DomainInfo,
    GuestType,
    SuspendMethod,
    Verdict,
)
from torpor.protocol import hvm_with_device_model

__all__ = ["GUEST_TYPE"]

GUEST_TYPE = GuestType(
    name="hvm",
    plugin="hvm",
    xenstore_handshake=False,
    event_channel=False,
    device_model=True,
    acpi_s3=True,
    cooperative_resume=True,
    survives_inplace_noncooperative=True,  # no PV drivers: resumedomain alone, nothing to redo
)


@hookimpl
def torpor_classify_domain(domain: DomainInfo, host: Host) -> GuestType | None:
    params = hvm_with_device_model(domain, host)
    if params is None:
        return None
    callback, asleep = params
    return GUEST_TYPE if callback == 0 or asleep != 0 else None


def _ours(ctx: OperationContext) -> bool:
    return ctx.guest_type is GUEST_TYPE


@hookimpl
async def torpor_choose_suspend_method(
    ctx: OperationContext, default: SuspendMethod
) -> SuspendMethod | None:
    if not _ours(ctx) or ctx.facts.get("s3"):
        return None  # asleep already: libxl's hard suspend
    if ctx.guest_type is None or not ctx.guest_type.acpi_s3:
        return None  # the type says it cannot sleep
    if ctx.operation in ("save", "migrate"):
        return None  # a save needs the domain shut down for suspend: the hard way
    if ctx.host.agent_path(ctx.domid) is None:
        return None
    dm = await ctx.device_model()
    if not await dm.wakeup_supported(timeout=ctx.timeouts.device_model):
        return None  # S3 we could not wake from is no suspend
    return SuspendMethod.ACPI_S3


@hookimpl
async def torpor_request_suspend(ctx: OperationContext, method: SuspendMethod) -> bool | None:
    if not _ours(ctx) or method != SuspendMethod.ACPI_S3:
        return None
    from torpor.qmp import GuestAgent

    path = ctx.host.agent_path(ctx.domid)
    if path is None:
        raise DeviceModelError("the guest agent went away", domid=ctx.domid)
    await ctx.device_model()  # its SUSPEND event must wake the orchestrator's wait
    agent = GuestAgent(domid=ctx.domid)
    await agent.connect(path, timeout=ctx.timeouts.device_model)
    ctx.on_close(agent.close)

    def refused(err: DeviceModelError) -> None:
        # qemu-ga answers guest-suspend-ram only to refuse it.
        ctx.data["hvm.agent_error"] = err
        ctx.wake()

    await agent.request_suspend_ram(refused, timeout=ctx.timeouts.device_model)
    return True


async def _asleep(ctx: OperationContext) -> bool:
    if ctx.facts.get("s3"):
        return True
    dm = await ctx.device_model()
    return await dm.query_status(timeout=ctx.timeouts.device_model) == "suspended"


@hookimpl
async def torpor_check_suspended(ctx: OperationContext) -> Verdict | None:
    if not _ours(ctx) or ctx.method != SuspendMethod.ACPI_S3:
        return None
    if ctx.domain.shutdown:
        return None  # the generic judgement names the reason
    refusal = ctx.data.get("hvm.agent_error")
    if refusal is not None:
        # Typed, as the error's cause: CommandNotFound (an agent built without
        # guest-suspend-ram) is not GenericError (the guest OS failed to sleep).
        return Verdict.fail(
            "running", f"the guest agent refused to suspend: {refusal}", cause=refusal
        )
    if await _asleep(ctx):
        return Verdict.ok("S3", "asleep in ACPI S3")
    return Verdict.pending("running", "not asleep yet")


@hookimpl
async def torpor_resume_guest(ctx: OperationContext) -> None:
    if not _ours(ctx) or not await _asleep(ctx):
        return
    dm = await ctx.device_model()
    timeout = ctx.timeouts.device_model
    if not await dm.wakeup_supported(timeout=timeout):
        raise DeviceModelError(
            "the guest is asleep in S3 but its QEMU cannot wake it "
            "(query-current-machine: wakeup-suspend-support false)",
            domid=ctx.domid,
        )
    await dm.system_wakeup(timeout=timeout)


@hookimpl
async def torpor_check_resumed(ctx: OperationContext) -> Verdict | None:
    if not _ours(ctx) or ctx.domain.shutdown:
        return None
    try:
        dm = await ctx.device_model()
        status = await dm.query_status(timeout=ctx.timeouts.device_model)
    except TorporError as e:
        return Verdict.fail("unknown", f"device model unreachable: {e}")
    if status == "suspended":
        return Verdict.pending("S3", "still asleep in ACPI S3")
    if status == "running":
        return Verdict.ok("running")
    if status == "shutdown":
        return Verdict.fail("shutdown", "the guest shut down in its device model")
    return Verdict.pending(status, f"device model is {status}")

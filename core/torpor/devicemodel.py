"""Device-model steps shared by the guest types that have one (PVHVM, HVM).

libxl's ``libxl__qmp_suspend_save`` (libxl_qmp.c): QMP ``stop``, then
``xen-save-devices-state`` into ``<state dir>/qemu-save.<domid>``; on resume,
``cont`` *before* the domain resumes (libxl commit f33b4fc4ef).  A guest
asleep in S3 keeps its device model running: QEMU must be there to wake it.
"""

from __future__ import annotations

import os

from torpor.context import OperationContext

__all__ = ["resume_device_model", "save_path", "set_dirty_log", "suspend_device_model"]


def save_path(ctx: OperationContext) -> str:
    """Where the device model's state goes (libxl: /var/lib/xen/qemu-save.<domid>)."""
    return os.path.join(ctx.host.state_dir, f"qemu-save.{ctx.domid}")


async def suspend_device_model(ctx: OperationContext) -> None:
    """QMP ``stop`` and, where this QEMU has it, ``xen-save-devices-state``.

    ``live`` is true for a live migration's stop-and-copy, as libxl passes
    its save's ``live`` flag (``dsps->live``; QEMU >= 2.11).
    """
    dm = await ctx.device_model()
    timeout = ctx.timeouts.device_model
    await dm.stop(timeout=timeout)
    if "xen-save-devices-state" in await dm.commands(timeout=timeout):
        path = save_path(ctx)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        await dm.save_devices_state(path, live=bool(ctx.facts.get("live")), timeout=timeout)
        ctx.facts["device_model_state"] = path


async def set_dirty_log(ctx: OperationContext, enable: bool) -> None:
    """QEMU's log-dirty mode for a live save: QMP ``xen-set-global-dirty-log``
    (libxl ``domain_suspend_switch_qemu_xen_logdirty``, deadline 10 s there)."""
    dm = await ctx.device_model()
    if enable:
        # Learnt while the guest still runs, for suspend_device_model: the
        # stop-and-copy then asks QEMU only what libxl asks (stop, save).  Asked
        # first: if QEMU fails it, its log-dirty was never switched on.
        await dm.commands(timeout=ctx.timeouts.device_model)
    await dm.set_global_dirty_log(enable, timeout=ctx.timeouts.device_model)


async def resume_device_model(ctx: OperationContext) -> None:
    """QMP ``cont`` if the device model is stopped (not when it holds a guest in S3)."""
    dm = await ctx.device_model()
    timeout = ctx.timeouts.device_model
    if await dm.query_status(timeout=timeout) == "paused":
        await dm.cont(timeout=timeout)

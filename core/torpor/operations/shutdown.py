"""Shut a guest down cleanly and wait: ``xl shutdown -w`` (libxl_domain_shutdown).

What ``torpor host save-all --shutdown-fallback`` does to a guest that could
not be saved, as xendomains falls back to ``xl shutdown`` for it.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING

from torpor.errors import HypervisorError, TorporError
from torpor.monitor import Waker

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator

__all__ = ["power_off"]


async def power_off(orch: Orchestrator, domid: int, timeout: float) -> tuple[bool, str]:
    """Shut a guest down cleanly, as ``xl shutdown -w`` (xendomains) does, and wait.

    PV drivers: ``control/shutdown`` = ``poweroff`` (libxl_domain_shutdown);
    an HVM guest without them: the ACPI power button (QMP ``system_powerdown``,
    as ``xl shutdown -F``).  Then wait, on ``@releaseDomain``, for the domain
    to be shut down (or gone) within ``timeout``.  (True, what happened) if it
    is; (False, why not) otherwise -- the guest is then still there.
    """
    from torpor.errors import NoSuchDomain

    hv = orch.host.hypervisor
    try:
        async with orch._claim(domid, "shutdown"):
            ctx = await orch._context("shutdown", domid)
            try:
                gt = ctx.guest_type
                if gt is not None and not gt.xenstore_handshake and gt.device_model:
                    how = "ACPI power button (QMP system_powerdown)"
                    dm = await ctx.device_model()
                    await dm.execute("system_powerdown", timeout=orch.timeouts.device_model)
                else:
                    how = "control/shutdown = poweroff"
                    await orch.host.xenstore.aio.write(
                        f"/local/domain/{domid}/control/shutdown", "poweroff"
                    )
                wake = Waker()
                await orch.monitor.start()
                undo = orch.monitor.listen_domain(domid, wake.set)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                try:
                    while True:
                        wake.clear()
                        try:
                            info = hv.domain_info(domid)
                        except HypervisorError as e:
                            if e.errno == errno.ESRCH:
                                return True, f"shut down cleanly ({how}); the domain is gone"
                            raise
                        if info.shutdown:
                            return True, (
                                f"shut down cleanly ({how}): shut down with reason "
                                f"{info.shutdown_reason}"
                            )
                        remaining = deadline - loop.time()
                        if remaining <= 0 or not await wake.wait(remaining):
                            return False, (
                                f"asked to power off ({how}) but still {info.state_word()} "
                                f"after {timeout:g}s: left as it is"
                            )
                finally:
                    undo()
            finally:
                await ctx.close()
    except NoSuchDomain:
        return True, "the domain is gone"
    except TorporError as e:
        return False, f"could not ask it to power off: {e.message}"

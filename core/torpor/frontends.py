"""PV frontends as the toolstack sees them in xenstore (xenbus states).

After a resume in a new domain a Linux guest renegotiates every PV frontend
with its backend: Initialising -> (backend InitWait) -> Initialised /
Connected.  :func:`frontends_verdict` judges from xenstore whether all of a
domain's frontends (``device/<type>/<devid>/state``) are Connected again.
"""

from __future__ import annotations

from torpor.context import OperationContext
from torpor.model import Verdict

__all__ = ["CONNECTED", "frontends_verdict"]

#: XenbusStateConnected (xen/include/public/io/xenbus.h)
CONNECTED = 4
#: Device types whose frontends torpor waits for (the suspend node is not a device).
DEVICE_TYPES = ("vif", "vbd", "qdisk", "vkbd", "vfb", "console", "9pfs", "vusb", "pvcalls")
#: The most frontends one verdict reads.  ``device/`` is the guest's own tree:
#: a hostile guest can fill it (up to its xenstore node quota, 1000 by default)
#: so that every re-check costs a thousand reads; past this, the verdict fails.
MAX_FRONTENDS = 256


async def frontends_verdict(ctx: OperationContext) -> Verdict:
    """Done when every frontend under ``device/`` is Connected; pending otherwise.

    Failed if the guest lists more than :data:`MAX_FRONTENDS` of them.
    """
    xs = ctx.xenstore
    base = f"{ctx.dompath}/device"
    waiting = []
    seen = 0
    for kind in await xs.ls(base) if await xs.read_or(base, None) is not None else []:
        if kind not in DEVICE_TYPES:
            continue
        devids = await xs.ls(f"{base}/{kind}")
        seen += len(devids)
        if seen > MAX_FRONTENDS:
            return Verdict.fail(
                "running",
                f"the guest lists more than {MAX_FRONTENDS} frontends under device/; "
                "not walking a guest-controlled tree that large",
            )
        for devid in devids:
            state = await xs.read_or(f"{base}/{kind}/{devid}/state", "0")
            if state != str(CONNECTED):
                waiting.append(f"{kind}/{devid} (state {state[:16]!r})")
    if waiting:
        return Verdict.pending("running", "frontends not reconnected: " + ", ".join(waiting))
    return Verdict.ok("running", "frontends connected")

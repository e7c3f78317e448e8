"""PV frontends as the toolstack sees them in xenstore (xenbus states).

After a resume in a new domain a Linux guest renegotiates every PV frontend
with its backend: Initialising -> (backend InitWait) -> Initialised /
Connected.  :func:`frontends_verdict` judges from xenstore whether all of a
domain's frontends (``device/<type>/<devid>/state``) are Connected again.
"""

from __future__ import annotations

import errno

from torpor.context import OperationContext
from torpor.errors import XenstoreError
from torpor.model import Verdict

__all__ = ["CONNECTED", "frontends_verdict"]

#: XenbusStateConnected (xen/include/public/io/xenbus.h)
CONNECTED = 4
#: Device types whose frontends torpor waits for (the suspend node is not a device).
DEVICE_TYPES = ("vif", "vbd", "qdisk", "vkbd", "vfb", "console", "9pfs", "vusb", "pvcalls")
#: The most frontends one verdict reads; past this, the verdict fails.  libxl
#: creates ``device/`` read-only to the guest, but each frontend directory is
#: the guest's own, and a toolstack that got the permissions wrong would let a
#: hostile guest fill the tree so that every re-check costs that many reads.
#: 1024 is above what a guest can own under xenstored's default node quota
#: (1000), so no real configuration reaches it.
MAX_FRONTENDS = 1024


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
        try:
            devids = await xs.ls(f"{base}/{kind}")
        except XenstoreError as e:
            if e.errno != errno.E2BIG:
                raise
            # XS_DIRECTORY's reply must fit one 4096-byte payload; pyxs has no
            # XS_DIRECTORY_PART.  Only a guest's own tree gets this long.
            return Verdict.fail(
                "running",
                f"device/{kind} lists too many frontends for one XS_DIRECTORY (E2BIG)",
            )
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
        shown = ", ".join(waiting[:8])
        more = f" and {len(waiting) - 8} more" if len(waiting) > 8 else ""
        return Verdict.pending("running", f"frontends not reconnected: {shown}{more}")
    return Verdict.ok("running", "frontends connected")

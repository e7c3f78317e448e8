"""dom0's PV backends in the simulated host: netback and blkback, as xenbus drivers.

A backend device lives at ``/local/domain/0/backend/<type>/<domid>/<devid>``
(written by the toolstack with ``state`` = Initialising).  Like Linux's
xen-netback / xen-blkback through drivers/xen/xenbus/xenbus_probe_backend.c,
the driver here

* probes a new device and switches it to InitWait;
* watches the frontend's ``state`` (the "other end") and, when the frontend
  is Connected (netback) or Initialised/Connected (blkback), reads its ring
  references and event channel and switches to Connected;
* follows a frontend that closes (Closing, Closed) and one that restarts at
  Initialising: netback walks back to InitWait through Closing and Closed
  (``set_backend_state()``), blkback only once it is Closed ("prepare for
  reconnect");
* switches state as ``xenbus_switch_state()`` does: in a transaction, and not
  at all onto a device the toolstack has removed.

One driver instance serves every device of the host over dom0's in-process
xenstore connection; one watch on the ``backend`` subtree finds devices, one
watch per device follows its frontend.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import Any

from torpor.errors import TorporError, XenstoreError
from torpor_sim.guest import GuestXenstore, XenbusState

__all__ = ["BackendDriver"]

log = logging.getLogger("torpor_sim.backends")
BACKEND_ROOT = "/local/domain/0/backend"
#: xen-netback set_backend_state(): the way from each state to InitWait.
_NETBACK_TO_INITWAIT = {
    XenbusState.CONNECTED: (XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.INIT_WAIT),
    XenbusState.CLOSING: (XenbusState.CLOSED, XenbusState.INIT_WAIT),
    XenbusState.CLOSED: (XenbusState.INIT_WAIT,),
}


class BackendDriver:
    """netback + blkback for the simulated dom0.

    :param xs: dom0's in-process xenstore connection (events go to :meth:`on_event`).
    """

    def __init__(self) -> None:
        self.xs: GuestXenstore | None = None
        #: backend path -> frontend path, for devices being served
        self.devices: dict[str, str] = {}
        #: backend path -> how many times it reached Connected
        self.connects: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._probing: set[str] = set()
        #: backend path -> set once the device is probed (InitWait, other end watched)
        self._probed: dict[str, asyncio.Event] = {}

    async def start(self, xs: GuestXenstore) -> None:
        self.xs = xs
        await xs.watch(BACKEND_ROOT, "backend")

    def on_event(self, path: str, token: str) -> None:
        """dom0's xenstore watch events (called in the simulated host's loop)."""
        if token == "backend":
            parts = path.split("/")
            # /local/domain/0/backend/<type>/<domid>/<devid>[/...]
            if len(parts) >= 8 and parts[5] in ("vif", "vbd"):
                be = "/".join(parts[:8])
                if be not in self.devices and be not in self._probing:
                    self._probing.add(be)
                    self._spawn(self._probe(be))
                elif be in self.devices and len(parts) == 8:
                    self._spawn(self._check_gone(be))
            else:
                # An RM fires the ancestors' watches for the removed root only.
                prefix = path.rstrip("/") + "/"
                for be in [b for b in self.devices if b.startswith(prefix)]:
                    self._spawn(self._check_gone(be))
        elif token.startswith("fe:"):
            self._spawn(self._frontend_changed(token[3:]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            # A device removed while we looked at it is normal teardown.
            if not (isinstance(exc, XenstoreError) and exc.errno == errno.ENOENT):
                log.warning("backend driver: %r", exc)

    async def _read(self, path: str) -> str | None:
        assert self.xs is not None
        try:
            return await self.xs.read(path)
        except XenstoreError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    async def _check_gone(self, be: str) -> None:
        if be in self.devices and await self._read(f"{be}/state") is None:
            await self._forget(be)  # removed by the toolstack

    async def _probe(self, be: str) -> None:
        assert self.xs is not None
        try:
            frontend = await self._read(f"{be}/frontend")
            state = await self._read(f"{be}/state")
            if frontend is None or state is None:
                return
            self.devices[be] = frontend
            if int(state or 0) in (XenbusState.INITIALISING, XenbusState.UNKNOWN):
                await self._switch_state(be, XenbusState.INIT_WAIT)
            await self.xs.watch(f"{frontend}/state", f"fe:{be}")
            self._probed.setdefault(be, asyncio.Event()).set()
        finally:
            self._probing.discard(be)

    async def wait_probed(self, be: str, timeout: float) -> None:
        """Until the device at ``be`` is probed: in InitWait, its frontend watched.

        What libxl__wait_device_connection() (libxl_device.c) waits for before
        a device add completes -- and so before libxl unpauses a new domain.
        """
        try:
            await asyncio.wait_for(self._probed.setdefault(be, asyncio.Event()).wait(), timeout)
        except TimeoutError:
            raise TorporError(f"backend {be} did not reach InitWait within {timeout:g}s") from None

    async def _switch_state(self, be: str, state: int) -> None:
        """drivers/xen/xenbus/xenbus_client.c __xenbus_switch_state(): in a
        transaction, and only if ``state`` is still there -- "if the node has
        gone, we don't write to it, as the device will be tearing down, and we
        don't want to resurrect that directory"."""
        assert self.xs is not None
        while True:
            tx = await self.xs.transaction_start()
            try:
                await self.xs.read(f"{be}/state", tx)
            except XenstoreError as e:
                await self.xs.transaction_end(tx, False)
                if e.errno == errno.ENOENT:
                    return
                raise
            await self.xs.write(f"{be}/state", str(state), tx)
            try:
                await self.xs.transaction_end(tx, True)
            except XenstoreError as e:
                if e.errno == errno.EAGAIN:
                    continue
                raise
            return

    async def _forget(self, be: str) -> None:
        assert self.xs is not None
        frontend = self.devices.pop(be, None)
        self._probed.pop(be, None)
        if frontend is not None:
            with contextlib.suppress(XenstoreError):
                await self.xs.unwatch(f"{frontend}/state", f"fe:{be}")

    async def _frontend_changed(self, be: str) -> None:
        assert self.xs is not None
        frontend = self.devices.get(be)
        if frontend is None:
            return
        fe_state = int(await self._read(f"{frontend}/state") or 0)
        be_state_s = await self._read(f"{be}/state")
        if be_state_s is None:
            await self._forget(be)
            return
        be_state = int(be_state_s or 0)
        netback = be.split("/")[5] == "vif"
        if fe_state == XenbusState.INITIALISING:
            # The frontend starts over.  xen-netback's set_backend_state() walks
            # there through the states in between (Connected -> Closing ->
            # Closed -> InitWait); xen-blkback's frontend_changed() "prepares
            # for reconnect" only once it is Closed.
            if netback:
                for state in _NETBACK_TO_INITWAIT.get(be_state, ()):
                    await self._switch_state(be, state)
            elif be_state == XenbusState.CLOSED:
                await self._switch_state(be, XenbusState.INIT_WAIT)
        elif fe_state == XenbusState.CONNECTED or (
            fe_state == XenbusState.INITIALISED and not netback
        ):
            # netback connects when the frontend is Connected; blkback already
            # when it is Initialised ("we connect even when two watches fire in
            # close succession and we miss the intermediate value").
            if be_state != XenbusState.CONNECTED:
                # connect_rings(): the frontend's ring and event channel must be there.
                ring = await self._read(f"{frontend}/ring-ref") or await self._read(
                    f"{frontend}/tx-ring-ref"
                )
                port = await self._read(f"{frontend}/event-channel")
                if ring is None or port is None:
                    await self._switch_state(be, XenbusState.CLOSING)
                    return
                await self._switch_state(be, XenbusState.CONNECTED)
                self.connects[be] = self.connects.get(be, 0) + 1
        elif fe_state == XenbusState.CLOSING and be_state not in (
            XenbusState.CLOSING,
            XenbusState.CLOSED,
        ):
            await self._switch_state(be, XenbusState.CLOSING)
        elif fe_state == XenbusState.CLOSED and be_state != XenbusState.CLOSED:
            if netback and be_state == XenbusState.CONNECTED:
                await self._switch_state(be, XenbusState.CLOSING)
            await self._switch_state(be, XenbusState.CLOSED)

    def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()

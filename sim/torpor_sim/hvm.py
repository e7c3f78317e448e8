"""HVM guests of the simulated host: a device model (real QEMU) tied to the hypervisor.

An HVM guest without PV drivers has no kernel actor talking xenstore: its
"kernel" is the boot sector running in its device model
(:mod:`torpor_sim.hvm_image` on :mod:`torpor_sim.qemu`, or on the in-process
:mod:`torpor_sim.fake_qemu` where QEMU is not installed;
:func:`make_device_model` picks one).  :class:`HvmGuest` ties that device
model to the hypervisor model the way qemu-xen and Xen are tied:

* QEMU's ``SUSPEND`` / ``WAKEUP`` set ``HVM_PARAM_ACPI_S_STATE`` to 3 / 0
  (qemu-xen's suspend and wakeup notifiers call ``xc_hvm_param_set``); Xen
  then takes the vCPUs down, and the domain is neither paused nor shut down;
* a guest power-off (``SHUTDOWN`` guest-shutdown) or crash (guest-reset
  under ``-no-reboot``: a triple fault) shuts the domain down with reason
  poweroff / crash;
* the hypervisor pausing or shutting the domain down stops QEMU's vCPUs, and
  resuming it runs them again -- in the simulation QEMU plays the vCPUs too.
  One knowing difference from real Xen: a device-model ``cont`` (which
  torpor sends before ``xc_domain_resume``, as libxl does) lets the guest run
  a few milliseconds before the domain is resumed.

The guest agent (qemu-ga) is :class:`~torpor_sim.guest_agent.GuestAgentShim`; the
misbehaviours act there, where a real guest would misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from torpor.model import HVM_PARAM_ACPI_S_STATE, ShutdownReason
from torpor.qmp import QmpEvent
from torpor_sim import hvm_image
from torpor_sim.devicemodel import DeviceModelProcess
from torpor_sim.fake_qemu import FakeDeviceModel
from torpor_sim.guest import Behaviour
from torpor_sim.guest_agent import GuestAgentShim
from torpor_sim.hvm_image import GuestCounters
from torpor_sim.qemu import QemuDeviceModel, qemu_binary
from torpor_sim.qmp_server import UnixServer
from torpor_sim.xen import SimXen

__all__ = ["HvmGuest", "make_device_model"]

log = logging.getLogger("torpor_sim.hvm")


def make_device_model(
    *,
    domid: int | None = None,
    prefer: Literal["auto", "qemu", "in-process"] = "auto",
    run_dir: str | os.PathLike[str] | None = None,
    qmp_path: str | os.PathLike[str] | None = None,
    reboot: bool = False,
    incoming: str | os.PathLike[str] | None = None,
) -> DeviceModelProcess:
    """Real QEMU when ``qemu-system-x86_64`` is installed (or ``prefer="qemu"``),
    else the in-process model; ``kind`` on the result says which.

    ``incoming``: start from a VM state saved by
    :meth:`DeviceModelProcess.save_vm_state` instead of booting the guest.
    Only the kind of model that saved a state can load it
    (:func:`torpor_sim.devicemodel.saved_vm_state_kind` tells which); the
    other refuses it in :meth:`~DeviceModelProcess.start`.
    """
    if prefer == "qemu" or (prefer == "auto" and qemu_binary() is not None):
        return QemuDeviceModel(
            domid=domid, run_dir=run_dir, qmp_path=qmp_path, reboot=reboot, incoming=incoming
        )
    return FakeDeviceModel(
        domid=domid, run_dir=run_dir, qmp_path=qmp_path, reboot=reboot, incoming=incoming
    )


class _GuestView:
    """What the agent shim sees of the guest: the device model, misbehaving as told."""

    def __init__(self, guest: HvmGuest) -> None:
        self._guest = guest
        self._dm = guest.dm

    def read_counters(self) -> GuestCounters:
        return self._dm.read_counters()

    def read_memory(self, addr: int, length: int) -> bytes:
        return self._dm.read_memory(addr, length)

    def write_memory(self, addr: int, data: bytes) -> None:
        # The agent runs in the guest: its FIFREEZE / FITHAW are the guest's own writes.
        self._dm.write_memory(addr, data)
        if addr == hvm_image.FS_FROZEN_ADDR:
            self._guest.log.append("agent: FIFREEZE" if any(data) else "agent: FITHAW")

    async def wait_run_state(self, states: Iterable[str], *, timeout: float) -> str:
        return await self._dm.wait_run_state(states, timeout=timeout)

    async def request_s3(self) -> None:
        g = self._guest
        mis = g.behaviour.misbehaviour
        g.log.append(f"agent: guest-suspend-ram ({mis or 'ok'})")
        if mis in ("never_ack", "ack_then_hang"):
            return  # the guest takes the request and never sleeps
        if mis == "crash_during_suspend":
            await self._dm.request_crash()
        elif mis == "vanish":
            g.destroy(g.domid)
        elif mis == "slow_ack":
            g.spawn(self._later(g.behaviour.slow_ack))
        else:
            await self._dm.request_s3()

    async def _later(self, delay: float) -> None:
        await asyncio.sleep(delay)  # a slow guest, modelled
        await self._dm.request_s3()


class _Agent(GuestAgentShim):
    """The shim, with ``unknown_command``: an agent built without guest-suspend-ram."""

    def __init__(self, guest: HvmGuest, path: str) -> None:
        super().__init__(_GuestView(guest), path)  # type: ignore[arg-type]
        self.guest = guest

    async def _handle(self, text: bytes) -> bytes | None:
        if self.guest.behaviour.misbehaviour == "unknown_command":
            with contextlib.suppress(ValueError):
                msg = json.loads(text)
                if isinstance(msg, dict) and msg.get("execute") == "guest-suspend-ram":
                    return self._error(
                        "CommandNotFound", "The command guest-suspend-ram has not been found"
                    )
        return await super()._handle(text)


class QmpOrderingProxy:
    """The device model's public QMP socket, in front of QEMU's own.

    qemu-xen tells Xen about S3 (``HVM_PARAM_ACPI_S_STATE``, from its suspend
    and wakeup notifiers) *before* it emits ``SUSPEND`` / ``WAKEUP`` to QMP
    clients, so a toolstack that sees the event can rely on the param.  In
    the simulation QEMU cannot call into the hypervisor model, so this proxy
    restores that order: an event from QEMU is applied to the model first,
    then forwarded.  Everything else passes through byte for byte.
    """

    def __init__(self, public: str, private: str, on_event: Callable[[str, Any], None]) -> None:
        self.public = public
        self.private = private
        self.on_event = on_event
        # One handler per connected client; it ends once both ends are closed.
        self._server = UnixServer(public, self._client, backlog=100)

    async def idle(self) -> None:
        """Return once every client that has hung up is fully closed here too.

        A client's hang-up reaches this proxy asynchronously; a leak check that
        counts file descriptors right after closing its own must wait for that.
        """
        await self._server.idle()

    async def start(self) -> None:
        await self._server.start()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_unix_connection(self.private, limit=1 << 20)
        except OSError:
            return

        async def down() -> None:  # client -> QEMU, as is
            while chunk := await reader.read(65536):
                up_w.write(chunk)
                await up_w.drain()
            up_w.close()

        task = asyncio.ensure_future(down())
        try:
            while line := await up_r.readline():  # QEMU ends each message with CRLF
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    msg = json.loads(line)
                    if isinstance(msg, dict) and isinstance(msg.get("event"), str):
                        self.on_event(msg["event"], msg.get("data") or {})
                writer.write(line)
                await writer.drain()
        finally:
            task.cancel()
            for w in (writer, up_w):
                w.close()
            for w in (writer, up_w):
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    async def close(self) -> None:
        self._server.close()


class HvmGuest:
    """A simulated HVM domain's guest: its device model, agent and counters."""

    def __init__(
        self,
        xen: SimXen,
        domid: int,
        dm: DeviceModelProcess,
        behaviour: Behaviour,
        *,
        destroy: Callable[[int], None],
    ) -> None:
        self.xen = xen
        self.domid = domid
        self.dm = dm
        self.behaviour = behaviour
        self.destroy = destroy
        self.log: deque[str] = deque(["boot"], maxlen=200)
        self.agent: _Agent | None = None
        self.proxy: QmpOrderingProxy | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.checksum_at_resume: str | None = None

    @property
    def device_model_kind(self) -> str:
        return str(self.dm.kind)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("dom%d: %r", self.domid, task.exception())

    async def start(self, agent_path: str | None, qmp_public: str | None = None) -> None:
        """Tie the device model to the domain; serve the agent unless the guest has none.

        ``qmp_public``: serve the device model's QMP there through a
        :class:`QmpOrderingProxy` (the model itself listens on its own path).
        """
        self._unsubscribe = self.dm.on_event(self._on_dm_event)
        if qmp_public is not None:
            self.proxy = QmpOrderingProxy(qmp_public, self.dm.qmp_path, self.apply_event)
            await self.proxy.start()
        self.xen.domain(self.domid).listeners.append(self._on_domain_state)
        if agent_path is not None and self.behaviour.misbehaviour != "lose_xenstore":
            self.agent = _Agent(self, agent_path)
            await self.agent.start()

    def _on_dm_event(self, ev: QmpEvent) -> None:
        self.apply_event(ev.name, ev.data)

    def apply_event(self, name: str, data: Mapping[str, Any]) -> None:
        """What the hypervisor learns from its device model (idempotent: the QMP
        proxy and the model's own monitor may both report the same event)."""
        xen, domid = self.xen, self.domid
        if domid not in xen.domains:
            return
        asleep = xen.domain(domid).s3
        if name == "SUSPEND" and not asleep:
            xen.set_hvm_param(domid, HVM_PARAM_ACPI_S_STATE, 3)
            self.log.append("S3")
        elif name == "WAKEUP" and asleep:
            xen.set_hvm_param(domid, HVM_PARAM_ACPI_S_STATE, 0)
            self.log.append("S0")
            self.checksum_at_resume = self.dm.memory_checksum()
        elif name == "SHUTDOWN" and data.get("guest"):
            reason = data.get("reason")
            code = ShutdownReason.CRASH if reason == "guest-reset" else ShutdownReason.POWEROFF
            self.log.append(f"guest {reason}")
            xen.sched_shutdown(domid, code)

    def _on_domain_state(self, what: str) -> None:
        if what in ("paused", "shutdown"):
            self.spawn(self.dm.pause_vcpus())
        elif what in ("unpaused", "resumed"):
            with self.xen.lock:
                dom = self.xen.domains.get(self.domid)
                running = dom is not None and dom.is_running
            if running:
                if what == "resumed":
                    self.checksum_at_resume = self.dm.memory_checksum()
                self.spawn(self.dm.unpause_vcpus())

    def counters(self) -> dict[str, int]:
        c = self.dm.read_counters()
        return {
            "ticks": c.ticks,
            "boots": c.boots,
            "cooperative_resumes": c.resumes,
            "new_domain_resumes": 0,
            "suspends": c.s3_entries,
            "fs_frozen": c.fs_frozen,
            "fs_writes": c.fs_writes,
            "fs_blocked": c.fs_blocked,
        }

    def memory_checksum(self) -> str:
        return self.dm.memory_checksum()

    def memory_consistent(self) -> bool:
        """The boot sector's ring holds exactly what its tick counter says it wrote."""
        c = self.dm.read_counters()
        region = self.dm.read_memory(hvm_image.REGION_ADDR, hvm_image.REGION_SIZE)
        return hvm_image.region_matches(region, c.ticks)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.proxy is not None:
            await self.proxy.close()
        for t in list(self._tasks):
            t.cancel()
        if self.agent is not None:
            await self.agent.stop()
        await self.dm.stop()

"""Simulated guest kernels that follow Linux's suspend and resume steps.

Each guest is an actor in the simulated host's event loop with its own
xenstore connection *as its domid* (the in-process ring of the simulated
xenstored).  A PV, PVHVM or PVH guest behaves as Linux 6.1 does
(drivers/xen/manage.c, arch/x86/xen/suspend*.c):

boot
    registers vcpu_info for each vCPU (VCPUOP_register_vcpu_info); a PVHVM
    guest sets HVM_PARAM_CALLBACK_IRQ (its vector callback); writes
    ``control/feature-{poweroff,reboot,suspend}``, watches
    ``control/shutdown``; each PV frontend (a vif and a vbd) negotiates with
    its dom0 backend through xenbus states; optionally (XenLinux) publishes a
    suspend event channel in ``device/suspend/event-channel``.

shutdown_handler
    reads ``control/shutdown`` in a transaction; acks a command it knows by
    writing ``""`` in the same transaction (retrying on EAGAIN); leaves a
    command it does not know where it is.

do_suspend
    freezes tasks (this can fail: then it keeps running), quiesces xenstore,
    PV rewrites start_info's store/console MFNs as PFNs, and calls
    SCHEDOP_shutdown(SHUTDOWN_suspend) with its start_info MFN (PV) or 0.
    The hypercall returns **1** (cancelled: a cooperative resume -- it reuses
    everything, PV rewrites the PFNs back) or **0** (a new domain: it
    re-registers vcpu_info (PV: vCPUs; PVHVM: shared info + vcpu_info), sets
    its callback vector again, rebuilds runstate areas, grant tables, timers
    and event channels, reconnects xenstore and renegotiates every frontend).
    Re-registering vcpu_info in the *same* domain fails with EINVAL and the
    kernel panics: a PV guest shuts down with reason crash, a PVHVM guest
    reboots (what docs/real-xen.md records of real Xen).

The guest's running work is a function of the vCPU time Xen accounts it: a
tick counter and a memory area written tick by tick (materialised lazily so a
thousand idle guests cost nothing), kept in guest memory so a save carries it.
A guest can also dirty memory fast (``dirty_rate`` pages per second of its
running time, sweeping a region of ``dirty_pages`` pages at the top of its
memory): the load a live migration's precopy must keep up with.  Every page
it writes is marked in the hypervisor's log-dirty bitmap when that is on.
Each time its suspend hypercall returns, the guest notes how long it did not
run, by its own wallclock (``last_gap_ns``): a migration's downtime as the
guest saw it -- the gap in its tick counter's timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs

from torpor.errors import HypervisorError, TorporError, XenstoreError
from torpor.model import HVM_PARAM_CALLBACK_IRQ, ShutdownReason
from torpor_sim.xen import PAGE_SIZE, SimXen

__all__ = [
    "MISBEHAVIOURS",
    "Behaviour",
    "GuestXenstore",
    "LinuxGuest",
    "XenbusState",
]

log = logging.getLogger("torpor_sim.guest")

#: How many lines of its kernel log a simulated guest keeps.
LOG_LINES = 200
#: One tick of guest work per 10 ms of vCPU time.
TICK_NS = 10_000_000
#: Guest data page: counters at fixed offsets (pfn 3).
DATA_PFN = 3
OFF_TICKS, OFF_BOOTS, OFF_COOP_RESUMES, OFF_NEW_DOMAIN_RESUMES, OFF_SUSPENDS = 0, 8, 16, 24, 32
#: pages the dirtier wrote; wallclock (ns) when the guest last ran; the gap (ns)
#: between that and when it ran again after its last suspend hypercall returned
OFF_DIRTY_WRITES, OFF_LAST_RUN_NS, OFF_LAST_GAP_NS = 40, 48, 56
WORK_FIRST_PFN = 4
_U64 = struct.Struct("<Q")
#: HVM_PARAM_CALLBACK_IRQ with type "vector" (params.h: val[63:56] = 2), vector 0xf3.
CALLBACK_VIA_VECTOR = (2 << 56) | 0xF3

#: The misbehaviours a simulated guest can be given (``--misbehave DOMID=NAME``).
MISBEHAVIOURS = (
    "never_ack",  # the kernel never handles the request (hung, or paused)
    "ack_then_hang",  # acks, then freezing tasks fails: it never suspends
    "slow_ack",  # acks after ``slow_ack`` seconds
    "unknown_command",  # doesn't know "suspend" (no CONFIG_HIBERNATE_CALLBACKS)
    "crash_during_suspend",  # acks, then crashes (shutdown reason crash)
    "vanish",  # acks, then the domain is destroyed under the toolstack
    "lose_xenstore",  # its xenstore connection breaks after boot
)


class XenbusState:
    """``enum xenbus_state`` (xen/include/public/io/xenbus.h)."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


@attrs.frozen
class Behaviour:
    """How a simulated guest behaves (misbehaves) and what it offers.

    :param misbehaviour: one of :data:`MISBEHAVIOURS`, or ``None``.
    :param slow_ack: seconds before acking, for ``slow_ack``.
    :param freeze_time: seconds freezing tasks takes before the hypercall.
    :param suspend_evtchn: publish a XenLinux suspend event channel.
    :param frontends: PV frontends (``("vif", 0), ("vbd", 51712)``).
    :param agent: an HVM guest runs a QEMU guest agent (qemu-ga).
    :param dirty_rate: pages the guest writes per second of its running time
        (0: only its tick work), sweeping ``dirty_pages`` pages.
    :param dirty_pages: the size of the region it dirties (its working set),
        added to its memory when ``dirty_rate`` is set.
    """

    misbehaviour: str | None = attrs.field(default=None)
    slow_ack: float = 0.0
    freeze_time: float = 0.0
    suspend_evtchn: bool = False
    frontends: tuple[tuple[str, int], ...] = (("vif", 0), ("vbd", 51712))
    agent: bool = True
    dirty_rate: float = 0.0
    dirty_pages: int = 256

    @property
    def dirty_region(self) -> int:
        """Pages set aside at the top of memory for the dirtier (0 without one)."""
        return self.dirty_pages if self.dirty_rate > 0 else 0

    @misbehaviour.validator
    def _check(self, _a: object, value: str | None) -> None:
        if value is not None and value not in MISBEHAVIOURS:
            raise ValueError(f"unknown misbehaviour {value!r}; known: {', '.join(MISBEHAVIOURS)}")

    @classmethod
    def parse(cls, text: str, **kw: Any) -> Behaviour:
        """``never_ack`` or ``slow_ack=2.5`` -> a Behaviour."""
        name, _, arg = text.partition("=")
        if name == "slow_ack":
            return cls(misbehaviour=name, slow_ack=float(arg or 1.0), **kw)
        if arg:
            raise ValueError(f"misbehaviour {name!r} takes no argument")
        return cls(misbehaviour=name, **kw)


class GuestXenstore(Protocol):
    """What a simulated kernel needs of its xenstore connection (str in, str out)."""

    async def read(self, path: str, tx: int = 0) -> str: ...
    async def write(self, path: str, value: str, tx: int = 0) -> None: ...
    async def mkdir(self, path: str, tx: int = 0) -> None: ...
    async def rm(self, path: str, tx: int = 0) -> None: ...
    async def watch(self, path: str, token: str) -> None: ...
    async def unwatch(self, path: str, token: str) -> None: ...
    async def transaction_start(self) -> int: ...
    async def transaction_end(self, tx: int, commit: bool) -> None: ...
    def close(self) -> None: ...


#: Connect a domain to xenstore: ``connect(domid, on_event) -> GuestXenstore``.
XenstoreConnector = Callable[[int, Callable[[str, str], None]], GuestXenstore]


class LinuxGuest:
    """A simulated Linux kernel in a PV, PVHVM or PVH domain.

    :param xen: the hypervisor it runs on.
    :param connect_xenstore: opens its xenstore ring as its domid.
    :param domid: its domain.
    :param kind: ``"pv"``, ``"pvhvm"`` or ``"pvh"``.
    :param on_destroy_request: the toolstack's destroy, for the ``vanish`` misbehaviour.
    """

    def __init__(
        self,
        xen: SimXen,
        connect_xenstore: XenstoreConnector,
        domid: int,
        kind: str,
        *,
        behaviour: Behaviour | None = None,
        on_destroy_request: Callable[[int], None] | None = None,
    ) -> None:
        if kind not in ("pv", "pvhvm", "pvh"):
            raise ValueError(f"LinuxGuest kind must be pv, pvhvm or pvh, not {kind!r}")
        self.xen = xen
        self.connect_xenstore = connect_xenstore
        self.domid = domid
        self.kind = kind
        self.behaviour = behaviour or Behaviour()
        self.on_destroy_request = on_destroy_request
        self.dompath = f"/local/domain/{domid}"
        self.xs: GuestXenstore | None = None
        #: "booting", "running", "suspending", "suspended", "crashed", "rebooted", "dead"
        self.state = "booting"
        #: What the kernel did, in order: tests read this to check Linux's steps.
        # Bounded: a guest suspended ten thousand times must not grow without end.
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.suspend_port = 0
        self.grant_generation = 0
        self._ticks_seen = 0
        #: the dirtier's progress: writes due are counted from this vCPU time
        self._dirty_base_ns = 0
        self._dirty_done = 0
        self._shutting_down = False
        self._runnable = asyncio.Event()
        #: Linux's xenwatch thread: watch callbacks run one at a time.
        self._xenwatch = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.checksum_at_resume: str | None = None
        self.last_hypercall_return: int | None = None
        self.frontend_states: dict[str, int] = {}
        self._otherend_events: dict[str, asyncio.Event] = {}
        dom = xen.domain(domid)
        dom.listeners.append(self._on_domain_state)
        dom.materialise = self.advance

    # -- plumbing --------------------------------------------------------------

    @property
    def pv(self) -> bool:
        return self.kind == "pv"

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("dom%d kernel task failed: %r", self.domid, exc)
            self.log.append(f"oops: {exc!r}")

    def _on_domain_state(self, what: str) -> None:
        with self.xen.lock:
            dom = self.xen.domains.get(self.domid)
            running = dom is not None and dom.is_running
        if running:
            self._runnable.set()
        else:
            self._runnable.clear()
        if what == "destroyed":
            self.state = "dead"
            self.stop()

    def stop(self) -> None:
        """Tear the actor down (domain destroyed, host stopping)."""
        for t in list(self._tasks):
            t.cancel()
        if self.xs is not None:
            with contextlib.suppress(Exception):
                self.xs.close()
            self.xs = None

    def _panic(self, message: str, reason: ShutdownReason, state: str) -> None:
        """The kernel panics: the message, every other kernel task stops where it
        is (a panicked kernel runs nothing more -- no frontend finishes
        connecting), then SCHEDOP_shutdown with ``reason``."""
        self.log.append(message)
        self.state = state
        current = asyncio.current_task()
        for t in list(self._tasks):
            if t is not current:
                t.cancel()
        self.xen.sched_shutdown(self.domid, reason)

    async def _xs(self) -> GuestXenstore:
        if self.xs is None:
            raise TorporError(f"dom{self.domid}: xenstore connection is gone")
        return self.xs

    # -- guest memory: the running work -------------------------------------------

    def _data(self, off: int) -> int:
        dom = self.xen.domain(self.domid)
        value: int = _U64.unpack_from(dom.memory, DATA_PFN * PAGE_SIZE + off)[0]
        return value

    def _put(self, off: int, value: int) -> None:
        with self.xen.lock:
            dom = self.xen.domains[self.domid]
            _U64.pack_into(dom.memory, DATA_PFN * PAGE_SIZE + off, value)
            dom.touch(DATA_PFN)

    def _bump(self, off: int, by: int = 1) -> None:
        with self.xen.lock:
            dom = self.xen.domains[self.domid]
            base = DATA_PFN * PAGE_SIZE + off
            (v,) = _U64.unpack_from(dom.memory, base)
            _U64.pack_into(dom.memory, base, v + by)
            dom.touch(DATA_PFN)

    def _layout(self, mem: bytearray) -> tuple[int, int, int]:
        """(words in the tick work area, first pfn of the dirtier's region, its pages)."""
        region = self.behaviour.dirty_region
        pages = len(mem) // PAGE_SIZE
        first = pages - region
        return (first - WORK_FIRST_PFN) * PAGE_SIZE // 8, first, region

    def advance(self) -> int:
        """Materialise the work done since last time; return the tick counter."""
        with self.xen.lock:
            dom = self.xen.domains.get(self.domid)
            if dom is None:
                return -1
            cpu_ns = dom.cpu_time(_now_ns())
            now = cpu_ns // TICK_NS
            start = self._ticks_seen
            mem = dom.memory
            words, dirty_first, region = self._layout(mem)
            if now > start:
                counter_at = DATA_PFN * PAGE_SIZE + OFF_TICKS
                (counter,) = _U64.unpack_from(mem, counter_at)
                # Only the last ``words`` ticks can still be seen in memory.
                for t in range(max(start, now - words), now):
                    value = counter + (t - start) + 1
                    slot = WORK_FIRST_PFN * PAGE_SIZE + ((value * 2654435761) % words) * 8
                    _U64.pack_into(mem, slot, value * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
                    dom.touch(slot // PAGE_SIZE)
                _U64.pack_into(mem, counter_at, counter + (now - start))
                dom.touch(DATA_PFN)
                self._ticks_seen = now
            if region:
                due = (cpu_ns - self._dirty_base_ns) * self.behaviour.dirty_rate // 1e9
                new = int(due) - self._dirty_done
                if new > 0:
                    at = DATA_PFN * PAGE_SIZE + OFF_DIRTY_WRITES
                    (count,) = _U64.unpack_from(mem, at)
                    # Write j goes to the region's page (j-1) mod region; only the
                    # last ``region`` writes can still be seen.
                    for j in range(max(count + 1, count + new - region + 1), count + new + 1):
                        pfn = dirty_first + (j - 1) % region
                        _U64.pack_into(mem, pfn * PAGE_SIZE, j)
                        _U64.pack_into(mem, (pfn + 1) * PAGE_SIZE - 8, j)
                        dom.touch(pfn)
                    _U64.pack_into(mem, at, count + new)
                    dom.touch(DATA_PFN)
                    self._dirty_done = int(due)
            if dom.running_since_ns is not None:
                # The guest's wallclock as it works: when it last ran.
                _U64.pack_into(mem, DATA_PFN * PAGE_SIZE + OFF_LAST_RUN_NS, time.time_ns())
                dom.touch(DATA_PFN)
            counter_now: int = _U64.unpack_from(dom.memory, DATA_PFN * PAGE_SIZE + OFF_TICKS)[0]
            return counter_now

    def counters(self) -> dict[str, int]:
        """The tick counter and the boot / resume / suspend counts in guest memory."""
        ticks = self.advance()
        if ticks < 0:
            return {}
        return {
            "ticks": ticks,
            "boots": self._data(OFF_BOOTS),
            "cooperative_resumes": self._data(OFF_COOP_RESUMES),
            "new_domain_resumes": self._data(OFF_NEW_DOMAIN_RESUMES),
            "suspends": self._data(OFF_SUSPENDS),
            "dirty_writes": self._data(OFF_DIRTY_WRITES),
            "last_gap_ns": self._data(OFF_LAST_GAP_NS),
        }

    def memory_consistent(self) -> bool:
        """Whether guest memory holds exactly what the guest's own work wrote.

        The work is deterministic in the tick counter (and the dirtier's in its
        write counter), so the last ``words`` ticks' values must sit in their
        slots and the last writes of the dirtier in its pages: a toolstack that
        lost, tore or scribbled on guest memory fails this.
        """
        counter = self.advance()
        if counter < 0:
            return False
        with self.xen.lock:
            mem = self.xen.domains[self.domid].memory
            words, dirty_first, region = self._layout(mem)
            expected: dict[int, int] = {}
            for value in range(max(1, counter - words + 1), counter + 1):
                slot = WORK_FIRST_PFN * PAGE_SIZE + ((value * 2654435761) % words) * 8
                expected[slot] = value * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
            if region:
                (count,) = _U64.unpack_from(mem, DATA_PFN * PAGE_SIZE + OFF_DIRTY_WRITES)
                for j in range(max(1, count - region + 1), count + 1):
                    pfn = dirty_first + (j - 1) % region
                    expected[pfn * PAGE_SIZE] = j
                    expected[(pfn + 1) * PAGE_SIZE - 8] = j
            return all(_U64.unpack_from(mem, slot)[0] == v for slot, v in expected.items())

    def memory_checksum(self) -> str:
        """sha256 of guest memory (after materialising work) and vCPU state."""
        self.advance()
        return self.xen.memory_checksum(self.domid)

    # -- boot ----------------------------------------------------------------------

    async def boot(self) -> None:
        """Boot the kernel: vCPUs, callback, xenstore, control node, frontends."""
        xen = self.xen
        self._bump(OFF_BOOTS)
        self.log.append("boot")
        dom = xen.domain(self.domid)
        for v in dom.vcpus:
            xen.register_vcpu_info(self.domid, v.vcpu_id)
        if self.kind in ("pvhvm", "pvh"):
            # xen_setup_callback_vector(): PVHVM and PVH Linux both take event
            # channel upcalls through the vector callback.
            xen.guest_set_hvm_param(self.domid, HVM_PARAM_CALLBACK_IRQ, CALLBACK_VIA_VECTOR)
        await self._connect_xenstore()
        self._on_domain_state("boot")
        self.state = "running"
        if self.behaviour.misbehaviour == "lose_xenstore":
            self.log.append("xenstore connection lost")
            if self.xs is not None:
                self.xs.close()
                self.xs = None

    async def _connect_xenstore(self) -> None:
        self.xs = self.connect_xenstore(self.domid, self._on_xs_event)
        xs = self.xs
        # setup_shutdown_watcher(): advertise only the commands this kernel knows.
        known = ["poweroff", "reboot"]
        if self.behaviour.misbehaviour != "unknown_command":
            known.append("suspend")
        for cmd in known:
            await xs.write(f"control/feature-{cmd}", "1")
        await xs.watch("control/shutdown", "shutdown")
        if self.behaviour.suspend_evtchn:
            await self._setup_suspend_evtchn()
        for kind, devid in self.behaviour.frontends:
            self._spawn(self._frontend_connect(kind, devid))

    async def _setup_suspend_evtchn(self) -> None:
        """XenLinux: an unbound port for dom0, published for the toolstack."""
        xs = await self._xs()
        port = self.xen.evtchn_alloc_unbound(self.domid, 0)
        self.xen.evtchn_set_handler(self.domid, port, self._on_suspend_evtchn)
        self.suspend_port = port
        await xs.write("device/suspend/event-channel", str(port))

    def _on_suspend_evtchn(self) -> None:
        # The XenLinux suspend interrupt: suspend at once, no ack.
        if self._shutting_down or self.state != "running":
            return
        self._spawn(self._do_suspend())

    # -- frontends -------------------------------------------------------------------

    async def _frontend_connect(self, kind: str, devid: int) -> None:
        """xenbus frontend: Initialising -> (backend InitWait) -> Initialised/Connected."""
        xs = await self._xs()
        fe = f"device/{kind}/{devid}"
        self.grant_generation += 1
        gen = self.grant_generation  # before any await: devices connect concurrently
        backend = await xs.read(f"{fe}/backend")
        await self._set_frontend_state(kind, devid, XenbusState.INITIALISING)
        token = f"otherend:{kind}/{devid}"
        await xs.watch(f"{backend}/state", token)
        try:
            await self._wait_backend(backend, {XenbusState.INIT_WAIT, XenbusState.CONNECTED}, token)
            await self._runnable.wait()  # a paused domain runs no kernel code
            ref = (self.domid * 1000 + gen) * 2
            port = self.xen.evtchn_alloc_unbound(self.domid, 0)
            tx = await xs.transaction_start()
            if kind == "vif":
                await xs.write(f"{fe}/tx-ring-ref", str(ref), tx)
                await xs.write(f"{fe}/rx-ring-ref", str(ref + 1), tx)
            else:
                await xs.write(f"{fe}/ring-ref", str(ref), tx)
            await xs.write(f"{fe}/event-channel", str(port), tx)
            await xs.transaction_end(tx, True)
            if kind == "vif":
                # netfront: straight to Connected once it talked to netback.
                await self._set_frontend_state(kind, devid, XenbusState.CONNECTED)
            else:
                # blkfront: Initialised, then Connected when blkback is.
                await self._set_frontend_state(kind, devid, XenbusState.INITIALISED)
                await self._wait_backend(backend, {XenbusState.CONNECTED}, token)
                await self._set_frontend_state(kind, devid, XenbusState.CONNECTED)
            self.log.append(f"frontend {kind}/{devid} connected")
        finally:
            with contextlib.suppress(Exception):
                await xs.unwatch(f"{backend}/state", token)

    async def _set_frontend_state(self, kind: str, devid: int, state: int) -> None:
        await self._runnable.wait()
        xs = await self._xs()
        await xs.write(f"device/{kind}/{devid}/state", str(state))
        self.frontend_states[f"{kind}/{devid}"] = state

    async def _wait_backend(self, backend: str, states: set[int], token: str) -> None:
        xs = await self._xs()
        ev = self._otherend_events.setdefault(token, asyncio.Event())
        while True:
            ev.clear()
            try:
                state = int(await xs.read(f"{backend}/state") or 0)
            except XenstoreError as e:
                if e.errno != errno.ENOENT:
                    raise
                state = XenbusState.UNKNOWN
            if state in states:
                return
            await ev.wait()

    # -- xenstore events ---------------------------------------------------------------

    def _on_xs_event(self, path: str, token: str) -> None:
        if token == "shutdown":
            self._spawn(self._xenwatch_shutdown())
        elif token.startswith("otherend:"):
            self._otherend_events.setdefault(token, asyncio.Event()).set()

    async def _xenwatch_shutdown(self) -> None:
        # drivers/xen/xenbus/xenbus_xs.c xenwatch_thread(): one callback at a
        # time, and shutdown_handler() calls do_suspend() itself -- a command
        # written while the guest suspends is handled after it resumes, not lost.
        async with self._xenwatch:
            await self._shutdown_handler()

    async def _shutdown_handler(self) -> None:
        """drivers/xen/manage.c shutdown_handler()."""
        if self.behaviour.misbehaviour == "never_ack":
            return
        # A paused or shut-down domain runs no kernel code: it acts once it runs.
        await self._runnable.wait()
        if self._shutting_down or self.state != "running":
            return
        if self.behaviour.misbehaviour == "slow_ack":
            await asyncio.sleep(self.behaviour.slow_ack)  # a slow guest, modelled
        xs = await self._xs()
        known = {"poweroff", "halt", "reboot"}
        if self.behaviour.misbehaviour != "unknown_command":
            known.add("suspend")
        while True:
            tx = await xs.transaction_start()
            try:
                command = await xs.read("control/shutdown", tx)
            except XenstoreError:
                await xs.transaction_end(tx, False)
                return
            # Only acknowledge commands which we are prepared to handle.
            if command in known:
                await xs.write("control/shutdown", "", tx)
            try:
                await xs.transaction_end(tx, True)
            except XenstoreError as e:
                if e.errno == errno.EAGAIN:
                    continue
                raise
            break
        if command not in known:
            if command:
                self.log.append(f"ignored unknown shutdown command {command!r}")
            return
        self.log.append(f"acked {command}")
        if command == "suspend":
            await self._do_suspend()
        elif command in ("poweroff", "halt"):
            self.xen.sched_shutdown(self.domid, ShutdownReason.POWEROFF)
            self.state = "shutdown"
        elif command == "reboot":
            self.xen.sched_shutdown(self.domid, ShutdownReason.REBOOT)
            self.state = "rebooted"

    # -- suspend -------------------------------------------------------------------------

    async def _do_suspend(self) -> None:
        """drivers/xen/manage.c do_suspend() + xen_suspend()."""
        if self._shutting_down:
            return
        self._shutting_down = True
        try:
            await self._suspend_steps()
        finally:
            self._shutting_down = False

    async def _suspend_steps(self) -> None:
        mis = self.behaviour.misbehaviour
        self.state = "suspending"
        if mis == "vanish" and self.on_destroy_request is not None:
            self.log.append("vanishing")
            self.on_destroy_request(self.domid)  # the toolstack destroys it under us
            return
        if self.behaviour.freeze_time:
            await asyncio.sleep(self.behaviour.freeze_time)  # freezing tasks takes time
        if mis == "ack_then_hang":
            # freeze_processes() failed: "freeze processes failed"; keep running.
            self.log.append("freeze processes failed")
            self.state = "running"
            return
        if mis == "crash_during_suspend":
            self._panic("panic during suspend", ShutdownReason.CRASH, "crashed")
            return
        self.advance()
        self._bump(OFF_SUSPENDS)
        self.log.append("xs_suspend")
        start_info_mfn = 0
        if self.pv:
            # xen_pv_pre_suspend(): store/console MFNs rewritten as PFNs.
            with self.xen.lock:
                dom = self.xen.domains[self.domid]
                si = dom.start_info
                assert si is not None
                si.store_mfn = dom.p2m.index(si.store_mfn)
                si.console_mfn = dom.p2m.index(si.console_mfn)
                si.frames_are_pfns = True
                start_info_mfn = dom.start_info_mfn
        self.log.append("gnttab_suspend")
        self.state = "suspended"
        try:
            ret = await self.xen.sched_shutdown_suspend(self.domid, start_info_mfn)
        except asyncio.CancelledError:
            return  # destroyed while suspended
        await self.after_suspend_hypercall(ret)

    def adopt_restored(self) -> None:
        """A kernel restored into a new domain: it is inside its suspend hypercall.

        Called by the restoring host instead of :meth:`boot`; the hypercall
        returns when the toolstack resumes the domain (0: a new domain).
        """
        self.state = "suspended"
        self.log.append("restored into a new domain")
        self._ticks_seen = 0
        self._dirty_base_ns = 0
        self._dirty_done = 0
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        with self.xen.lock:
            self.xen.domains[self.domid].suspend_waiter = fut

        async def wait() -> None:
            try:
                ret = await fut
            except asyncio.CancelledError:
                return
            await self.after_suspend_hypercall(ret)

        self._spawn(wait())

    def saved_state(self) -> dict[str, Any]:
        """The kernel's own state a save carries (its memory travels separately)."""
        return {
            "kind": self.kind,
            "grant_generation": self.grant_generation,
            "log": list(self.log)[-50:],
        }

    async def after_suspend_hypercall(self, ret: int) -> None:
        """Linux's path once SCHEDOP_shutdown(suspend) returns ``ret``.

        Also the entry point of a guest restored into a new domain (ret 0).
        """
        self.last_hypercall_return = ret
        self.checksum_at_resume = self.xen.memory_checksum(self.domid)
        # It runs again: how long it did not, by its own wallclock.
        gap = max(0, time.time_ns() - self._data(OFF_LAST_RUN_NS))
        self._put(OFF_LAST_GAP_NS, gap)
        self.log.append(f"ran again {gap / 1e6:.1f} ms after it last ran")
        cancelled = ret != 0
        self.log.append(f"suspend hypercall returned {ret}")
        try:
            if self.pv:
                self._pv_post_suspend(cancelled)
            else:
                self._hvm_post_suspend(cancelled)
        except HypervisorError as e:
            # register_vcpu_info failed: the kernel BUG()s.
            message = f"panic: register_vcpu_info failed: err=-{e.errno}"
            if self.pv:
                self._panic(message, ShutdownReason.CRASH, "crashed")
            else:
                self._panic(message, ShutdownReason.REBOOT, "rebooted")
            return
        self.log.append("gnttab_resume")
        if cancelled:
            self.log.append("xs_suspend_cancel")
            self._bump(OFF_COOP_RESUMES)
            self.state = "running"
            self._on_domain_state("resumed")
            return
        # A new domain: event channels and timers, xenstore, then devices.
        self.log.append("irq_resume")
        self.log.append("timer_resume")
        self._bump(OFF_NEW_DOMAIN_RESUMES)
        cpu_ns = self.xen.cpu_time_ns(self.domid)
        self._ticks_seen = cpu_ns // TICK_NS
        self._dirty_base_ns = cpu_ns
        self._dirty_done = 0
        self.log.append("xs_resume")
        if self.xs is not None:
            with contextlib.suppress(Exception):
                self.xs.close()
        self._otherend_events = {}
        await self._connect_xenstore()
        self.state = "running"
        self._on_domain_state("resumed")

    def _pv_post_suspend(self, cancelled: bool) -> None:
        """arch/x86/xen/suspend_pv.c xen_pv_post_suspend()."""
        with self.xen.lock:
            dom = self.xen.domains[self.domid]
            si = dom.start_info
            assert si is not None
            if cancelled:
                if si.frames_are_pfns:
                    si.store_mfn = dom.p2m[si.store_mfn]
                    si.console_mfn = dom.p2m[si.console_mfn]
                    si.frames_are_pfns = False
                return
        self.log.append("xen_vcpu_restore")
        for v in self.xen.domain(self.domid).vcpus:
            self.xen.register_vcpu_info(self.domid, v.vcpu_id)
            if v.vcpu_id:
                self.xen.vcpu_up(self.domid, v.vcpu_id)
        self.log.append("runstate areas rebuilt")

    def _hvm_post_suspend(self, cancelled: bool) -> None:
        """arch/x86/xen/suspend_hvm.c xen_hvm_post_suspend()."""
        if not cancelled:
            self.log.append("xen_hvm_init_shared_info")
            self.log.append("xen_vcpu_restore")
            for v in self.xen.domain(self.domid).vcpus:
                self.xen.register_vcpu_info(self.domid, v.vcpu_id)
        # The vector callback is set again on every resume.
        self.xen.guest_set_hvm_param(self.domid, HVM_PARAM_CALLBACK_IRQ, CALLBACK_VIA_VECTOR)
        self.log.append("callback vector set")
        if not cancelled:
            self.log.append("runstate areas rebuilt")

    def fingerprint(self) -> str:
        """A short digest of the guest's memory, for status displays."""
        return hashlib.sha256(self.memory_checksum().encode()).hexdigest()[:12]


def _now_ns() -> int:
    return time.monotonic_ns()

"""The simulated hypervisor: Xen's observable state and semantics, in Python.

This is the model the simulated host's guests run on and the orchestrator
drives (through :class:`SimHypervisor`, the in-process implementation of
:class:`torpor.hypervisor.Hypervisor`).  It models what suspend and resume
touch, with Xen 4.17's semantics and errnos:

* domains: domid, uuid, HVM flag, emulation flags, controller pause count,
  shutdown (code), dying; ``XEN_DOMINF_*`` flags as ``getdomaininfo`` reports;
* vCPUs with the registers that matter: eax (the suspend hypercall's return
  value), edx (a PV guest's start_info MFN at SCHEDOP_shutdown(suspend)), and
  whether the vCPU registered its vcpu_info -- ``VCPUOP_register_vcpu_info``
  refuses a second registration in the same domain with EINVAL, which is why a
  Linux guest resumed non-cooperatively *in the same domain* panics
  (docs/real-xen.md);
* a PV guest's start_info (store / console frame numbers, in MFN or PFN form)
  and its p2m, so that the guest's MFN->PFN rewrite and
  ``xc_domain_resume_any``'s PFN->MFN rewrite are real operations;
* HVM params (CALLBACK_IRQ, ACPI_S_STATE, ...);
* event channels, with XEN_DOMCTL_subscribe: on a suspend the subscribed
  guest port is signalled *instead of* VIRQ_DOM_EXC (xen/common/domain.c,
  ``__domain_finalise_shutdown``); one subscriber per domain, last one wins;
* guest memory (a bytearray) with content, and log-dirty mode
  (``XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`` / ``CLEAN`` / ``OFF``): while it
  is on, every page the guest writes is marked, and a clean hands the marks
  over and starts again -- what a live migration's precopy rounds read;
* the host's virtualisation capabilities (``xl info``'s ``virt_caps``): a PV
  guest's log-dirty needs shadow paging, which a hypervisor built without it
  (Debian's 4.17) refuses with EOPNOTSUPP; HVM guests use HAP.

Sources: xen/common/domain.c (domain_shutdown, domain_resume, pause counts),
xen/common/domctl.c (getdomaininfo, resumedomain, subscribe),
tools/libs/guest/xg_resume.c (xc_domain_resume: cooperative vs any),
xen/common/event_channel.c (alloc_unbound, bind_interdomain, send, close).

Thread safety: one re-entrant lock guards all state.  The orchestrator calls
in from its own thread; guests and device models call in from the simulated
host's event loop.  Whatever must happen *in* that loop (waking a guest
blocked in its suspend hypercall, VIRQ_DOM_EXC reaching xenstored) is
scheduled there with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import os
import struct
import threading
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from torpor.errors import HypervisorError
from torpor.model import (
    HVM_PARAM_ACPI_S_STATE,
    HVM_PARAM_CALLBACK_IRQ,
    X86_EMU_PIT,
    DomainInfo,
    ShutdownReason,
)

__all__ = ["EvtchnHandle", "SimDomain", "SimHypervisor", "SimVcpu", "SimXen", "StartInfo"]

PAGE_SIZE = 4096
#: Xen refuses a domain id at or above DOMID_FIRST_RESERVED.
DOMID_FIRST_RESERVED = 0x7FF0
#: Where a PV guest keeps its start_info page (a PFN in its own memory).
START_INFO_PFN = 0
#: Guest-visible word written by the "work" a simulated guest does.
_WORD = struct.Struct("<Q")


def _err(code: int, op: str, domid: int | None = None) -> HypervisorError:
    err: HypervisorError = HypervisorError.from_errno(code, op=op, domid=domid)
    return err


@attrs.define
class SimVcpu:
    """One vCPU: the registers and per-vCPU hypervisor state torpor's protocol touches."""

    vcpu_id: int
    online: bool = True
    #: The suspend hypercall's return value lands here (``xc_domain_resume``).
    eax: int = 0
    #: A PV guest passes its start_info MFN in edx to SCHEDOP_shutdown(suspend).
    edx: int = 0
    #: VCPUOP_register_vcpu_info done in this domain (a second one is EINVAL).
    vcpu_info_registered: bool = False


@attrs.define
class StartInfo:
    """A PV guest's start_info page fields that a suspend rewrites."""

    store_mfn: int
    console_mfn: int
    #: True while the guest has rewritten the two frames as PFNs (pre-suspend).
    frames_are_pfns: bool = False


@attrs.define(eq=False)
class Port:
    """One end of an event channel (``struct evtchn``)."""

    domid: int
    port: int
    #: "unbound" (waiting for ``remote_domid``), "interdomain", or "closed".
    state: str = "unbound"
    remote_domid: int = 0
    peer: Port | None = None
    #: For a guest's port: called (in the sim loop) when an event arrives.
    handler: Callable[[], None] | None = None
    #: For dom0's ports: the userspace handle (libxenevtchn) it belongs to.
    handle: EvtchnHandle | None = None
    masked: bool = False


@attrs.define(eq=False)
class SimDomain:
    """A domain as Xen holds it (the parts suspend/resume touch)."""

    domid: int
    name: str
    uuid: str
    hvm: bool
    emulation_flags: int
    vcpus: list[SimVcpu]
    memory: bytearray
    #: pfn -> mfn (the p2m); a PV guest sees MFNs, HVM guests don't care.
    p2m: list[int]
    start_info: StartInfo | None
    start_info_mfn: int = 0
    hvm_params: dict[int, int] = attrs.Factory(dict)
    controller_pause_count: int = 0
    shutdown_code: int | None = None
    dying: bool = False
    #: XEN_DOMCTL_subscribe: the guest port signalled on suspend (0 = none).
    suspend_evtchn: int = 0
    ports: dict[int, Port] = attrs.Factory(dict)
    #: A guest blocked in SCHEDOP_shutdown(suspend): resolved with eax on resume.
    suspend_waiter: asyncio.Future[int] | None = None
    #: Listeners told of state changes (the guest actor, device models).
    listeners: list[Callable[[str], None]] = attrs.Factory(list)
    #: Accumulated vCPU time (getdomaininfo's cpu_time): grows only while running.
    cpu_time_ns: int = 0
    running_since_ns: int | None = None
    #: Log-dirty mode: the pfns written since the last clean (None: off).
    logdirty: set[int] | None = None
    #: The guest's work is computed lazily; this materialises it (set by the guest)
    #: so that reading memory or the dirty log sees every write done by now.
    materialise: Callable[[], object] | None = None

    def touch(self, pfn: int) -> None:
        """The guest wrote page ``pfn`` (under the hypervisor's lock)."""
        if self.logdirty is not None:
            self.logdirty.add(pfn)

    @property
    def s3(self) -> bool:
        return self.hvm_params.get(HVM_PARAM_ACPI_S_STATE, 0) == 3

    @property
    def is_running(self) -> bool:
        """Scheduled: not paused, not shut down, not dying, a vCPU up (not in S3)."""
        return (
            self.controller_pause_count == 0
            and self.shutdown_code is None
            and not self.dying
            and not self.s3
            and any(v.online for v in self.vcpus)
        )

    def cpu_time(self, now_ns: int) -> int:
        extra = now_ns - self.running_since_ns if self.running_since_ns is not None else 0
        return self.cpu_time_ns + extra

    def flags(self) -> int:
        """The ``XEN_DOMINF_*`` word alone (cheap: what xenstored's checks need)."""
        running = self.is_running
        return DomainInfo.make_flags(
            hvm=self.hvm,
            hap=self.hvm,
            dying=self.dying,
            shutdown_reason=self.shutdown_code,
            paused=self.controller_pause_count > 0,
            running=running,
            blocked=not running and self.shutdown_code is None and not self.dying,
        )

    def info(self) -> DomainInfo:
        return DomainInfo(
            domid=self.domid,
            flags=self.flags(),
            uuid=self.uuid,
            tot_pages=len(self.memory) // PAGE_SIZE,
            max_pages=len(self.memory) // PAGE_SIZE,
            nr_online_vcpus=sum(1 for v in self.vcpus if v.online),
            max_vcpu_id=len(self.vcpus) - 1,
            emulation_flags=self.emulation_flags,
            cpu_time=self.cpu_time(time.monotonic_ns()),
        )


class EvtchnHandle:
    """A dom0 userspace event-channel handle (what ``xenevtchn_open`` returns).

    Events for ports bound through this handle queue here and make
    :meth:`fileno` readable, as the kernel's evtchn device does; a delivered
    port stays masked until :meth:`unmask`.
    """

    def __init__(self, xen: SimXen) -> None:
        self.xen = xen
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._pending: deque[int] = deque()
        self.ports: set[int] = set()
        self.closed = False
        #: The id a control-socket client knows this handle by.
        self.control_id = 0

    def fileno(self) -> int:
        return self._r

    def _deliver(self, port: int) -> None:
        self._pending.append(port)
        # A full pipe means the reader has plenty to do already.
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"!")

    def pending(self) -> int | None:
        with self.xen.lock:
            if not self._pending:
                return None
            with contextlib.suppress(BlockingIOError):
                os.read(self._r, 1)
            return self._pending.popleft()

    def close(self) -> None:
        with self.xen.lock:
            for port in list(self.ports):
                self.xen._close_port(0, port)
            self.closed = True
        os.close(self._r)
        os.close(self._w)


class SimXen:
    """The simulated hypervisor.

    :param loop: the simulated host's event loop (guests and xenstored live there).
    :param virq_dom_exc: called (in ``loop``) when Xen would raise VIRQ_DOM_EXC;
        the simulated xenstored re-checks its domains and fires ``@releaseDomain``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        virq_dom_exc: Callable[[], None] | None = None,
        *,
        shadow: bool = True,
    ) -> None:
        self.lock = threading.RLock()
        #: ``xl info``'s virt_caps (XEN_SYSCTL_PHYSCAP_*): without ``shadow``, as
        #: Debian's Xen 4.17 is built, a PV guest's log-dirty is EOPNOTSUPP.
        self.virt_caps: frozenset[str] = frozenset(
            {"pv", "hvm", "hap", "gnttab-v1", "gnttab-v2", *(("shadow",) if shadow else ())}
        )
        self.loop = loop
        self.virq_dom_exc = virq_dom_exc
        self.domains: dict[int, SimDomain] = {}
        self._next_domid = 1
        self._next_mfn = 0x10000
        #: Operation counts, for tests and benchmarks.
        self.calls: dict[str, int] = {}
        #: Inject a failure: op name -> errno (the hypervisor backend erroring).
        self.fail_ops: dict[str, int] = {}
        self._virq_pending = False
        self._make_dom0()

    # -- internals ---------------------------------------------------------

    def _make_dom0(self) -> None:
        dom0 = SimDomain(
            domid=0,
            name="Domain-0",
            uuid="00000000-0000-0000-0000-000000000000",
            hvm=False,
            # Xen gives a PV hardware domain an emulated PIT (arch_domain_create:
            # XEN_X86_EMU_PIT); the lab's 4.17 dom0 reports 256.
            emulation_flags=X86_EMU_PIT,
            vcpus=[SimVcpu(0, vcpu_info_registered=True)],
            memory=bytearray(0),
            p2m=[],
            start_info=None,
        )
        self.domains[0] = dom0

    def _count(self, op: str, domid: int | None = None) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        code = self.fail_ops.get(op)
        if code is not None:
            raise _err(code, op, domid)

    def _domain(self, domid: int, op: str) -> SimDomain:
        if not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
            raise _err(errno.EINVAL, op, domid)
        dom = self.domains.get(domid)
        if dom is None:
            raise _err(errno.ESRCH, op, domid)
        return dom

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` in the simulated host's loop (now, if we are in it)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            fn(*args)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.call_soon(fn, *args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _account(self, dom: SimDomain) -> None:
        """Close or open the domain's running interval after a state change."""
        now = time.monotonic_ns()
        if dom.running_since_ns is not None:
            dom.cpu_time_ns += now - dom.running_since_ns
            dom.running_since_ns = None
        if dom.is_running:
            dom.running_since_ns = now

    def cpu_time_ns(self, domid: int) -> int:
        """The domain's accumulated running time (what its work is a function of)."""
        with self.lock:
            return self._domain(domid, "cpu_time").cpu_time(time.monotonic_ns())

    def _notify(self, dom: SimDomain, what: str) -> None:
        self._account(dom)
        for listener in list(dom.listeners):
            self._in_loop(listener, what)

    def _send_virq_dom_exc(self) -> None:
        # A VIRQ is a pending bit: raised again before the handler ran, it is
        # still one event (xenstored then checks every domain once).
        if self.virq_dom_exc is not None and not self._virq_pending:
            self._virq_pending = True
            self._in_loop(self._deliver_virq_dom_exc)

    def _deliver_virq_dom_exc(self) -> None:
        self._virq_pending = False
        if self.virq_dom_exc is not None:
            self.virq_dom_exc()

    def _alloc_mfn(self) -> int:
        mfn = self._next_mfn
        self._next_mfn += 1
        return mfn

    # -- domain building (the simulated host's toolstack side) -------------

    def create_domain(
        self,
        *,
        name: str,
        hvm: bool,
        emulation_flags: int = 0,
        vcpus: int = 2,
        memory_pages: int = 16,
        domid: int | None = None,
        uuid: str | None = None,
    ) -> SimDomain:
        """XEN_DOMCTL_createdomain + memory population, paused as libxl leaves it."""
        with self.lock:
            if domid is None:
                while self._next_domid in self.domains:
                    self._next_domid += 1
                domid = self._next_domid
                self._next_domid += 1
            elif domid in self.domains:
                raise _err(errno.EEXIST, "createdomain", domid)
            p2m = [self._alloc_mfn() for _ in range(memory_pages)]
            dom = SimDomain(
                domid=domid,
                name=name,
                uuid=uuid or str(uuidlib.uuid4()),
                hvm=hvm,
                emulation_flags=emulation_flags,
                vcpus=[SimVcpu(i) for i in range(vcpus)],
                memory=bytearray(memory_pages * PAGE_SIZE),
                p2m=p2m,
                start_info=None,
                controller_pause_count=1,
            )
            if not hvm:
                # The domain builder puts start_info in the guest and hands the
                # guest the store and console rings as machine frames.
                dom.start_info_mfn = p2m[START_INFO_PFN]
                dom.start_info = StartInfo(store_mfn=p2m[1], console_mfn=p2m[2])
            self.domains[domid] = dom
            return dom

    def store_mfn(self, domid: int) -> int:
        """The frame libxl passes to XS_INTRODUCE (the store ring's MFN / PFN)."""
        with self.lock:
            dom = self._domain(domid, "store_mfn")
            return dom.p2m[1] if dom.start_info is not None else 0xFEFFF

    # -- save and restore (what libxenguest's xc_domain_save/restore move) ---

    def save_domain(self, domid: int) -> dict[str, Any]:
        """A suspended domain's hypervisor-side state, canonical (frames as PFNs).

        Like ``xc_domain_save`` it requires the domain shut down for suspend,
        and writes machine frame numbers as guest PFNs so they can be
        re-translated on whichever host restores it.
        """
        with self.lock:
            dom = self._domain(domid, "save")
            if dom.shutdown_code != ShutdownReason.SUSPEND:
                raise _err(errno.EINVAL, "save", domid)
            p2m = {mfn: pfn for pfn, mfn in enumerate(dom.p2m)}
            si = dom.start_info
            return {
                "memory": bytes(dom.memory),
                "vcpus": [
                    {
                        "vcpu_id": v.vcpu_id,
                        "online": v.online,
                        # PV: edx holds the start_info MFN; saved as its PFN.
                        "edx_pfn": p2m.get(v.edx) if not dom.hvm and v.edx else None,
                    }
                    for v in dom.vcpus
                ],
                "start_info": None
                if si is None
                else {
                    "store": si.store_mfn if si.frames_are_pfns else p2m[si.store_mfn],
                    "console": si.console_mfn if si.frames_are_pfns else p2m[si.console_mfn],
                },
                "hvm_params": {str(k): v for k, v in dom.hvm_params.items()},
            }

    def restore_domain(
        self,
        *,
        name: str,
        hvm: bool,
        emulation_flags: int,
        state: dict[str, Any],
        uuid: str | None = None,
    ) -> SimDomain:
        """``xc_domain_restore``: a new domain holding the saved state.

        As libxl leaves a restored domain (seen on real Xen 4.17): **paused**
        by the controller, *not* shut down -- a new domain has no shutdown
        state -- with vCPU0's saved eax 0 (what SCHEDOP_shutdown(suspend)
        returned when the domain was saved), frame numbers translated to this
        host's machine frames (the restorer rewrites start_info's store and
        console frames and the start_info MFN in edx) and no vcpu_info
        registered.  ``unpause`` lets the guest return 0 from its suspend
        hypercall and rebuild; no ``xc_domain_resume`` is involved.
        """
        memory = state["memory"]
        pages = max(len(memory) // PAGE_SIZE, 1)
        dom = self.create_domain(
            name=name,
            hvm=hvm,
            emulation_flags=emulation_flags,
            vcpus=len(state["vcpus"]),
            memory_pages=pages,
            uuid=uuid,
        )
        with self.lock:
            dom.memory[: len(memory)] = memory
            for v, saved in zip(dom.vcpus, state["vcpus"], strict=True):
                v.online = bool(saved["online"])
                pfn = saved.get("edx_pfn")
                v.edx = dom.p2m[pfn] if pfn is not None else 0
                v.eax = 0
            si = state.get("start_info")
            if si is not None and dom.start_info is not None:
                # Saved as PFNs (xen_pv_pre_suspend); the restorer writes MFNs.
                dom.start_info.store_mfn = dom.p2m[int(si["store"])]
                dom.start_info.console_mfn = dom.p2m[int(si["console"])]
                dom.start_info.frames_are_pfns = False
            elif dom.start_info is not None:
                dom.start_info = None
            dom.hvm_params.update({int(k): int(v) for k, v in state["hvm_params"].items()})
            dom.shutdown_code = None
            dom.controller_pause_count = 1  # libxl builds domains paused
            self._account(dom)
        return dom

    # -- the Hypervisor Protocol (toolstack side) --------------------------

    def domain_info_list(self, first_domid: int = 0, max_domains: int = 1024) -> list[DomainInfo]:
        with self.lock:
            self._count("domain_info_list")
            ids = sorted(d for d in self.domains if d >= first_domid)[:max_domains]
            return [self.domains[d].info() for d in ids]

    def domain_info(self, domid: int) -> DomainInfo:
        with self.lock:
            self._count("domain_info", domid)
            return self._domain(domid, "domain_info").info()

    def domain_flags(self, domid: int) -> int | None:
        """Just the flags word of an existing domain, or None (for xenstored's checks)."""
        with self.lock:
            dom = self.domains.get(domid)
            return None if dom is None else dom.flags()

    def pause(self, domid: int) -> None:
        with self.lock:
            self._count("pause", domid)
            dom = self._domain(domid, "pause")
            if domid == 0:
                raise _err(errno.EINVAL, "pause", domid)
            # xen/common/domain.c: the controller pause count saturates.
            if dom.controller_pause_count >= 255:
                raise _err(errno.EOVERFLOW, "pause", domid)
            dom.controller_pause_count += 1
            self._notify(dom, "paused")

    def unpause(self, domid: int) -> None:
        with self.lock:
            self._count("unpause", domid)
            dom = self._domain(domid, "unpause")
            if dom.controller_pause_count == 0:
                raise _err(errno.EINVAL, "unpause", domid)
            dom.controller_pause_count -= 1
            if dom.controller_pause_count == 0:
                self._notify(dom, "unpaused")
                self._return_from_suspend(dom)

    def shutdown(self, domid: int, reason: ShutdownReason) -> None:
        """``xc_domain_shutdown`` from dom0 (SCHEDOP_remote_shutdown): the hard path."""
        with self.lock:
            self._count("shutdown", domid)
            dom = self._domain(domid, "shutdown")
            if domid == 0:
                raise _err(errno.EINVAL, "shutdown", domid)
            self._domain_shutdown(dom, int(reason))

    def _domain_shutdown(self, dom: SimDomain, code: int) -> None:
        # xen/common/domain.c domain_shutdown(): the first shutdown wins; a
        # domain already shutting down keeps its code.
        if dom.dying or dom.shutdown_code is not None:
            return
        dom.shutdown_code = code
        self._notify(dom, "shutdown")
        # __domain_finalise_shutdown(): a suspend with a subscribed channel is
        # signalled there *instead of* VIRQ_DOM_EXC.
        if code == ShutdownReason.SUSPEND and dom.suspend_evtchn:
            self._evtchn_send(dom.domid, dom.suspend_evtchn)
        else:
            self._send_virq_dom_exc()

    #: loop iterations a just-resumed guest's kernel runs before the toolstack
    #: goes on (:meth:`vcpus_ran`); its immediate work takes three
    VCPU_RUN_YIELDS = 8

    async def vcpus_ran(self) -> None:
        """Let the vCPUs :meth:`resume` or :meth:`unpause` just released run first.

        On real Xen a resumed guest's kernel runs its resume path at once --
        microseconds -- while the toolstack's next step (XS_RESUME) is a
        system call and a round trip away.  Seen in the lab: a PV kernel
        resumed with fast=0 in the same domain panicked before torpor's
        XS_RESUME reached xenstored, whose ``@releaseDomain`` latch was still
        set from the suspend, so the crash fired no ``@releaseDomain`` at all.
        The simulated kernels run in this host's loop; toolstack-facing entry
        points (:class:`SimHypervisor`, the control server) await this after
        a resume or unpause, so a guest's immediate reaction comes first here
        too.
        """
        for _ in range(self.VCPU_RUN_YIELDS):
            await asyncio.sleep(0)

    def wait_vcpus_ran(self) -> None:
        """:meth:`vcpus_ran`, from a toolstack thread (no-op in the loop or without one)."""
        loop = self.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return  # in the loop: the caller awaits vcpus_ran() itself
        fut = asyncio.run_coroutine_threadsafe(self.vcpus_ran(), loop)
        with contextlib.suppress(concurrent.futures.TimeoutError):
            fut.result(5.0)

    def resume(self, domid: int, *, fast: bool) -> None:
        """``xc_domain_resume`` (tools/libs/guest/xg_resume.c)."""
        with self.lock:
            self._count("resume", domid)
            dom = self._domain(domid, "resume")
            if fast:
                # modify_returncode(): refuse unless shut down for suspend --
                # poking eax of a running vCPU would corrupt the guest.
                if dom.shutdown_code != ShutdownReason.SUSPEND:
                    raise _err(errno.EINVAL, "resume", domid)
                pv_drivers = not dom.hvm or dom.hvm_params.get(HVM_PARAM_CALLBACK_IRQ, 0) != 0
                if pv_drivers:
                    dom.vcpus[0].eax = 1
            elif not dom.hvm:
                # xc_domain_resume_any(), PV: start_info frames back to MFNs
                # through the p2m, secondary vCPUs reset, then resume.
                si = dom.start_info
                if si is None or dom.vcpus[0].edx != dom.start_info_mfn:
                    raise _err(errno.EINVAL, "resume", domid)  # "Couldn't map start_info"
                if si.frames_are_pfns:
                    si.store_mfn = dom.p2m[si.store_mfn]
                    si.console_mfn = dom.p2m[si.console_mfn]
                    si.frames_are_pfns = False
                for v in dom.vcpus[1:]:
                    v.online = False
                    v.eax = v.edx = 0
            self._resumedomain(dom)

    def _resumedomain(self, dom: SimDomain) -> None:
        # XEN_DOMCTL_resumedomain -> domain_resume(): clear the shutdown state
        # and unpause the vCPUs paused for it; harmless on a running domain.
        dom.shutdown_code = None
        self._notify(dom, "resumed")
        self._return_from_suspend(dom)

    def _return_from_suspend(self, dom: SimDomain) -> None:
        # The suspend hypercall returns (with vCPU0's eax) when the vCPU runs
        # again.  domain_resume() only undoes the pause *for shutdown*: a domain
        # the controller also paused (domain_pause_by_systemcontroller) keeps
        # its vCPUs paused, and its kernel runs nothing, until it is unpaused.
        if dom.suspend_waiter is None or dom.shutdown_code is not None:
            return
        if dom.controller_pause_count > 0:
            return
        waiter, dom.suspend_waiter = dom.suspend_waiter, None
        self._in_loop(_settle, waiter, dom.vcpus[0].eax)

    def destroy(self, domid: int) -> None:
        with self.lock:
            self._count("destroy", domid)
            dom = self._domain(domid, "destroy")
            if domid == 0:
                raise _err(errno.EINVAL, "destroy", domid)
            dom.dying = True
            for port in list(dom.ports):
                self._close_port(domid, port)
            waiter, dom.suspend_waiter = dom.suspend_waiter, None
            del self.domains[domid]
            self._notify(dom, "destroyed")
            if waiter is not None:
                self._in_loop(_cancel, waiter)
            self._send_virq_dom_exc()

    def get_hvm_param(self, domid: int, param: int) -> int:
        with self.lock:
            self._count("get_hvm_param", domid)
            dom = self._domain(domid, "get_hvm_param")
            if not dom.hvm:
                raise _err(errno.EINVAL, "get_hvm_param", domid)
            return dom.hvm_params.get(param, 0)

    def set_hvm_param(self, domid: int, param: int, value: int) -> None:
        with self.lock:
            self._count("set_hvm_param", domid)
            dom = self._domain(domid, "set_hvm_param")
            if not dom.hvm:
                raise _err(errno.EINVAL, "set_hvm_param", domid)
            old = dom.hvm_params.get(param, 0)
            dom.hvm_params[param] = value
            if param == HVM_PARAM_ACPI_S_STATE and old != value:
                # hvm_s3_suspend()/hvm_s3_resume(): vCPUs reset down in S3, the
                # domain neither paused nor shut down (no VIRQ_DOM_EXC).
                for v in dom.vcpus:
                    v.online = False
                if value == 0:
                    dom.vcpus[0].online = True
                self._account(dom)
                self._notify(dom, "s3" if value == 3 else "s0")

    # -- event channels ----------------------------------------------------

    def open_evtchn_handle(self) -> EvtchnHandle:
        return EvtchnHandle(self)

    def _alloc_port(self, dom: SimDomain) -> Port:
        n = 1
        while n in dom.ports:
            n += 1
        port = Port(domid=dom.domid, port=n)
        dom.ports[n] = port
        return port

    def evtchn_alloc_unbound(self, domid: int, remote_domid: int) -> int:
        """EVTCHNOP_alloc_unbound, as a guest does it for dom0 to bind."""
        with self.lock:
            dom = self._domain(domid, "alloc_unbound")
            port = self._alloc_port(dom)
            port.remote_domid = remote_domid
            return port.port

    def evtchn_set_handler(self, domid: int, port: int, handler: Callable[[], None]) -> None:
        """The guest's IRQ handler for its port (runs in the sim loop)."""
        with self.lock:
            p = self._domain(domid, "bind_handler").ports.get(port)
            if p is None:
                raise _err(errno.EINVAL, "bind_handler", domid)
            p.handler = handler

    def _evtchn_send(self, domid: int, port: int) -> None:
        """EVTCHNOP_send from ``domid``'s ``port``: the peer's port fires."""
        dom = self.domains.get(domid)
        if dom is None:
            return
        p = dom.ports.get(port)
        if p is None or p.state != "interdomain" or p.peer is None:
            return  # an unbound port swallows the event, as in Xen
        peer = p.peer
        if peer.handle is not None:
            if not peer.masked:
                peer.masked = True
                peer.handle._deliver(peer.port)
        elif peer.handler is not None:
            self._in_loop(peer.handler)

    def evtchn_send(self, domid: int, port: int) -> None:
        with self.lock:
            self._evtchn_send(domid, port)

    def _close_port(self, domid: int, port: int) -> None:
        dom = self.domains.get(domid)
        if dom is None:
            return
        p = dom.ports.pop(port, None)
        if p is None:
            return
        p.state = "closed"
        if p.handle is not None:
            p.handle.ports.discard(port)
        peer = p.peer
        if peer is not None:
            # event_channel.c evtchn_close(): the remote end goes back to unbound.
            peer.state = "unbound"
            peer.peer = None
            peer.remote_domid = domid

    def bind_interdomain(self, handle: EvtchnHandle, remote_domid: int, remote_port: int) -> int:
        with self.lock:
            self._count("evtchn_bind_interdomain", remote_domid)
            rdom = self._domain(remote_domid, "evtchn_bind_interdomain")
            rport = rdom.ports.get(remote_port)
            # evtchn_bind_interdomain(): the remote port must be unbound and
            # offered to us (its remote_domid is dom0).
            if rport is None or rport.state != "unbound" or rport.remote_domid != 0:
                raise _err(errno.EINVAL, "evtchn_bind_interdomain", remote_domid)
            local = self._alloc_port(self.domains[0])
            local.state = rport.state = "interdomain"
            local.peer, rport.peer = rport, local
            local.remote_domid = remote_domid
            local.handle = handle
            handle.ports.add(local.port)
            # event_channel.c: "We may have lost notifications on the remote
            # unbound port. Fix that up here by conservatively always setting a
            # notification on the local port."
            local.masked = True
            handle._deliver(local.port)
            return local.port

    def handle_notify(self, handle: EvtchnHandle, local_port: int) -> None:
        with self.lock:
            self._count("evtchn_notify")
            if local_port not in handle.ports:
                raise _err(errno.EINVAL, "evtchn_notify")
            self._evtchn_send(0, local_port)

    def handle_unbind(self, handle: EvtchnHandle, local_port: int) -> None:
        with self.lock:
            self._count("evtchn_unbind")
            if local_port not in handle.ports:
                raise _err(errno.EINVAL, "evtchn_unbind")
            self._close_port(0, local_port)

    def handle_unmask(self, handle: EvtchnHandle, local_port: int) -> None:
        with self.lock:
            p = self.domains[0].ports.get(local_port)
            if p is None or p.handle is not handle:
                raise _err(errno.EINVAL, "evtchn_unmask")
            p.masked = False

    def subscribe(self, domid: int, port: int) -> None:
        """XEN_DOMCTL_subscribe: no validation of the port, as in domctl.c."""
        with self.lock:
            self._count("evtchn_subscribe", domid)
            self._domain(domid, "evtchn_subscribe").suspend_evtchn = port

    # -- the guest side (hypercalls a simulated kernel makes) --------------

    def register_vcpu_info(self, domid: int, vcpu_id: int) -> None:
        """VCPUOP_register_vcpu_info: EINVAL if this vCPU already registered here."""
        with self.lock:
            dom = self._domain(domid, "register_vcpu_info")
            v = dom.vcpus[vcpu_id]
            if v.vcpu_info_registered:
                raise _err(errno.EINVAL, "register_vcpu_info", domid)
            v.vcpu_info_registered = True

    def vcpu_up(self, domid: int, vcpu_id: int) -> None:
        """VCPUOP_up for a secondary vCPU (after xc_domain_resume_any reset it)."""
        with self.lock:
            self._domain(domid, "vcpu_up").vcpus[vcpu_id].online = True

    def guest_set_hvm_param(self, domid: int, param: int, value: int) -> None:
        """HVMOP_set_param from inside an HVM guest (e.g. its callback vector)."""
        with self.lock:
            dom = self._domain(domid, "hvmop_set_param")
            if not dom.hvm:
                raise _err(errno.EINVAL, "hvmop_set_param", domid)
            dom.hvm_params[param] = value

    def sched_shutdown_suspend(self, domid: int, start_info_mfn: int) -> asyncio.Future[int]:
        """SCHEDOP_shutdown(SHUTDOWN_suspend): returns a future resolving to the
        hypercall's return value (eax) when the domain is resumed.

        Must be called from the simulated host's loop.
        """
        loop = asyncio.get_running_loop()
        with self.lock:
            dom = self._domain(domid, "sched_shutdown")
            fut: asyncio.Future[int] = loop.create_future()
            v0 = dom.vcpus[0]
            # The hypercall returns 0 unless a cooperative resume pokes eax.
            v0.eax = 0
            v0.edx = start_info_mfn if not dom.hvm else 0
            dom.suspend_waiter = fut
            self._domain_shutdown(dom, ShutdownReason.SUSPEND)
            if dom.shutdown_code != ShutdownReason.SUSPEND:
                # Already shut down another way: the hypercall never returns.
                dom.suspend_waiter = None
            return fut

    def sched_shutdown(self, domid: int, reason: ShutdownReason) -> None:
        """SCHEDOP_shutdown with any other reason (poweroff, reboot, crash)."""
        with self.lock:
            dom = self.domains.get(domid)
            if dom is not None:
                self._domain_shutdown(dom, int(reason))

    # -- inspection ----------------------------------------------------------

    def vcpu(self, domid: int, vcpu_id: int = 0) -> SimVcpu:
        with self.lock:
            return attrs.evolve(self._domain(domid, "vcpu").vcpus[vcpu_id])

    def domain(self, domid: int) -> SimDomain:
        with self.lock:
            return self._domain(domid, "domain")

    def memory_checksum(self, domid: int) -> str:
        """sha256 of the guest's memory (host-independent: no machine frame numbers)."""
        with self.lock:
            return hashlib.sha256(self._domain(domid, "memory_checksum").memory).hexdigest()

    # -- log-dirty (xc_shadow_control / xc_logdirty_control) ----------------

    def logdirty_enable(self, domid: int) -> None:
        """``XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY``: mark every page written from now.

        A PV guest's log-dirty runs on shadow paging; an HVM guest's on HAP (or
        shadow).  A hypervisor without them refuses with EOPNOTSUPP, as Xen
        4.17 built without shadow paging does for PV (seen in the lab).
        """
        with self.lock:
            self._count("logdirty_enable", domid)
            dom = self._domain(domid, "logdirty_enable")
            if domid == 0:
                raise _err(errno.EINVAL, "logdirty_enable", domid)
            need = {"hap", "shadow"} if dom.hvm else {"shadow"}
            if not need & self.virt_caps:
                raise _err(errno.EOPNOTSUPP, "logdirty_enable", domid)
            if dom.materialise is not None:
                dom.materialise()  # what was written before is not dirty
            dom.logdirty = set()

    def logdirty_clean(self, domid: int) -> list[int]:
        """``XEN_DOMCTL_SHADOW_OP_CLEAN``: the pfns written since the last clean,
        in order, and start again.  EINVAL when log-dirty is off."""
        with self.lock:
            self._count("logdirty_clean", domid)
            dom = self._domain(domid, "logdirty_clean")
            if dom.logdirty is None:
                raise _err(errno.EINVAL, "logdirty_clean", domid)
            if dom.materialise is not None:
                dom.materialise()
            dirty, dom.logdirty = dom.logdirty, set()
            return sorted(dirty)

    def logdirty_disable(self, domid: int) -> None:
        """``XEN_DOMCTL_SHADOW_OP_OFF``: log-dirty mode off (idempotent)."""
        with self.lock:
            self._count("logdirty_disable", domid)
            self._domain(domid, "logdirty_disable").logdirty = None

    def read_pages(self, domid: int, pfns: list[int]) -> bytes:
        """The contents of pages ``pfns`` (foreign mapping), the guest's work
        materialised up to now first."""
        with self.lock:
            dom = self._domain(domid, "read_pages")
            if dom.materialise is not None:
                dom.materialise()
            pages = len(dom.memory) // PAGE_SIZE
            out = bytearray()
            for pfn in pfns:
                if not 0 <= pfn < pages:
                    raise _err(errno.EINVAL, "read_pages", domid)
                out += dom.memory[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]
            return bytes(out)


def _settle(fut: asyncio.Future[int], value: int) -> None:
    if not fut.done():
        fut.set_result(value)


def _cancel(fut: asyncio.Future[int]) -> None:
    if not fut.done():
        fut.cancel()


class SimHypervisor:
    """:class:`torpor.hypervisor.Hypervisor` over an in-process :class:`SimXen`.

    :param lock_dir: where libxl's suspend event channel lock files go.
    """

    name = "sim"

    def __init__(self, xen: SimXen, *, lock_dir: str | None = None) -> None:
        self.xen = xen
        self.handle = xen.open_evtchn_handle()
        self.lock_dir = lock_dir

    def suspend_evtchn_lock(self, domid: int) -> Any:
        from torpor.hypervisor.xenctrl import SuspendEvtchnLock

        return SuspendEvtchnLock(domid, self.lock_dir)

    def domain_info_list(self, first_domid: int = 0, max_domains: int = 1024) -> list[DomainInfo]:
        return self.xen.domain_info_list(first_domid, max_domains)

    def domain_info(self, domid: int) -> DomainInfo:
        return self.xen.domain_info(domid)

    def pause(self, domid: int) -> None:
        self.xen.pause(domid)

    def unpause(self, domid: int) -> None:
        self.xen.unpause(domid)
        self.xen.wait_vcpus_ran()

    def shutdown(self, domid: int, reason: ShutdownReason) -> None:
        self.xen.shutdown(domid, reason)

    def resume(self, domid: int, *, fast: bool) -> None:
        self.xen.resume(domid, fast=fast)
        self.xen.wait_vcpus_ran()  # the guest's kernel reacts before we go on

    def destroy(self, domid: int) -> None:
        self.xen.destroy(domid)

    def get_hvm_param(self, domid: int, param: int) -> int:
        return self.xen.get_hvm_param(domid, param)

    def set_hvm_param(self, domid: int, param: int, value: int) -> None:
        self.xen.set_hvm_param(domid, param, value)

    def evtchn_bind_interdomain(self, domid: int, remote_port: int) -> int:
        return self.xen.bind_interdomain(self.handle, domid, remote_port)

    def evtchn_notify(self, local_port: int) -> None:
        self.xen.handle_notify(self.handle, local_port)

    def evtchn_unbind(self, local_port: int) -> None:
        self.xen.handle_unbind(self.handle, local_port)

    def evtchn_subscribe(self, domid: int, port: int) -> None:
        self.xen.subscribe(domid, port)

    def evtchn_fileno(self) -> int:
        return self.handle.fileno()

    def evtchn_pending(self) -> int | None:
        return self.handle.pending()

    def evtchn_unmask(self, local_port: int) -> None:
        self.xen.handle_unmask(self.handle, local_port)

    def virt_caps(self) -> frozenset[str]:
        return self.xen.virt_caps

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()

"""The protocol facts (docs/protocol.md, docs/real-xen.md) one by one, on the
simulated host, driven by hand.

No orchestrator: these tests write ``control/shutdown`` with torpor's xenstore
adapter, watch ``@releaseDomain``, and call the hypervisor through
``SimHost.hypervisor()`` and, where marked ``hv``, through the host's
``hypervisor.sock`` as another process would (RemoteHypervisor).  Each test
names the fact and the source that defines it; a simulator that drifts from
Xen, Linux or libxl fails here.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from typing import Any

import pytest

from torpor.errors import HypervisorError, Timeout, XenstoreError
from torpor.model import HVM_PARAM_ACPI_S_STATE, HVM_PARAM_CALLBACK_IRQ, ShutdownReason
from torpor.qmp import GuestAgent, QmpClient
from torpor.xenstore import Xenstore
from torpor_sim import hvm_image as img
from torpor_sim.guest import CALLBACK_VIA_VECTOR, Behaviour, XenbusState
from torpor_sim.host import SimHost
from torpor_sim.xen import START_INFO_PFN
from torpor_sim.xenstored import RingClient

from .dm_fixtures import arun
from .facts_fixtures import (
    QUIET,
    STEP,
    DomainEvents,
    ReleaseDomain,
    booted,
    control_shutdown,
    drain,
    hv,
    hvm_host,
    in_host,
    is_suspended,
    latched,
    no_port,
    on_host,
    release,
    report,
    request,
    shut_down_with,
    suspend_by_hand,
    ticks_go_on,
    wait_ack,
    wait_port,
    xs,
)

__all__ = ["hv", "hvm_host", "release", "xs"]  # fixtures, imported for pytest

PV_KINDS = ["pv", "pvhvm"]


# ---------------------------------------------------------------------------
# @releaseDomain: fired once per shutdown, re-armed only by XS_RESUME
# (tools/xenstored/xenstored_domain.c check_domain(), do_resume(); real-xen.md)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PV_KINDS)
def test_release_domain_latch_rearmed_only_by_xs_resume(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any, kind: str
) -> None:
    dom = sim_host.create_guest(kind)
    events = DomainEvents(sim_host, dom)
    assert not latched(sim_host, dom)

    # 1st suspend: noticed, @releaseDomain fires once, the latch is set.
    suspend_by_hand(xs, release, hv, dom)
    assert latched(sim_host, dom)

    # Resume without XS_RESUME; the guest runs on.
    hv.resume(dom, fast=True)
    drain(sim_host)
    assert report(sim_host, dom)["state"] == "running"

    # 2nd suspend: the domain does shut down with reason suspend, but xenstored,
    # still latched, says nothing -- a toolstack waiting on @releaseDomain hangs.
    seen = release.fence()
    mark = len(events.seen)
    request(xs, dom)
    wait_ack(xs, dom)
    events.wait("shutdown", after=mark)
    assert is_suspended(hv.domain_info(dom))
    assert release.fence() == seen, "@releaseDomain fired for a latched domain"
    assert latched(sim_host, dom)

    hv.resume(dom, fast=True)
    frozen = report(sim_host, dom)["counters"]["ticks"]
    ticks_go_on(sim_host, dom, frozen)  # the guest has been running a while
    # A late XS_RESUME (the guest long running, two suspends since) re-arms it.
    xs.resume(dom)
    assert not latched(sim_host, dom)
    assert release.fence() == seen  # XS_RESUME itself fires nothing

    # 3rd suspend: noticed again.
    suspend_by_hand(xs, release, hv, dom)
    hv.resume(dom, fast=True)
    xs.resume(dom)
    drain(sim_host)
    counters = report(sim_host, dom)["counters"]
    assert counters["boots"] == 1 and counters["cooperative_resumes"] == 3
    assert counters["suspends"] == 3


def test_an_early_xs_resume_lets_the_next_virq_notice_the_same_suspend_again(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any
) -> None:
    """XS_RESUME only clears the latch; check_domains() runs on every VIRQ_DOM_EXC and
    latches any domain it finds shut down: sent while the domain is still suspended,
    the next exception of *any* domain fires @releaseDomain for it once more."""
    dom = sim_host.create_guest("pv")
    other = sim_host.create_guest("pv")
    suspend_by_hand(xs, release, hv, dom)
    xs.resume(dom)  # too early: the domain is still shut down
    assert not latched(sim_host, dom)
    seen = release.fence()
    hv.destroy(other)  # some other domain's exception
    release.wait_beyond(seen)
    assert latched(sim_host, dom)  # noticed again, though nothing happened to it
    assert is_suspended(hv.domain_info(dom))
    hv.resume(dom, fast=True)
    xs.resume(dom)


def test_xs_resume_needs_a_guest_domain(sim_host: SimHost, xs: Xenstore) -> None:
    with pytest.raises(XenstoreError) as e:
        xs.resume(0)  # onearg_domain(): dom0 is EINVAL
    assert e.value.errno == errno.EINVAL
    with pytest.raises(XenstoreError) as e:
        xs.resume(99)  # not introduced
    assert e.value.errno == errno.ENOENT


# ---------------------------------------------------------------------------
# xc_domain_resume(fast=1): the EINVAL guard (tools/libs/guest/xg_resume.c,
# modify_returncode(): "Dom %d not suspended")
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PV_KINDS)
def test_cooperative_resume_of_a_running_domain_is_einval_and_touches_nothing(
    sim_host: SimHost, hv: Any, kind: str
) -> None:
    dom = sim_host.create_guest(kind)
    booted(sim_host, dom)
    # Paused, so that its work stands still and any change would be ours.
    hv.pause(dom)
    before = report(sim_host, dom)
    regs = sim_host.xen.vcpu(dom, 0)
    with pytest.raises(HypervisorError) as e:
        hv.resume(dom, fast=True)
    assert e.value.errno == errno.EINVAL and e.value.errname == "EINVAL"
    drain(sim_host)
    after = report(sim_host, dom)
    assert after["counters"] == before["counters"]
    assert after["checksum"] == before["checksum"]  # memory and registers
    assert after["log"] == before["log"]
    assert sim_host.xen.vcpu(dom, 0) == regs  # eax not poked
    info = hv.domain_info(dom)
    assert info.paused and not info.shutdown  # still paused: no resumedomain either
    hv.unpause(dom)

    # Running: the same refusal, eax still 0, the guest never saw a resume.
    with pytest.raises(HypervisorError) as e:
        hv.resume(dom, fast=True)
    assert e.value.errno == errno.EINVAL
    assert sim_host.xen.vcpu(dom, 0).eax == 0
    r = report(sim_host, dom)
    assert r["last_hypercall_return"] is None
    assert r["counters"]["cooperative_resumes"] == 0 and r["counters"]["boots"] == 1


@pytest.mark.parametrize("fast", [True, False], ids=["fast1", "fast0"])
def test_resume_of_a_nonexistent_domain_is_esrch(sim_host: SimHost, hv: Any, fast: bool) -> None:
    with pytest.raises(HypervisorError) as e:
        hv.resume(42, fast=fast)
    assert e.value.errno == errno.ESRCH


# ---------------------------------------------------------------------------
# The suspend hypercall's return value (eax): 1 = cancelled, 0 = new domain
# (xg_resume.c modify_returncode; drivers/xen/manage.c do_suspend)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PV_KINDS)
def test_cooperative_resume_returns_1_and_the_guest_reuses_everything(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any, kind: str
) -> None:
    dom = sim_host.create_guest(kind)
    suspend_by_hand(xs, release, hv, dom)
    assert sim_host.xen.vcpu(dom, 0).eax == 0  # SCHEDOP_shutdown returns 0 unless poked
    frozen = report(sim_host, dom)
    hv.resume(dom, fast=True)
    assert sim_host.xen.vcpu(dom, 0).eax == 1
    xs.resume(dom)
    drain(sim_host)
    r = report(sim_host, dom)
    assert r["last_hypercall_return"] == 1
    log = r["log"]
    assert "suspend hypercall returned 1" in log and "xs_suspend_cancel" in log
    # Cancelled: nothing rebuilt -- no vcpu_info re-registration, no reconnect.
    tail = log[log.index("suspend hypercall returned 1") :]
    assert "xen_vcpu_restore" not in tail and "xs_resume" not in tail
    assert r["checksum_at_resume"] == frozen["checksum"]  # memory as it was frozen
    assert r["counters"]["cooperative_resumes"] == 1 and r["counters"]["boots"] == 1
    assert hv.domain_info(dom).running
    ticks_go_on(sim_host, dom, frozen["counters"]["ticks"])
    if kind == "pvhvm":
        assert hv.get_hvm_param(dom, HVM_PARAM_CALLBACK_IRQ) == CALLBACK_VIA_VECTOR


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("pv", ShutdownReason.CRASH), ("pvhvm", ShutdownReason.REBOOT)],
)
def test_fast0_in_the_same_domain_returns_0_and_register_vcpu_info_fails(
    sim_host: SimHost,
    xs: Xenstore,
    release: ReleaseDomain,
    hv: Any,
    kind: str,
    reason: ShutdownReason,
) -> None:
    """real-xen.md: PV stays shut down with reason crash, PVHVM reboots (reason 1)."""
    dom = sim_host.create_guest(kind)
    suspend_by_hand(xs, release, hv, dom)
    seen = release.fence()
    # Held paused across the resume: libxl's order (resume, then XS_RESUME) would
    # otherwise race the guest's panic, and a panic before XS_RESUME goes unnoticed.
    hv.pause(dom)
    hv.resume(dom, fast=False)
    assert sim_host.xen.vcpu(dom, 0).eax == 0
    xs.resume(dom)  # re-arm, so the panic's shutdown is noticed
    hv.unpause(dom)
    release.wait_beyond(seen)  # the panic's shutdown is noticed ...
    assert hv.domain_info(dom).shutdown_reason == reason  # ... with this reason
    assert release.fence() == seen + 1
    r = report(sim_host, dom)
    assert r["last_hypercall_return"] == 0
    log = r["log"]
    returned = log.index("suspend hypercall returned 0")
    panic = log.index("panic: register_vcpu_info failed: err=-22")
    assert returned < panic
    # It believed it woke in a new domain and started rebuilding.
    expected = ["xen_vcpu_restore"] if kind == "pv" else ["xen_hvm_init_shared_info"]
    assert [s for s in log[returned:panic] if s in expected] == expected
    assert r["state"] == ("crashed" if kind == "pv" else "rebooted")
    # And the fast=1 guard now refuses: the reason is not suspend.
    with pytest.raises(HypervisorError) as e:
        hv.resume(dom, fast=True)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("pv", ShutdownReason.CRASH), ("pvhvm", ShutdownReason.REBOOT)],
)
def test_fast0_panic_comes_before_xs_resume_and_fires_no_release_domain(
    sim_host: SimHost,
    xs: Xenstore,
    release: ReleaseDomain,
    hv: Any,
    kind: str,
    reason: ShutdownReason,
) -> None:
    """Seen in the lab (tests/xen/test_sim_vs_real.py): in libxl's order, resume then
    XS_RESUME, a Linux guest resumed with fast=0 in the same domain panics at once --
    before XS_RESUME reaches xenstored, whose latch is still set from the suspend --
    so its shutdown fires no @releaseDomain, then or after.  A toolstack must read
    the domain's state after XS_RESUME; waiting for the event would wait forever."""
    dom = sim_host.create_guest(kind)
    suspend_by_hand(xs, release, hv, dom)
    seen = release.fence()
    hv.resume(dom, fast=False)
    # Already shut down when xc_domain_resume returns: the vCPU ran first.
    assert hv.domain_info(dom).shutdown_reason == reason
    xs.resume(dom)
    assert not latched(sim_host, dom)
    drain(sim_host)
    assert release.fence() == seen, "@releaseDomain fired for a shutdown xenstored had latched"
    assert "panic: register_vcpu_info failed: err=-22" in report(sim_host, dom)["log"]


@pytest.mark.parametrize(
    ("kind", "eax_after"),
    [("hvm", 0x5A5A), ("pvhvm", 1)],
    ids=["hvm-callback-0", "pvhvm-callback-set"],
)
def test_hard_suspend_resume_pokes_eax_only_with_a_callback_irq(
    sim_host: SimHost,
    xs: Xenstore,
    release: ReleaseDomain,
    hv: Any,
    kind: str,
    eax_after: int,
) -> None:
    """modify_returncode(): "HVM guests without PV drivers have no return code to modify"."""
    dom = sim_host.create_guest(kind)
    callback = hv.get_hvm_param(dom, HVM_PARAM_CALLBACK_IRQ)
    assert (callback == 0) == (kind == "hvm")
    with sim_host.xen.lock:
        sim_host.xen.domain(dom).vcpus[0].eax = 0x5A5A  # whatever the guest had there
    seen = release.fence()
    hv.shutdown(dom, ShutdownReason.SUSPEND)  # xc_domain_shutdown: no ack expected
    release.wait_beyond(seen)
    assert is_suspended(hv.domain_info(dom))
    hv.resume(dom, fast=True)
    assert sim_host.xen.vcpu(dom, 0).eax == eax_after
    xs.resume(dom)
    assert hv.domain_info(dom).running


# ---------------------------------------------------------------------------
# PV start_info: MFN -> PFN by the guest before SCHEDOP_shutdown, PFN -> MFN by
# the guest on return 1 (xen_pv_pre/post_suspend, arch/x86/xen/suspend_pv.c)
# or by the toolstack (xc_domain_resume_any) on fast=0.
# ---------------------------------------------------------------------------


def test_pv_start_info_frames_rewritten_both_ways(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any
) -> None:
    dom = sim_host.create_guest("pv")
    d = sim_host.xen.domain(dom)
    si = d.start_info
    assert si is not None
    store_mfn, console_mfn = d.p2m[1], d.p2m[2]
    assert (si.store_mfn, si.console_mfn, si.frames_are_pfns) == (store_mfn, console_mfn, False)
    assert sim_host.xen.store_mfn(dom) == store_mfn  # what XS_INTRODUCE was given

    suspend_by_hand(xs, release, hv, dom)
    # The guest rewrote them as PFNs and passed start_info's MFN in edx.
    assert (si.store_mfn, si.console_mfn, si.frames_are_pfns) == (1, 2, True)
    assert sim_host.xen.vcpu(dom, 0).edx == d.start_info_mfn == d.p2m[START_INFO_PFN]

    # fast=1: libxc only pokes eax; the *guest* rewrites the frames back once it
    # runs.  Held paused, it has not run yet: still PFNs.
    hv.pause(dom)
    hv.resume(dom, fast=True)
    drain(sim_host)
    assert si.frames_are_pfns and (si.store_mfn, si.console_mfn) == (1, 2)
    assert report(sim_host, dom)["last_hypercall_return"] is None  # still in the hypercall
    hv.unpause(dom)
    xs.resume(dom)
    drain(sim_host)
    assert report(sim_host, dom)["last_hypercall_return"] == 1
    assert (si.store_mfn, si.console_mfn, si.frames_are_pfns) == (store_mfn, console_mfn, False)

    # fast=0: xc_domain_resume_any maps start_info through edx and writes the
    # MFNs itself (p2m[pfn]), and resets vCPUs 1..n -- before the guest runs.
    suspend_by_hand(xs, release, hv, dom)
    assert si.frames_are_pfns
    hv.pause(dom)
    hv.resume(dom, fast=False)
    drain(sim_host)
    assert (si.store_mfn, si.console_mfn, si.frames_are_pfns) == (store_mfn, console_mfn, False)
    assert [v.online for v in d.vcpus] == [True, False]
    assert report(sim_host, dom)["log"].count("suspend hypercall returned 1") == 1  # not run
    xs.resume(dom)
    hv.unpause(dom)  # and now it runs, believes it is in a new domain, and panics
    release.wait_domain(hv, dom, shut_down_with(ShutdownReason.CRASH))


def test_hvm_domains_have_no_start_info(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pvhvm")
    assert sim_host.xen.domain(dom).start_info is None


# ---------------------------------------------------------------------------
# XEN_DOMCTL_subscribe (xen/common/domctl.c; domain.c __domain_finalise_shutdown)
# and the bind-time notification (xen/common/event_channel.c
# evtchn_bind_interdomain: "conservatively always setting a notification")
# ---------------------------------------------------------------------------


def suspend_port(xs: Xenstore, dom: int) -> int:
    return int(xs.read(f"/local/domain/{dom}/device/suspend/event-channel"))


def test_a_freshly_bound_port_is_pending_at_once(sim_host: SimHost, xs: Xenstore, hv: Any) -> None:
    dom = sim_host.create_guest("pv", behaviour=Behaviour(suspend_evtchn=True))
    guest_port = suspend_port(xs, dom)
    local = hv.evtchn_bind_interdomain(dom, guest_port)
    # Nobody sent anything, yet the new local port is pending.
    assert wait_port(hv) == local
    # Delivered once; it stays masked until unmasked, as the evtchn device does.
    sim_host.xen.evtchn_send(dom, guest_port)
    drain(sim_host)
    assert hv.evtchn_pending() is None
    hv.evtchn_unmask(local)
    sim_host.xen.evtchn_send(dom, guest_port)
    assert wait_port(hv) == local
    # A port can be bound once: it is interdomain now.
    with pytest.raises(HypervisorError) as e:
        hv.evtchn_bind_interdomain(dom, guest_port)
    assert e.value.errno == errno.EINVAL
    hv.evtchn_unbind(local)
    # Unbound again on the guest's side: it can be bound anew.
    again = hv.evtchn_bind_interdomain(dom, guest_port)
    assert wait_port(hv) == again
    hv.evtchn_unbind(again)


def test_subscribed_channel_is_signalled_instead_of_virq_dom_exc(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any
) -> None:
    dom = sim_host.create_guest("pv", behaviour=Behaviour(suspend_evtchn=True))
    guest_port = suspend_port(xs, dom)
    with hv.suspend_evtchn_lock(dom):
        local = hv.evtchn_bind_interdomain(dom, guest_port)
        assert wait_port(hv) == local  # the bind-time notification
        hv.evtchn_unmask(local)
        hv.evtchn_subscribe(dom, guest_port)
        seen = release.fence()
        hv.evtchn_notify(local)  # the request; the guest sends no ack
        assert wait_port(hv) == local  # ... Xen signals the channel
        assert is_suspended(hv.domain_info(dom))
        assert release.fence() == seen, "VIRQ_DOM_EXC was raised for a subscribed domain"
        assert not latched(sim_host, dom)
        assert xs.read(f"/local/domain/{dom}/control/shutdown") == ""  # never written
        hv.evtchn_unmask(local)
        hv.resume(dom, fast=True)
        hv.evtchn_subscribe(dom, 0)
        hv.evtchn_unbind(local)
    drain(sim_host)
    r = report(sim_host, dom)
    assert r["last_hypercall_return"] == 1 and r["counters"]["cooperative_resumes"] == 1


def test_last_subscriber_wins_silently_and_port_0_unsubscribes(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any
) -> None:
    """One subscriber per domain: a second XEN_DOMCTL_subscribe displaces the first
    without telling it; the event goes to the port subscribed last."""
    dom = sim_host.create_guest("pv", behaviour=Behaviour(suspend_evtchn=True))
    booted(sim_host, dom)
    first = sim_host.hypervisor()  # toolstack A, in process
    try:
        guest_port = suspend_port(xs, dom)
        a_local = first.evtchn_bind_interdomain(dom, guest_port)
        assert wait_port(first) == a_local
        first.evtchn_unmask(a_local)
        first.evtchn_subscribe(dom, guest_port)
        # Toolstack B (``hv``) subscribes another channel the guest offered dom0
        # (its netfront's): accepted, and A is not told.
        other = int(xs.read(f"/local/domain/{dom}/device/vif/0/event-channel"))
        b_local = hv.evtchn_bind_interdomain(dom, other)
        assert wait_port(hv) == b_local
        hv.evtchn_unmask(b_local)
        hv.evtchn_subscribe(dom, other)
        assert sim_host.xen.domain(dom).suspend_evtchn == other

        seen = release.fence()
        first.evtchn_notify(a_local)  # A asks the guest to suspend
        assert wait_port(hv) == b_local  # ... and B is signalled
        assert is_suspended(hv.domain_info(dom))
        no_port(first)
        assert release.fence() == seen
        hv.resume(dom, fast=True)

        # Port 0 unsubscribes: the next suspend raises VIRQ_DOM_EXC again.
        hv.evtchn_subscribe(dom, 0)
        drain(sim_host)
        seen = release.fence()
        first.evtchn_notify(a_local)
        release.wait_domain(hv, dom, is_suspended)
        assert release.fence() == seen + 1
        no_port(first)
        hv.resume(dom, fast=True)
        xs.resume(dom)
        hv.evtchn_unbind(b_local)
        first.evtchn_unbind(a_local)
    finally:
        first.close()


# ---------------------------------------------------------------------------
# Frontends: xenbus states (xen/include/public/io/xenbus.h; Linux netfront,
# blkfront, xen-netback, xen-blkback)
# ---------------------------------------------------------------------------


class StateRecorder:
    """Every value written to a xenbus ``state`` node, in the order written.

    A dom0 ring inside the host's loop: each watch event is handled before
    any request caused by it can be processed, so the value read at the event
    is the value that was written.
    """

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.writes: list[tuple[str, int]] = []

    async def start(self) -> None:
        assert self.host.xenstored is not None
        self.ring = RingClient(self.host.xenstored.connect(0, self._on_event))
        await self.ring.watch("/local/domain", "states")

    def _on_event(self, path: str, _token: str) -> None:
        if not path.endswith("/state") or not ("/device/" in path or "/backend/" in path):
            return
        assert self.host.xenstored is not None
        node = self.host.xenstored.tree_snapshot().get(path)
        if node is not None:
            self.writes.append((path, int(node.value or b"0")))

    def sequence(self, path: str) -> list[int]:
        out: list[int] = []
        for p, v in self.writes:
            if p == path and (not out or out[-1] != v):
                out.append(v)
        return out

    def first(self, path: str, values: set[int]) -> int:
        return next(i for i, (p, v) in enumerate(self.writes) if p == path and v in values)


def dev_paths(dom: int, kind: str, devid: int) -> tuple[str, str]:
    return (
        f"/local/domain/{dom}/device/{kind}/{devid}",
        f"/local/domain/0/backend/{kind}/{dom}/{devid}",
    )


def wait_state(xs: Xenstore, path: str, state: int) -> None:
    xs.wait(f"{path}/state", lambda v: v == str(state), timeout=STEP, what=f"{path} = {state}")


@pytest.mark.parametrize("kind", PV_KINDS)
def test_frontends_negotiate_with_their_backends_at_boot(
    sim_host: SimHost, xs: Xenstore, kind: str
) -> None:
    rec = StateRecorder(sim_host)
    on_host(sim_host, rec.start())
    dom = sim_host.create_guest(kind)
    ini, wait, inited, conn = (
        XenbusState.INITIALISING,
        XenbusState.INIT_WAIT,
        XenbusState.INITIALISED,
        XenbusState.CONNECTED,
    )
    for devkind, devid in (("vif", 0), ("vbd", 51712)):
        fe, be = dev_paths(dom, devkind, devid)
        wait_state(xs, fe, conn)
        wait_state(xs, be, conn)
        drain(sim_host)
        assert rec.sequence(f"{be}/state") == [ini, wait, conn]
        # netfront goes straight to Connected; blkfront through Initialised.
        assert rec.sequence(f"{fe}/state") == (
            [ini, conn] if devkind == "vif" else [ini, inited, conn]
        )
        # The frontend leaves Initialising only once the backend is in InitWait,
        # and the backend connects only once the frontend published its rings.
        assert rec.first(f"{fe}/state", {inited, conn}) > rec.first(f"{be}/state", {wait})
        assert rec.first(f"{be}/state", {conn}) > rec.first(f"{fe}/state", {inited, conn})
        if devkind == "vbd":
            assert rec.first(f"{fe}/state", {conn}) > rec.first(f"{be}/state", {conn})
        rings = ["tx-ring-ref", "rx-ring-ref"] if devkind == "vif" else ["ring-ref"]
        for node in [*rings, "event-channel"]:
            assert xs.read(f"{fe}/{node}").isdigit()
        assert sim_host.backends.connects[be] == 1
    assert report(sim_host, dom)["frontends"] == {"vif/0": conn, "vbd/51712": conn}


class BackendHandled:
    """Set each time dom0's backend driver has handled a change of ``device``'s frontend."""

    def __init__(self, host: SimHost, device: str) -> None:
        self.backends = host.backends
        self.device = device
        self.event = threading.Event()
        self._real = self.backends._frontend_changed

    async def _changed(self, device: str) -> None:
        try:
            await self._real(device)
        finally:
            if device == self.device:
                self.event.set()

    def __enter__(self) -> BackendHandled:
        self.backends._frontend_changed = self._changed  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.backends._frontend_changed

    def wait(self) -> None:
        assert self.event.wait(STEP), "the backend driver never handled the change"
        self.event.clear()


def reconnect_as_the_guest(guest: Xenstore, xs: Xenstore, devkind: str, be: str) -> None:
    """A frontend's connect, by hand: rings and event channel, then its states."""
    rel = f"device/{devkind}/{be.rsplit('/', 1)[1]}"
    tx = guest.transaction_start()
    for node in ["tx-ring-ref", "rx-ring-ref"] if devkind == "vif" else ["ring-ref"]:
        guest.write(f"{rel}/{node}", "4242", tx=tx)
    guest.write(f"{rel}/event-channel", "9", tx=tx)
    assert guest.transaction_end(tx, commit=True)
    if devkind == "vbd":  # blkfront: Initialised, and Connected once blkback is
        guest.write(f"{rel}/state", str(XenbusState.INITIALISED))
        wait_state(xs, be, XenbusState.CONNECTED)
    guest.write(f"{rel}/state", str(XenbusState.CONNECTED))
    wait_state(xs, be, XenbusState.CONNECTED)


def test_netfront_restarting_at_initialising_makes_netback_start_over(
    sim_host: SimHost, xs: Xenstore
) -> None:
    """xen-netback frontend_changed(Initialising) -> set_backend_state(InitWait),
    which walks Connected -> Closing -> Closed -> InitWait."""
    dom = sim_host.create_guest("pv")
    booted(sim_host, dom)
    _, be = dev_paths(dom, "vif", 0)
    rec = StateRecorder(sim_host)
    on_host(sim_host, rec.start())
    # As the guest, over its own xenstore connection (paths relative to its home).
    with Xenstore(sim_host.guest_xenstore_socket(dom), timeout=STEP) as guest:
        assert guest.read("device/vif/0/backend") == be
        guest.write("device/vif/0/state", str(XenbusState.INITIALISING))
        wait_state(xs, be, XenbusState.INIT_WAIT)
        reconnect_as_the_guest(guest, xs, "vif", be)
        # A guest cannot touch dom0's side.
        with pytest.raises(XenstoreError) as e:
            guest.write(f"{be}/state", "1")
        assert e.value.errno == errno.EACCES
    drain(sim_host)
    s = XenbusState
    assert rec.sequence(f"{be}/state") == [s.CLOSING, s.CLOSED, s.INIT_WAIT, s.CONNECTED]
    assert sim_host.backends.connects[be] == 2


def test_blkfront_must_close_before_blkback_starts_over(sim_host: SimHost, xs: Xenstore) -> None:
    """xen-blkback frontend_changed(): Initialising moves it only from Closed ("prepare
    for reconnect"); a frontend reconnects by closing first."""
    dom = sim_host.create_guest("pv")
    booted(sim_host, dom)
    _, be = dev_paths(dom, "vbd", 51712)
    rel = "device/vbd/51712"
    rec = StateRecorder(sim_host)
    on_host(sim_host, rec.start())
    with (
        Xenstore(sim_host.guest_xenstore_socket(dom), timeout=STEP) as guest,
        BackendHandled(sim_host, be) as handled,
    ):
        guest.write(f"{rel}/state", str(XenbusState.INITIALISING))
        handled.wait()
        assert xs.read(f"{be}/state") == str(XenbusState.CONNECTED)  # not while Connected
        for state in (XenbusState.CLOSING, XenbusState.CLOSED):
            guest.write(f"{rel}/state", str(state))
            wait_state(xs, be, state)
        guest.write(f"{rel}/state", str(XenbusState.INITIALISING))
        wait_state(xs, be, XenbusState.INIT_WAIT)
        reconnect_as_the_guest(guest, xs, "vbd", be)
    drain(sim_host)
    s = XenbusState
    assert rec.sequence(f"{be}/state") == [s.CLOSING, s.CLOSED, s.INIT_WAIT, s.CONNECTED]
    assert sim_host.backends.connects[be] == 2


class _RemovedUnderfoot:
    """dom0's backend connection, with the toolstack removing ``device`` right
    after the driver has read its state: the interleaving of a device teardown
    racing a state switch, made to happen every time."""

    def __init__(self, inner: Any, device: str) -> None:
        self.inner = inner
        self.device = device
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read(self, path: str, tx: int = 0) -> str:
        value: str = await self.inner.read(path, tx)
        if path == f"{self.device}/state" and not self.fired:
            self.fired = True
            await self.inner.rm(self.device)  # libxl__device_destroy, right now
        return value


def test_a_backend_never_resurrects_a_removed_device(sim_host: SimHost, xs: Xenstore) -> None:
    """xenbus_switch_state() (drivers/xen/xenbus/xenbus_client.c) writes the new
    state in a transaction, and not at all once the node is gone: "we don't want
    to resurrect that directory"."""
    dom = sim_host.create_guest("pv")
    booted(sim_host, dom)
    fe, be = dev_paths(dom, "vif", 0)
    backends = sim_host.backends
    racing = _RemovedUnderfoot(backends.xs, be)
    backends.xs = racing
    try:
        with BackendHandled(sim_host, be) as handled:
            # The frontend starts over: netback would walk back towards InitWait ...
            xs.write(f"{fe}/state", str(XenbusState.INITIALISING))
            handled.wait()
    finally:
        backends.xs = racing.inner
    assert racing.fired
    # ... but the toolstack removed the device meanwhile: it stays removed.
    assert not xs.exists(be)
    assert xs.read_or(f"/local/domain/0/backend/vif/{dom}/0/state", None) is None


# ---------------------------------------------------------------------------
# The guest kernel runs only while its domain runs, one watch callback at a time
# ---------------------------------------------------------------------------


def test_a_command_written_during_a_suspend_is_handled_after_the_resume(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any
) -> None:
    """Linux's xenwatch thread runs shutdown_handler() -- and do_suspend() inside
    it -- one event at a time: a command that arrives meanwhile waits its turn."""
    dom = sim_host.create_guest("pv", behaviour=Behaviour(freeze_time=0.2))
    request(xs, dom)
    wait_ack(xs, dom)
    request(xs, dom, "poweroff")  # while the guest freezes its tasks
    release.wait_domain(hv, dom, is_suspended)
    assert xs.read(control_shutdown(dom)) == "poweroff"  # not seen yet
    hv.resume(dom, fast=True)
    xs.resume(dom)
    wait_ack(xs, dom, "poweroff")
    release.wait_domain(hv, dom, shut_down_with(ShutdownReason.POWEROFF))
    log = report(sim_host, dom)["log"]
    assert log.index("acked poweroff") > log.index("xs_suspend_cancel")


def test_a_paused_guest_does_not_negotiate_its_frontends(
    sim_host: SimHost, xs: Xenstore, hv: Any
) -> None:
    """A paused domain runs no kernel code: its frontends move on only once it runs."""
    xen = sim_host.xen
    real_create = xen.create_domain

    def create_domain(**kw: Any) -> Any:
        dom = real_create(**kw)

        def pause_once_unpaused(what: str) -> None:
            # The toolstack pauses the guest again as soon as it first runs.
            if what == "unpaused" and pause_once_unpaused in dom.listeners:
                dom.listeners.remove(pause_once_unpaused)
                xen.pause(dom.domid)

        dom.listeners.append(pause_once_unpaused)
        return dom

    xen.create_domain = create_domain  # type: ignore[method-assign]
    try:
        dom = sim_host.create_guest("pv")
    finally:
        del xen.create_domain
    assert hv.domain_info(dom).paused
    fe, be = dev_paths(dom, "vif", 0)
    assert xs.read(f"{be}/state") == str(XenbusState.INIT_WAIT)  # libxl waited for it
    with pytest.raises(Timeout):
        xs.wait(f"{fe}/state", lambda v: v != str(XenbusState.INITIALISING), timeout=QUIET)
    assert not xs.exists(f"{fe}/event-channel")
    hv.unpause(dom)
    wait_state(xs, fe, XenbusState.CONNECTED)
    wait_state(xs, be, XenbusState.CONNECTED)


# ---------------------------------------------------------------------------
# HVM: ACPI S3 through the guest agent and QMP; the hard path stops QEMU's vCPUs
# (real-xen.md "Plain HVM"; libxl_dom_suspend.c; hvm.py)
# ---------------------------------------------------------------------------


def test_hard_suspend_of_a_guest_already_in_s3(hvm_host: SimHost) -> None:
    """docs/protocol.md: a guest already asleep is suspended the hard way.  It is a real
    shutdown (noticed); QEMU, asleep, has no vCPUs to stop; the resumed domain is
    still in S3 until QMP system_wakeup, and then wakes where it was."""
    host = hvm_host
    dom = host.create_guest("hvm")
    dm = host.device_models[dom]
    hv_ = host.hypervisor()
    xs_ = Xenstore(host.xenstore_socket, timeout=STEP).connect()
    rel = ReleaseDomain(xs_)

    async def body() -> None:
        qmp = await QmpClient.open(host.qmp_socket(dom), domid=dom, timeout=STEP)
        agent = GuestAgent(domid=dom)
        try:
            await agent.connect(f"{host.dir}/qmp/qga-{dom}", timeout=STEP)
            await agent.sync(timeout=STEP)
            mark = qmp.event_mark()
            await agent.suspend_ram(
                qmp.wait_event("SUSPEND", since=mark, timeout=STEP), timeout=STEP
            )
            await in_host(host, dm.wait_run_state({"suspended"}, timeout=STEP))
            assert hv_.get_hvm_param(dom, HVM_PARAM_ACPI_S_STATE) == 3
            seen = rel.fence()
            hv_.shutdown(dom, ShutdownReason.SUSPEND)
            await asyncio.to_thread(rel.wait_domain, hv_, dom, is_suspended)
            assert rel.fence() == seen + 1
            assert await qmp.query_status() == "suspended"
            hv_.resume(dom, fast=True)
            xs_.resume(dom)
            info = hv_.domain_info(dom)
            assert not info.shutdown and not info.paused
            assert hv_.get_hvm_param(dom, HVM_PARAM_ACPI_S_STATE) == 3  # still asleep
            assert await qmp.query_status() == "suspended"
            mark, line = qmp.event_mark(), dm.serial_mark()
            await qmp.system_wakeup()
            await qmp.wait_event("WAKEUP", since=mark, timeout=STEP)
            await in_host(host, dm.wait_serial(img.LINE_RESUME, since=line, timeout=STEP))
            assert hv_.get_hvm_param(dom, HVM_PARAM_ACPI_S_STATE) == 0
            assert [e.name for e in qmp.events_since(mark)] == ["WAKEUP"]  # no RESET
            c = dm.read_counters()
            assert (c.boots, c.resumes) == (1, 1)
            assert hv_.domain_info(dom).running
        finally:
            await agent.close()
            await qmp.close()

    try:
        arun(body())
    finally:
        rel.close()
        xs_.close()
        hv_.close()


def test_s3_cycle_and_hard_suspend_of_an_hvm_guest(hvm_host: SimHost) -> None:
    host = hvm_host
    dom = host.create_guest("hvm")
    dm = host.device_models[dom]
    hv_ = host.hypervisor()
    xs_ = Xenstore(host.xenstore_socket, timeout=STEP).connect()
    rel = ReleaseDomain(xs_)

    async def body() -> None:
        assert hv_.get_hvm_param(dom, HVM_PARAM_CALLBACK_IRQ) == 0  # plain HVM
        qmp = await QmpClient.open(host.qmp_socket(dom), domid=dom, timeout=STEP)
        agent = GuestAgent(domid=dom)
        try:
            await agent.connect(f"{host.dir}/qmp/qga-{dom}", timeout=STEP)
            await agent.sync(timeout=STEP)
            before = dm.read_counters()
            assert before.boots == 1

            # guest-suspend-ram: no reply on success; QMP SUSPEND shows it.
            seen = rel.fence()
            mark = qmp.event_mark()
            await agent.suspend_ram(
                qmp.wait_event("SUSPEND", since=mark, timeout=STEP), timeout=STEP
            )
            await in_host(host, dm.wait_run_state({"suspended"}, timeout=STEP))
            assert hv_.get_hvm_param(dom, HVM_PARAM_ACPI_S_STATE) == 3
            info = hv_.domain_info(dom)
            assert not info.paused and not info.shutdown  # neither paused nor shut down
            assert await qmp.query_status() == "suspended"
            assert rel.fence() == seen, "@releaseDomain fired for a guest in S3"
            assert not latched(host, dom)
            asleep = dm.read_counters()
            assert asleep.s3_entries == 1

            # Wake it: system_wakeup -> WAKEUP; ACPI_S_STATE back to 0; resumed, not rebooted.
            assert await qmp.wakeup_supported()
            mark, line = qmp.event_mark(), dm.serial_mark()
            await qmp.system_wakeup()
            await qmp.wait_event("WAKEUP", since=mark, timeout=STEP)
            await in_host(host, dm.wait_serial(img.LINE_RESUME, since=line, timeout=STEP))
            assert hv_.get_hvm_param(dom, HVM_PARAM_ACPI_S_STATE) == 0
            await asyncio.sleep(0.1)  # measuring a rate: 100 Hz
            awake = dm.read_counters()
            assert awake.boots == 1 and awake.resumes == 1
            assert awake.ticks > asleep.ticks  # the counter went on from where it was
            assert hv_.domain_info(dom).running

            # The hard path: xc_domain_shutdown(SHUTDOWN_suspend) stops QEMU's vCPUs...
            seen = rel.fence()
            mark = qmp.event_mark()
            hv_.shutdown(dom, ShutdownReason.SUSPEND)
            await asyncio.to_thread(rel.wait_domain, hv_, dom, is_suspended)
            assert rel.fence() == seen + 1  # a real shutdown: noticed
            await qmp.wait_event("STOP", since=mark, timeout=STEP)
            assert await qmp.query_status() == "paused"
            frozen = dm.read_counters().ticks
            # ... and resuming the domain runs them again.
            hv_.resume(dom, fast=True)
            await qmp.wait_event("RESUME", since=mark, timeout=STEP)
            assert await qmp.query_status() == "running"
            xs_.resume(dom)
            await asyncio.sleep(0.1)  # measuring a rate: 100 Hz
            after = dm.read_counters()
            assert after.ticks > frozen and after.boots == 1
        finally:
            await agent.close()
            await qmp.close()

    try:
        arun(body())
    finally:
        rel.close()
        xs_.close()
        hv_.close()

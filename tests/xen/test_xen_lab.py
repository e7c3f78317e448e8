"""Smoke tests of the real-Xen lab: the facts of docs/real-xen.md, reproduced.

They prove the lab is usable for torpor's real-Xen tests: the toolstack runs,
libxenctrl/libxenguest load, pyxs reaches the real xenstored, every guest type
boots and is what it claims to be, and a hand-driven xenstore suspend + fast
resume and an ACPI S3 cycle leave guests running (their counters go on).
"""

from __future__ import annotations

import ctypes
import errno
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xenlab
from xenlab import (
    HVM_PARAM_ACPI_S_STATE,
    HVM_PARAM_CALLBACK_IRQ,
    SHUTDOWN_CRASH,
    SHUTDOWN_SUSPEND,
    XENSTORED_SOCKET,
    sh,
)

MakeGuest = Callable[..., xenlab.Guest]


def test_xl_list_shows_domain0() -> None:
    assert "control_d" in Path("/proc/xen/capabilities").read_text()
    rows = [line.split() for line in sh("xl", "list").splitlines()[1:]]
    dom0 = [r for r in rows if r and r[0] == "Domain-0"]
    assert dom0, rows
    assert dom0[0][1] == "0"
    assert "xen_version            : 4.17" in sh("xl", "info")


def test_libxenctrl_opens_and_reports_dom0(xc: xenlab.XenCtrl) -> None:
    # The ctypes layout must match Debian's 4.17 headers, or every field lies.
    assert ctypes.sizeof(xenlab._DomainInfo) == xenlab.DOMAININFO_SIZE
    info = xc.info(0)
    assert info is not None
    assert info.domid == 0
    assert not info.hvm
    assert not info.shutdown
    assert not info.dying
    assert info.online_vcpus == 2  # dom0_max_vcpus=2
    mib = info.tot_pages * 4096 // 2**20
    assert 1400 <= mib <= 1536, mib  # dom0_mem=1536M,max:1536M
    assert xc.info(31000) is None


def test_xc_domain_resume_is_exported_by_libxenguest(xc: xenlab.XenCtrl) -> None:
    assert callable(xc.guest.xc_domain_resume)
    with pytest.raises(AttributeError):
        _ = xc.ctrl.xc_domain_resume  # not in libxenctrl.so.4.17


def test_pyxs_talks_to_the_real_xenstored() -> None:
    import pyxs

    assert pyxs.Client.SU, "pyxs must see dom0's control_d to allow resume_domain"
    with pyxs.Client(unix_socket_path=XENSTORED_SOCKET) as c:
        assert c.read(b"/local/domain/0/name") == b"Domain-0"
        c.write(b"/torpor-lab/smoke", b"hello")
        assert c.read(b"/torpor-lab/smoke") == b"hello"
        assert b"smoke" in c.list(b"/torpor-lab")
        m = c.monitor()
        m.watch(b"/torpor-lab/smoke", b"tok")
        # Monitor.wait() has no timeout (a pyxs bug torpor wraps): read its queue.
        assert m.events.get(timeout=10) == (b"/torpor-lab/smoke", b"tok")  # fires at once
        c.write(b"/torpor-lab/smoke", b"again")
        assert m.events.get(timeout=10) == (b"/torpor-lab/smoke", b"tok")
        m.unwatch(b"/torpor-lab/smoke", b"tok")
        c.delete(b"/torpor-lab")
        assert not c.exists(b"/torpor-lab")


#: what /sys/hypervisor/guest_type says inside each kind (plain HVM with
#: xen_nopv never initialises Xen support, so it has no such file)
GUEST_TYPE_SEEN = {"pv": "PV", "pvh": "PVH", "pvhvm": "HVM", "hvm": "none"}


def check_running_guest(g: xenlab.Guest, xc: xenlab.XenCtrl) -> None:
    """The guest ticks, runs, and is the kind of domain its definition says."""
    first = g.last_tick()
    assert first is not None
    later = g.wait_tick(after=first.n, timeout=60)
    assert later.uptime > first.uptime
    assert f"TORPOR-GUEST boot guest_type={GUEST_TYPE_SEEN[g.kind]}" in g.console()
    info = xc.info(g.domid)
    assert info is not None
    assert not info.shutdown
    assert not info.paused
    assert info.hvm == (g.kind != "pv")
    assert info.pvh == (g.kind == "pvh")
    if g.kind in ("pvhvm", "hvm"):
        # Linux's PV drivers set the callback; xen_nopv leaves it 0.
        callback = xc.hvm_param(g.domid, HVM_PARAM_CALLBACK_IRQ)
        assert (callback != 0) == (g.kind == "pvhvm"), callback
        g.send(f"say {g.kind}-channel-ok")
        g.wait_line(f"TORPOR-GUEST say {g.kind}-channel-ok", timeout=60)
    else:
        with pytest.raises(ValueError):
            g.send("say no-channel")


def xenstore_suspend_and_fast_resume(
    g: xenlab.Guest, xc: xenlab.XenCtrl, xs: xenlab.XsConn, cycles: int = 2
) -> None:
    """Suspend by hand through control/shutdown; resume with fast=1 + XS_RESUME.

    Two cycles: the second @releaseDomain proves XS_RESUME re-armed it.
    """
    import pyxs

    ctl = f"/local/domain/{g.domid}/control/shutdown"
    xs.watch("@releaseDomain", "release")
    xs.watch(ctl, "control")
    for cycle in range(1, cycles + 1):
        before = g.wait_tick()
        mark = xs.mark()
        t0 = time.monotonic()
        sh("xenstore-write", ctl, "suspend")
        xs.wait_until(lambda: xs.read(ctl) != "suspend", 60, f"cycle {cycle}: the guest's ack")
        t_ack = time.monotonic() - t0

        def suspended() -> xenlab.DomInfo | None:
            i = xc.info(g.domid)
            return i if i is not None and i.shutdown else None

        info = xs.wait_until(suspended, 60, f"cycle {cycle}: the domain to shut down")
        t_down = time.monotonic() - t0
        assert info.shutdown_reason == SHUTDOWN_SUSPEND, info
        xs.wait_until(
            lambda m=mark: xs.saw("@releaseDomain", "release", m),
            10,
            f"cycle {cycle}: @releaseDomain",
        )
        # The ack: the guest wrote "" in the transaction that read the command.
        assert xs.read(ctl) in ("", None)

        t1 = time.monotonic()
        xc.resume(g.domid, fast=True)
        t_resume = time.monotonic() - t1
        with pyxs.Client(unix_socket_path=XENSTORED_SOCKET) as c:
            c.resume_domain(g.domid)  # XS_RESUME: re-arms @releaseDomain
        after = g.wait_tick(after=before.n, timeout=60)
        info = xc.info(g.domid)
        assert info is not None
        assert not info.shutdown, info
        # Kept running: the counter and uptime go on, and it booted only once.
        assert after.n > before.n
        assert after.uptime > before.uptime
        assert g.console().count("TORPOR-GUEST boot") == 1
        print(
            f"{g.kind} cycle {cycle}: ack {t_ack:.3f}s, shut down (reason 2) "
            f"{t_down:.3f}s, xc_domain_resume(fast=1) {t_resume:.3f}s"
        )


@pytest.mark.parametrize("kind", ["pv", "pvh"])
def test_pv_and_pvh_guests_boot_tick_and_are_their_type(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, kind: str
) -> None:
    check_running_guest(make_guest(kind), xc)


def test_pv_xenstore_suspend_and_fast_resume_keep_it_running(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, xs: xenlab.XsConn
) -> None:
    g = make_guest("pv")
    # Cooperative fast resume is refused unless the domain is shut down for
    # suspend: that guard protects a running guest's vCPU0 eax.
    with pytest.raises(OSError) as refused:
        xc.resume(g.domid, fast=True)
    assert refused.value.errno == errno.EINVAL
    xenstore_suspend_and_fast_resume(g, xc, xs)


def test_a_guest_that_crashes_while_booting_is_reported_at_once(make_guest: MakeGuest) -> None:
    # No init: the kernel panics, and a PV kernel's panic is a crash shutdown.
    t0 = time.monotonic()
    with pytest.raises(xenlab.GuestDied) as died:
        make_guest("pv", extra_cmdline="rdinit=/no-such-init", retry_boot=False)
    assert died.value.info is not None
    assert died.value.info.shutdown_reason == SHUTDOWN_CRASH  # on_crash="preserve"
    assert "shut down (crash)" in str(died.value)
    assert time.monotonic() - t0 < 80  # not the 90 s boot timeout


# HVM guests boot slowly under the lab's TCG (SeaBIOS pulls the kernel through
# fw_cfg's I/O port): more than pyproject's 120 s per-test default.
@pytest.mark.timeout(600)
def test_pvhvm_guest_is_pvhvm_and_survives_xenstore_suspend(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, xs: xenlab.XsConn
) -> None:
    g = make_guest("pvhvm")
    check_running_guest(g, xc)
    xenstore_suspend_and_fast_resume(g, xc, xs)


@pytest.mark.timeout(600)
def test_hvm_guest_is_plain_hvm_and_survives_s3(make_guest: MakeGuest, xc: xenlab.XenCtrl) -> None:
    g = make_guest("hvm")
    check_running_guest(g, xc)
    with xenlab.qmp(g.qmp_socket) as q:
        assert q.execute("query-current-machine")["wakeup-suspend-support"] is True
        assert "xen-save-devices-state" in {c["name"] for c in q.execute("query-commands")}
        before = g.wait_tick()
        g.send("s3")
        q.wait_event("SUSPEND", timeout=60)
        assert q.execute("query-status")["status"] == "suspended"
        assert xc.hvm_param(g.domid, HVM_PARAM_ACPI_S_STATE) == 3
        info = xc.info(g.domid)
        assert info is not None
        # S3 is neither a pause nor a shutdown to the hypervisor.
        assert not info.shutdown
        assert not info.paused

        q.execute("system_wakeup")
        q.wait_event("WAKEUP", timeout=60)
        g.wait_line("TORPOR-GUEST s3-resumed", timeout=120)
        after = g.wait_tick(after=before.n, timeout=60)
        assert q.execute("query-status")["status"] == "running"
    assert xc.hvm_param(g.domid, HVM_PARAM_ACPI_S_STATE) == 0
    assert after.uptime > before.uptime
    assert g.console().count("TORPOR-GUEST boot") == 1

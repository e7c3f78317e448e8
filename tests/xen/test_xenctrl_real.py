"""The xenctrl backend against a real Xen 4.17 hypervisor, from dom0 (the lab).

Only dom0-level checks: nothing here pauses, shuts down, resumes or destroys
an existing domain.  Calls that must fail target a domid no domain has, or
are refused by Xen's own guards (a fast resume of a running dom0 is EINVAL
before libxenguest touches anything: xg_resume.c, modify_returncode).

What these prove that tests/test_xenctrl_backend.py cannot: the declarations
work against the running libraries and hypervisor (xc_domaininfo_t decoded
from a real XEN_SYSCTL_getdomaininfolist), errnos come from Xen itself, the
va_list hand-off in the logger callback works with real libxc messages, and
nothing reaches stderr on a real dom0 either.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from torpor import model
from torpor.errors import HypervisorError
from torpor.hypervisor import Hypervisor, xenctrl

pytestmark = [
    pytest.mark.xen,
    pytest.mark.skipif(
        not any(os.path.exists(p) for p in xenctrl.PRIVCMD_PATHS),
        reason="not a Xen dom0 (no privcmd device)",
    ),
]


@pytest.fixture
def hv() -> Iterator[xenctrl.XenctrlHypervisor]:
    h = xenctrl.XenctrlHypervisor()
    yield h
    h.close()


@pytest.fixture
def unused_domid(hv: xenctrl.XenctrlHypervisor) -> int:
    present = {d.domid for d in hv.domain_info_list()}
    domid = xenctrl.DOMID_FIRST_RESERVED - 1
    while domid in present:
        domid -= 1
    return domid


def test_open_and_close_print_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    h = xenctrl.XenctrlHypervisor()
    assert isinstance(h, Hypervisor)
    assert h.domain_info(0).domid == 0
    h.close()
    assert h.closed
    assert capfd.readouterr() == ("", "")


def test_domain_info_list_shows_dom0(hv: xenctrl.XenctrlHypervisor) -> None:
    infos = hv.domain_info_list()
    assert infos and infos[0].domid == 0
    assert [i.domid for i in infos] == sorted(i.domid for i in infos)
    dom0 = infos[0]
    assert not dom0.dying and not dom0.shutdown and dom0.shutdown_reason is None
    assert dom0.state_word() in ("running", "paused")
    assert dom0.nr_online_vcpus >= 1
    assert dom0.max_vcpu_id >= dom0.nr_online_vcpus - 1
    assert 0 < dom0.tot_pages
    assert dom0.cpu_time > 0
    if not dom0.hvm:
        # A PV hardware domain gets only an emulated PIT (seen: 256 on 4.17).
        assert dom0.emulation_flags == model.X86_EMU_PIT


def test_domain_info_list_agrees_with_xl(hv: xenctrl.XenctrlHypervisor) -> None:
    xl = shutil.which("xl")
    if xl is None:
        pytest.skip("xl is not installed in this dom0")
    out = subprocess.run([xl, "list"], capture_output=True, text=True, check=True).stdout
    xl_ids = sorted(int(line.split()[1]) for line in out.splitlines()[1:] if line.strip())
    assert [i.domid for i in hv.domain_info_list()] == xl_ids


def test_domain_info_matches_the_list_and_paging_works(hv: xenctrl.XenctrlHypervisor) -> None:
    listed = {i.domid: i for i in hv.domain_info_list()}
    for domid, info in listed.items():
        one = hv.domain_info(domid)
        assert (one.domid, one.uuid, one.hvm, one.max_vcpu_id) == (
            info.domid,
            info.uuid,
            info.hvm,
            info.max_vcpu_id,
        )
    # One at a time from each domid gives the same domains.
    assert [i.domid for i in hv.domain_info_list(first_domid=0, max_domains=1)] == [0]


def test_missing_domain_is_esrch_from_xen(hv: xenctrl.XenctrlHypervisor, unused_domid: int) -> None:
    with pytest.raises(HypervisorError) as ei:
        hv.domain_info(unused_domid)
    assert ei.value.errno == errno.ESRCH
    for op, call in (
        ("pause", lambda: hv.pause(unused_domid)),
        ("unpause", lambda: hv.unpause(unused_domid)),
        ("shutdown", lambda: hv.shutdown(unused_domid, model.ShutdownReason.SUSPEND)),
        ("destroy", lambda: hv.destroy(unused_domid)),
        ("get_hvm_param", lambda: hv.get_hvm_param(unused_domid, 0)),
        ("evtchn_subscribe", lambda: hv.evtchn_subscribe(unused_domid, 1)),
        ("evtchn_bind_interdomain", lambda: hv.evtchn_bind_interdomain(unused_domid, 1)),
    ):
        with pytest.raises(HypervisorError) as ei:
            call()
        assert (ei.value.errno, ei.value.op, ei.value.domid) == (errno.ESRCH, op, unused_domid)


def test_hvm_param_of_a_pv_dom0_is_einval(hv: xenctrl.XenctrlHypervisor) -> None:
    if hv.domain_info(0).hvm:
        pytest.skip("dom0 is PVH here")
    with pytest.raises(HypervisorError) as ei:
        hv.get_hvm_param(0, model.HVM_PARAM_CALLBACK_IRQ)
    assert ei.value.errno == errno.EINVAL


def test_fast_resume_of_running_dom0_is_refused_and_logged_quietly(
    hv: xenctrl.XenctrlHypervisor,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """libxenguest refuses (EINVAL: not shut down with reason suspend) before
    it touches vCPU state, and says why through our logger."""
    caplog.set_level(logging.DEBUG, logger="torpor.hypervisor.xenctrl")
    with pytest.raises(HypervisorError) as ei:
        hv.resume(0, fast=True)
    assert (ei.value.errno, ei.value.op) == (errno.EINVAL, "resume")
    assert not hv.domain_info(0).shutdown
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "libxenguest's refusal was not forwarded to logging"
    assert errors[0].name.startswith("torpor.hypervisor.xenctrl.")
    # xg_resume.c: ERROR("Dom %d not suspended: (shutdown %d, reason %d)", ...)
    assert errors[0].name == "torpor.hypervisor.xenctrl.xc"
    assert errors[0].getMessage().startswith("Dom 0 not suspended: (shutdown 0")
    assert capfd.readouterr() == ("", "")


def test_event_channel_handle(hv: xenctrl.XenctrlHypervisor) -> None:
    fd = hv.evtchn_fileno()
    assert fd >= 0 and os.get_blocking(fd) is False
    assert hv.evtchn_pending() is None  # nothing bound: EAGAIN, not a block


def test_suspend_lock_in_xen_run_dir(unused_domid: int) -> None:
    if not os.path.isdir(xenctrl.XEN_RUN_DIR):
        pytest.skip(f"{xenctrl.XEN_RUN_DIR} does not exist in this dom0")
    lock = xenctrl.SuspendEvtchnLock(unused_domid, xenctrl.XEN_RUN_DIR)
    with lock:
        assert os.path.exists(lock.path)
        with pytest.raises(HypervisorError) as ei:
            xenctrl.SuspendEvtchnLock(unused_domid, xenctrl.XEN_RUN_DIR).acquire()
        assert ei.value.errno == errno.EBUSY
    assert not os.path.exists(lock.path)

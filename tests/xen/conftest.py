"""Fixtures for tests on a real Xen 4.17 hypervisor: the lab's dom0 (`make test-xen`).

Every test collected under tests/xen is marked `xen`; outside a Xen control
domain (a plain `make test` on the host) they are skipped with the reason.

Fixtures:
  xc           session  xenlab.XenCtrl: libxenctrl/libxenguest through ctypes
                        (.info(domid) -> DomInfo with raw flags and shutdown
                        reason, .hvm_param(domid, n), .resume(domid, fast))
  make_guest   function  make_guest(kind, *, name=None, extra_cmdline="",
                        overrides=None, wait_ticking=True, timeout=None,
                        retry_boot=True, agent=False) -> Guest
                        kind: pv | pvh | pvhvm | hvm (lab/guests/<kind>.cfg);
                        Guest: .domid .name .kind .console_log .ticks()
                        .last_tick() .wait_tick(after=None, timeout) .wait_line(text)
                        .send(cmd) (HVM types: "s3", "say <text>") .qmp_socket
                        .agent_socket (agent=True, plain HVM: qemu-ga at
                        /var/run/xen/qga-<domid>);
                        waits raise xenlab.GuestDied at once if the domain shuts
                        down; a boot that dies before the first tick is retried
                        once (a TCG artefact, reported on stderr);
                        every guest is destroyed at teardown and its console
                        log and xl config are copied to the results
  xs           function  xenlab.XsConn: a xenstore connection whose waits are
                        driven by watch events and bounded (.watch, .wait_until,
                        .mark/.saw, .read)
  lab_results  session  the writable results directory shared with the host
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helpers sit next to this file; make them importable under any import mode.
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import xenlab  # noqa: E402
from labfixtures import lab_results, make_guest, mark_lab_items, xc  # noqa: E402

__all__ = ["lab_results", "make_guest", "xc"]  # fixtures, registered by being here


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_lab_items(items, HERE, "make test-xen")


@pytest.fixture
def xs() -> Iterator[xenlab.XsConn]:
    with xenlab.XsConn() as conn:
        yield conn

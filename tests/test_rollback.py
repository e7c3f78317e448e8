"""The lines that bring a guest back, each with a test named for it.

``tools/mutation_check.py`` (run by ``make test``) deletes each of these
lines in a copy of torpor and runs the test named for it, which must then
fail: the rollback's cooperative resume, the XS_RESUME of every resume (and
the recover's withdrawal of a pending request, in tests/test_recovery.py).
Every judgement here is the simulated host's own (``SimHost.observed_state``,
the guest's counters, its xenstore), never torpor's report alone.
"""

from __future__ import annotations

from typing import Any

import pytest

from torpor import hookimpl
from torpor.errors import DeviceModelError, OperationError
from torpor.facade import Torpor
from torpor.model import Timeouts
from torpor.plugins import get_plugin_manager
from torpor_sim.host import SimHost


def counters(host: SimHost, domid: int) -> dict[str, Any]:
    return dict(host.run(host.guest_report(domid))["counters"])


class FailingDeviceModelSuspend:
    """A device model that refuses to stop (as a QEMU that errors on ``stop`` would)."""

    @hookimpl(tryfirst=True)
    def torpor_device_model_suspend(self, ctx: Any) -> None:
        raise DeviceModelError("QMP stop: the device model refused", domid=ctx.domid)


def test_rollback_resumes_a_guest_whose_device_model_suspend_failed(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pvhvm")
    before = counters(sim_host, dom)
    pm = get_plugin_manager(plugins=[FailingDeviceModelSuspend()])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(OperationError) as caught:
            t.suspend(dom)
    # The guest suspended, then the rollback resumed it cooperatively: its
    # hypercall returned 1 once more, and it runs.
    assert sim_host.observed_state(dom) == "running"
    after = counters(sim_host, dom)
    assert after["cooperative_resumes"] == before["cooperative_resumes"] + 1
    assert caught.value.state == "running"
    assert "guest resumed cooperatively" in caught.value.message


def test_resume_sends_xs_resume_so_the_next_suspend_is_noticed(sim_host: SimHost) -> None:
    """xenstored fires @releaseDomain once per shutdown and re-arms only on
    XS_RESUME: without it the second suspend is never noticed."""
    dom = sim_host.create_guest("pv")
    timeouts = Timeouts(suspend=2.0)
    with Torpor(sim_host.toolstack_host(), own_host=True, timeouts=timeouts) as t:
        t.suspend(dom)
        t.resume(dom)
        assert sim_host.run(_latch_armed(sim_host, dom))
        t.suspend(dom)
        assert sim_host.observed_state(dom) == "suspended"
        t.resume(dom)
    assert sim_host.observed_state(dom) == "running"


async def _latch_armed(host: SimHost, domid: int) -> bool:
    assert host.xenstored is not None
    return not host.xenstored.is_latched(domid)


class DropXenstoreAtRequest:
    """Closes torpor's xenstore connection as the request phase starts: the S3
    request still goes out (through the guest agent), the wait for it breaks."""

    @hookimpl
    def torpor_phase_started(self, ctx: Any, phase: Any) -> None:
        if str(phase) == "request":
            ctx.host.xenstore.close()


def test_an_s3_request_that_cannot_be_withdrawn_is_settled_before_the_report(
    sim_host: SimHost,
) -> None:
    """qemu-ga's guest-suspend-ram has no cancel: when the wait for the sleep
    fails (here xenstore drops), the guest still sleeps a moment later.  torpor
    waits for that on the device model alone, wakes it, and only then reports --
    so the state it reports is the one the guest stays in (the fault matrix
    once said "running" while the guest went to S3 right after)."""
    dom = sim_host.create_guest("hvm")
    pm = get_plugin_manager(plugins=[DropXenstoreAtRequest()])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(OperationError) as caught:
            t.suspend(dom)
    assert "went to sleep after all and was woken" in caught.value.message
    assert caught.value.state == "running"
    # The guest took the request (it slept once) and was woken: nothing is left
    # in flight to change the state after torpor returned.
    assert counters(sim_host, dom)["suspends"] == 1
    assert sim_host.observed_state(dom) == "running"

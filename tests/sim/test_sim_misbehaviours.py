"""Every misbehaviour a simulated guest can be given, observed doing what it says.

Driven by hand, as a toolstack would (no orchestrator): for PV and PVHVM the
xenstore handshake (``control/shutdown``) and ``@releaseDomain``; for plain HVM
the guest agent's ``guest-suspend-ram`` and the device model's QMP, where
:mod:`torpor_sim.hvm` makes the same misbehaviours act (the agent stands for
the guest there).

Waits are on events; what a misbehaving guest *fails* to do has no event, and
is shown by listening for :data:`QUIET` seconds -- against the well-behaved
guest's milliseconds.
"""

from __future__ import annotations

import errno
import time
from typing import Any

import pytest

from torpor.errors import DeviceModelError, HypervisorError, Timeout
from torpor.model import HVM_PARAM_ACPI_S_STATE, ShutdownReason
from torpor.qmp import GuestAgent, QmpClient, QmpCommandError
from torpor.xenstore import Xenstore
from torpor_sim.guest import MISBEHAVIOURS, Behaviour
from torpor_sim.host import SimHost

from .dm_fixtures import arun
from .facts_fixtures import (
    QUIET,
    STEP,
    ReleaseDomain,
    cancel,
    control_shutdown,
    domain_info_or_none,
    drain,
    hvm_host,
    in_host,
    is_suspended,
    on_host,
    release,
    report,
    request,
    shut_down_with,
    ticks_go_on,
    wait_ack,
    xs,
)

__all__ = ["hvm_host", "release", "xs"]  # fixtures, imported for pytest

PV_KINDS = ["pv", "pvhvm"]
SLOW = 0.3


@pytest.fixture
def hv(sim_host: SimHost) -> Any:
    h = sim_host.hypervisor()
    yield h
    h.close()


def guest(host: SimHost, kind: str, misbehaviour: str) -> int:
    dom = host.create_guest(kind, behaviour=Behaviour.parse(misbehaviour))
    assert host.behaviours[dom].misbehaviour == misbehaviour.partition("=")[0]
    return dom


def feature(xs: Xenstore, dom: int, command: str) -> str:
    return xs.read(f"/local/domain/{dom}/control/feature-{command}")


def no_ack(xs: Xenstore, dom: int, command: str = "suspend") -> None:
    with pytest.raises(Timeout):
        wait_ack(xs, dom, command, timeout=QUIET)
    assert xs.read(control_shutdown(dom)) == command  # the request is still there


def still_running(host: SimHost, hv: Any, dom: int) -> None:
    info = hv.domain_info(dom)
    assert info.running and not info.shutdown
    r = report(host, dom)
    assert r["state"] == "running"
    ticks_go_on(host, dom, r["counters"]["ticks"])


def test_every_misbehaviour_is_covered() -> None:
    covered = {
        "never_ack",
        "ack_then_hang",
        "slow_ack",
        "unknown_command",
        "crash_during_suspend",
        "vanish",
        "lose_xenstore",
    }
    assert set(MISBEHAVIOURS) == covered
    with pytest.raises(ValueError, match="unknown misbehaviour"):
        Behaviour.parse("sulk")
    with pytest.raises(ValueError, match="takes no argument"):
        Behaviour.parse("never_ack=3")
    assert Behaviour.parse("slow_ack=2.5").slow_ack == 2.5


# ---------------------------------------------------------------------------
# PV and PVHVM: the xenstore handshake
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PV_KINDS)
def test_never_ack(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any, kind: str
) -> None:
    """The kernel never handles the request (hung, or paused)."""
    dom = guest(sim_host, kind, "never_ack")
    assert feature(xs, dom, "suspend") == "1"  # it claims it can
    seen = release.fence()
    request(xs, dom)
    no_ack(xs, dom)
    assert release.fence() == seen
    assert not any(line.startswith("acked") for line in report(sim_host, dom)["log"])
    # libxl's cancel, in a transaction: the guest had not acked; it runs on.
    assert cancel(xs, dom) is False
    assert xs.read(control_shutdown(dom)) == ""
    still_running(sim_host, hv, dom)


@pytest.mark.parametrize("kind", PV_KINDS)
def test_ack_then_hang(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any, kind: str
) -> None:
    """Acks, then freezing tasks fails: the domain never shuts down."""
    dom = guest(sim_host, kind, "ack_then_hang")
    seen = release.fence()
    request(xs, dom)
    wait_ack(xs, dom)
    assert xs.read(control_shutdown(dom)) == ""
    release.assert_quiet(seen)  # the toolstack sees only its shutdown timeout
    log = report(sim_host, dom)["log"]
    assert log.index("freeze processes failed") > log.index("acked suspend")
    assert "xs_suspend" not in log
    assert sim_host.xen.vcpu(dom, 0).edx == 0  # no SCHEDOP_shutdown was made
    still_running(sim_host, hv, dom)


@pytest.mark.parametrize("kind", PV_KINDS)
def test_slow_ack(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any, kind: str
) -> None:
    """Acks after ``slow_ack`` seconds, then suspends normally."""
    dom = guest(sim_host, kind, f"slow_ack={SLOW}")
    seen = release.fence()
    start = time.monotonic()
    request(xs, dom)
    wait_ack(xs, dom)
    assert time.monotonic() - start >= SLOW
    release.wait_domain(hv, dom, is_suspended)
    assert release.fence() == seen + 1
    hv.resume(dom, fast=True)
    xs.resume(dom)
    drain(sim_host)
    assert report(sim_host, dom)["counters"]["cooperative_resumes"] == 1


@pytest.mark.parametrize("kind", PV_KINDS)
def test_unknown_command(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any, kind: str
) -> None:
    """No CONFIG_HIBERNATE_CALLBACKS: "suspend" is not advertised, and stays unacked;
    the commands it knows it still acks."""
    dom = guest(sim_host, kind, "unknown_command")
    assert feature(xs, dom, "suspend") == ""  # libxl's empty node, never set
    assert feature(xs, dom, "poweroff") == "1"
    seen = release.fence()
    request(xs, dom)
    no_ack(xs, dom)
    assert "ignored unknown shutdown command 'suspend'" in report(sim_host, dom)["log"]
    assert release.fence() == seen
    assert cancel(xs, dom) is False
    assert hv.domain_info(dom).running
    request(xs, dom, "poweroff")
    wait_ack(xs, dom, "poweroff")
    release.wait_domain(hv, dom, shut_down_with(ShutdownReason.POWEROFF))


@pytest.mark.parametrize("kind", PV_KINDS)
def test_crash_during_suspend(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any, kind: str
) -> None:
    """Acks, then the kernel panics: shut down with reason crash, not suspend."""
    dom = guest(sim_host, kind, "crash_during_suspend")
    seen = release.fence()
    request(xs, dom)
    wait_ack(xs, dom)
    info = release.wait_domain(hv, dom, shut_down_with(ShutdownReason.CRASH))
    assert info is not None and not info.suspended
    assert release.fence() == seen + 1
    r = report(sim_host, dom)
    assert r["state"] == "crashed" and r["log"][-1] == "panic during suspend"
    with pytest.raises(HypervisorError) as e:
        hv.resume(dom, fast=True)  # the guard: not shut down for suspend
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("kind", PV_KINDS)
def test_vanish(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any, kind: str
) -> None:
    """Acks, then the domain is destroyed under the toolstack."""
    dom = guest(sim_host, kind, "vanish")
    request(xs, dom)
    wait_ack(xs, dom)  # the node holds "" or is gone: both are an ack
    assert release.wait_domain(hv, dom, lambda info: info is None) is None
    with pytest.raises(HypervisorError) as e:
        hv.resume(dom, fast=True)
    assert e.value.errno == errno.ESRCH
    # libxl's clean-up: the domain's tree and its backends are gone.
    xs.wait(f"/local/domain/{dom}", lambda v: v is None, timeout=STEP)
    xs.wait(f"/local/domain/0/backend/vif/{dom}", lambda v: v is None, timeout=STEP)
    assert dom not in sim_host.guests

    async def introduced() -> bool:
        assert sim_host.xenstored is not None
        return sim_host.xenstored.is_introduced(dom)

    assert on_host(sim_host, introduced()) is False


@pytest.mark.parametrize("kind", PV_KINDS)
def test_lose_xenstore(
    sim_host: SimHost, xs: Xenstore, release: ReleaseDomain, hv: Any, kind: str
) -> None:
    """Its xenstore connection breaks after boot: no watch left, so no request is seen."""
    dom = guest(sim_host, kind, "lose_xenstore")
    assert "xenstore connection lost" in report(sim_host, dom)["log"]

    async def watches_of_the_guest() -> list[Any]:
        assert sim_host.xenstored is not None
        return [w for w in sim_host.xenstored.watches() if w.domid == dom]

    assert on_host(sim_host, watches_of_the_guest()) == []
    seen = release.fence()
    request(xs, dom)
    no_ack(xs, dom)
    assert release.fence() == seen
    assert cancel(xs, dom) is False
    still_running(sim_host, hv, dom)


# ---------------------------------------------------------------------------
# HVM: the same names, acted by the guest agent (torpor_sim.hvm)
# ---------------------------------------------------------------------------


def hvm_guest(host: SimHost, misbehaviour: str) -> int:
    return guest(host, "hvm", misbehaviour)


async def clients(host: SimHost, dom: int) -> tuple[QmpClient, GuestAgent]:
    qmp = await QmpClient.open(host.qmp_socket(dom), domid=dom, timeout=STEP)
    agent = GuestAgent(domid=dom)
    await agent.connect(f"{host.dir}/qmp/qga-{dom}", timeout=STEP)
    await agent.sync(timeout=STEP)
    return qmp, agent


async def suspend_ram(qmp: QmpClient, agent: GuestAgent, timeout: float = STEP) -> None:
    mark = qmp.event_mark()
    await agent.suspend_ram(qmp.wait_event("SUSPEND", since=mark, timeout=timeout), timeout=timeout)


def with_clients(host: SimHost, dom: int, body: Any) -> None:
    async def main() -> None:
        qmp, agent = await clients(host, dom)
        try:
            await body(qmp, agent)
        finally:
            await agent.close()
            await qmp.close()

    arun(main())


@pytest.mark.parametrize("misbehaviour", ["never_ack", "ack_then_hang"])
def test_hvm_agent_takes_the_request_and_the_guest_never_sleeps(
    hvm_host: SimHost, misbehaviour: str
) -> None:
    dom = hvm_guest(hvm_host, misbehaviour)
    hv = hvm_host.hypervisor()
    dm = hvm_host.device_models[dom]

    async def body(qmp: QmpClient, agent: GuestAgent) -> None:
        with pytest.raises(Timeout):
            await suspend_ram(qmp, agent, timeout=QUIET)
        assert await qmp.query_status() == "running"
        assert hv.get_hvm_param(dom, HVM_PARAM_ACPI_S_STATE) == 0
        assert dm.read_counters().s3_entries == 0

    with_clients(hvm_host, dom, body)
    assert f"agent: guest-suspend-ram ({misbehaviour})" in hvm_host.guests[dom].log
    assert hv.domain_info(dom).running
    hv.close()


def test_hvm_slow_ack(hvm_host: SimHost) -> None:
    dom = hvm_guest(hvm_host, f"slow_ack={SLOW}")
    hv = hvm_host.hypervisor()
    dm = hvm_host.device_models[dom]

    async def body(qmp: QmpClient, agent: GuestAgent) -> None:
        start = time.monotonic()
        await suspend_ram(qmp, agent)
        assert time.monotonic() - start >= SLOW
        await in_host(hvm_host, dm.wait_run_state({"suspended"}, timeout=STEP))
        assert hv.get_hvm_param(dom, HVM_PARAM_ACPI_S_STATE) == 3
        mark = qmp.event_mark()
        await qmp.system_wakeup()
        await qmp.wait_event("WAKEUP", since=mark, timeout=STEP)
        await in_host(hvm_host, dm.wait_run_state({"running"}, timeout=STEP))
        assert hv.get_hvm_param(dom, HVM_PARAM_ACPI_S_STATE) == 0

    with_clients(hvm_host, dom, body)
    hv.close()


def test_hvm_unknown_command(hvm_host: SimHost) -> None:
    """An agent built without guest-suspend-ram: CommandNotFound."""
    dom = hvm_guest(hvm_host, "unknown_command")

    async def body(qmp: QmpClient, agent: GuestAgent) -> None:
        with pytest.raises(QmpCommandError) as e:
            await suspend_ram(qmp, agent)
        assert e.value.error_class == "CommandNotFound"
        assert await qmp.query_status() == "running"

    with_clients(hvm_host, dom, body)


def test_hvm_crash_during_suspend(hvm_host: SimHost) -> None:
    """The guest dies on the way down (a triple fault): shut down with reason crash."""
    dom = hvm_guest(hvm_host, "crash_during_suspend")
    hv = hvm_host.hypervisor()
    with Xenstore(hvm_host.xenstore_socket, timeout=STEP) as x:
        rel = ReleaseDomain(x)
        seen = rel.fence()

        async def body(qmp: QmpClient, agent: GuestAgent) -> None:
            mark = qmp.event_mark()
            with pytest.raises(Timeout):
                await suspend_ram(qmp, agent, timeout=QUIET)
            ev = await qmp.wait_event("SHUTDOWN", since=mark, timeout=STEP)
            assert ev.data == {"guest": True, "reason": "guest-reset"}

        with_clients(hvm_host, dom, body)
        rel.wait_domain(hv, dom, shut_down_with(ShutdownReason.CRASH))
        assert rel.fence() == seen + 1
        rel.close()
    hv.close()


def test_hvm_vanish(hvm_host: SimHost) -> None:
    dom = hvm_guest(hvm_host, "vanish")
    hv = hvm_host.hypervisor()
    with Xenstore(hvm_host.xenstore_socket, timeout=STEP) as x:
        rel = ReleaseDomain(x)

        async def body(qmp: QmpClient, agent: GuestAgent) -> None:
            # The guest, and its agent with it, are gone: the channel closes.
            # (torpor.qmp.GuestAgent lets that out as a bare EOFError.)
            with pytest.raises((DeviceModelError, EOFError)):
                await suspend_ram(qmp, agent)

        with_clients(hvm_host, dom, body)
        assert rel.wait_domain(hv, dom, lambda info: info is None) is None
        x.wait(f"/local/domain/{dom}", lambda v: v is None, timeout=STEP)
        rel.close()
    assert domain_info_or_none(hv, dom) is None
    assert dom not in hvm_host.device_models
    hv.close()


def test_hvm_lose_xenstore_means_no_agent(hvm_host: SimHost) -> None:
    """HVM guests have no xenstore client: the name means the agent is gone."""
    dom = hvm_guest(hvm_host, "lose_xenstore")

    async def body() -> None:
        with pytest.raises(DeviceModelError, match="cannot connect to the guest agent"):
            await GuestAgent(domid=dom).connect(f"{hvm_host.dir}/qmp/qga-{dom}", timeout=STEP)
        qmp = await QmpClient.open(hvm_host.qmp_socket(dom), domid=dom, timeout=STEP)
        try:
            assert await qmp.query_status() == "running"  # QMP itself is there
        finally:
            await qmp.close()

    arun(body())

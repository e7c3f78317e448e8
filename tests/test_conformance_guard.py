"""The suite's QMP guard tells torpor's own QMP connection from one a plugin keeps.

The guard reads the operation's own connection from the context (private to
torpor: this test is what notices if that changes; without it the guard
stands aside and a leaking plugin's tests take every device-model deadline).
"""

from __future__ import annotations

from typing import Any

import torpor_pvhvm.plugin
from torpor.facade import Torpor
from torpor.hookspecs import hookimpl
from torpor.model import Phase, Timeouts
from torpor.plugins import get_plugin_manager
from torpor.qmp import QmpClient
from torpor.testing.suite import _own_qmp_fd, _QmpGuard, _unix_peers
from torpor_sim.host import SimHost


class _Probe:
    """Once the device model is stopped: torpor's own connection as the guard reads
    it, and every connection of this process to the device model's QMP socket."""

    def __init__(self) -> None:
        self.seen: list[tuple[int | None, list[int]]] = []

    @hookimpl
    def torpor_phase_finished(self, ctx: Any, phase: Phase, seconds: float, error: Any) -> None:
        if phase == Phase.DEVICE_MODEL_SUSPEND:
            path = ctx.host.qmp_path(ctx.domid)
            self.seen.append((_own_qmp_fd(ctx), [fd for fd, p in _unix_peers() if p == path]))


def test_the_guard_knows_torpors_own_connection(sim_host: SimHost) -> None:
    domid = sim_host.create_guest("pvhvm")
    probe, guard = _Probe(), _QmpGuard()
    pm = get_plugin_manager(plugins=[torpor_pvhvm.plugin, probe, guard], autoload=False)
    with Torpor(
        sim_host.toolstack_host(), own_host=True, plugin_manager=pm, timeouts=Timeouts()
    ) as t:
        t.suspend(domid)
        t.resume(domid)
    [(own, connected)] = probe.seen
    assert own is not None and own >= 0, "the guard cannot tell torpor's own connection"
    assert connected == [own]  # torpor's, and nothing else
    assert guard.found == []  # torpor's own connection is never taken for a leak


def test_the_guard_names_and_shuts_a_connection_a_plugin_keeps(sim_host: SimHost) -> None:
    domid = sim_host.create_guest("pvhvm")
    kept: list[QmpClient] = []

    class Keeps:
        @hookimpl
        async def torpor_before_suspend(self, ctx: Any) -> None:
            qmp = QmpClient(domid=ctx.domid)
            await qmp.connect(ctx.host.qmp_path(ctx.domid), timeout=5)
            kept.append(qmp)

    guard = _QmpGuard()
    pm = get_plugin_manager(plugins=[torpor_pvhvm.plugin, Keeps(), guard], autoload=False)
    # Without the guard the device-model phase would wait 5 s for a greeting that
    # never comes, and the suspend fail; with it the suspend succeeds at once.
    timeouts = Timeouts(device_model=5)
    with Torpor(
        sim_host.toolstack_host(), own_host=True, plugin_manager=pm, timeouts=timeouts
    ) as t:
        assert t.suspend(domid).state == "suspended"
        t.resume(domid)
    assert len(kept) == 1
    assert len(guard.found) == 1
    assert f"plugin left 1 QMP connection to {sim_host.qmp_socket(domid)} open" in guard.found[0]
    assert "phase request of a suspend started" in guard.found[0]

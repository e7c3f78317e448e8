"""Differential: one torpor scenario on the simulated host and on real Xen.

The scenario (a PV guest): a suspend of the guest while it is paused (it
cannot ack: ack timeout, transactional cancel), unpause; a suspend and a
cooperative resume; a suspend and a forced in-place non-cooperative resume
(the guest panics).  Both hosts run it through torpor's public API with a
:class:`difftrace.Recorder` plugged in; the traces (xenstore nodes written, their
values at settled points, @releaseDomain events, domain states, how each
operation ended) must be equal.  Real Xen is right by definition: a
difference is a simulator bug, fixed in torpor.sim (docs/sim.md lists them).

The real trace is also written to the results (``sim-vs-real-trace.json``):
tests/sim/test_sim_matches_real_xen.py replays the scenario on the simulator
against the copy kept in tests/xen/real_trace.json, so `make test` keeps the
simulator honest without a lab.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import difftrace
import xenlab
from xenlab import XENSTORED_SOCKET, sh

from torpor import Host, Torpor
from torpor.model import Timeouts
from torpor.plugins import get_plugin_manager

MakeGuest = Callable[..., xenlab.Guest]

#: generous enough for a real guest's panic under TCG to be seen (real-xen.md: ~2 s)
TIMEOUTS = Timeouts(settle=30.0)


def run_scenario(
    host: Host,
    rec: difftrace.Recorder,
    pause: Callable[[bool], None],
    wait_running: Callable[[], None],
) -> list[dict[str, Any]]:
    """The scenario, on any host; returns the recorder's trace."""
    d = rec.domid
    pm = get_plugin_manager(plugins=[rec])
    with Torpor(host, plugin_manager=pm, timeouts=TIMEOUTS) as t:
        rec.snapshot("start")
        pause(True)
        rec.operation("suspend (paused guest)", lambda: t.suspend(d, ack_timeout=2))
        pause(False)
        wait_running()
        rec.snapshot("unpaused")
        rec.operation("suspend", lambda: t.suspend(d))
        rec.operation("resume", lambda: t.resume(d))
        wait_running()
        rec.operation("suspend again", lambda: t.suspend(d))
        rec.operation("forced resume", lambda: t.resume(d, cooperative=False, force=True))
    return rec.entries


def sim_trace() -> list[dict[str, Any]]:
    """The scenario on a fresh simulated host (one PV guest)."""
    from torpor.sim.host import SimHost

    with tempfile.TemporaryDirectory(prefix="torpor-diff-") as tmp:
        sim = SimHost(tmp, qemu=False).start()
        try:
            domid = sim.create_guest("pv")
            rec = difftrace.Recorder(sim.xenstore_socket, sim.xen.domain_flags, domid)
            host = sim.toolstack_host()
            try:

                def pause(on: bool) -> None:
                    (host.hypervisor.pause if on else host.hypervisor.unpause)(domid)

                def wait_running() -> None:
                    # A simulated kernel runs as soon as its domain does (its
                    # pending watch events are handled in the host's loop); the
                    # snapshot that follows and the next operation see it.
                    return None

                return run_scenario(host, rec, pause, wait_running)
            finally:
                rec.close()
                host.close()
        finally:
            sim.stop()


def test_the_simulator_traces_the_scenario_as_real_xen_does(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, lab_results: Path
) -> None:
    g = make_guest("pv")

    def flags(domid: int) -> int | None:
        i = xc.info(domid)
        return None if i is None else i.flags

    rec = difftrace.Recorder(XENSTORED_SOCKET, flags, g.domid)
    try:

        def pause(on: bool) -> None:
            sh("xl", "pause" if on else "unpause", str(g.domid))

        def wait_running() -> None:
            g.wait_tick()
            g.wait_tick()

        real = run_scenario(Host.xen(), rec, pause, wait_running)
    finally:
        rec.close()
    (lab_results / "sim-vs-real-trace.json").write_text(json.dumps(real, indent=1) + "\n")
    sim = sim_trace()
    assert sim == real, "the simulator differs from real Xen:\n" + difftrace.diff(sim, real)

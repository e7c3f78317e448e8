"""Differential: one torpor scenario on the simulated host and on real Xen.

The scenario (a PV guest): a suspend of the guest while it is paused (it
cannot ack: ack timeout, transactional cancel), unpause; a suspend and a
cooperative resume; a suspend and a forced in-place non-cooperative resume
(the guest panics).  Both hosts run it through torpor's public API with a
:class:`difftrace.Recorder` plugged in; the traces (xenstore nodes written, their
values at settled points, @releaseDomain events, domain states, how each
operation ended) must be equal.  Real Xen is right by definition: a
difference is a simulator bug, fixed in torpor_sim (docs/sim.md lists them).

The real trace is also written to the results (``sim-vs-real-trace.json``):
tests/sim/test_sim_matches_real_xen.py replays the scenario on the simulator
against the copy kept in tests/xen/real_trace.json, so `make test` keeps the
simulator honest without a lab.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import difftrace
import xenlab
from xenlab import XENSTORED_SOCKET, sh

from torpor import Host

MakeGuest = Callable[..., xenlab.Guest]


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

        real = difftrace.run_scenario(Host.xen(), rec, pause, wait_running)
    finally:
        rec.close()
    (lab_results / "sim-vs-real-trace.json").write_text(json.dumps(real, indent=1) + "\n")
    sim = difftrace.sim_trace()
    assert sim == real, "the simulator differs from real Xen:\n" + difftrace.diff(sim, real)

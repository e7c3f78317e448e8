"""The simulator against a trace recorded on real Xen (issue 5 item 3's differential).

tests/xen/test_sim_vs_real.py runs one torpor scenario on a real PV guest in
the lab and on the simulated host and requires equal traces; it also writes
the real trace to the lab's results.  The copy kept in
tests/xen/real_trace.json lets `make test` hold the simulator to it without
a lab: the scenario is replayed here on a fresh simulated host.  Refresh the
copy from ``<lab cache>/run/out/sim-vs-real-trace.json`` after a lab run if
the scenario changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

XEN_TESTS = Path(__file__).resolve().parents[1] / "xen"
sys.path.insert(0, str(XEN_TESTS))
import difftrace  # noqa: E402


def test_the_simulator_traces_the_scenario_as_real_xen_did() -> None:
    real = json.loads((XEN_TESTS / "real_trace.json").read_text())
    sim = difftrace.sim_trace()
    assert sim == real, "the simulator differs from real Xen:\n" + difftrace.diff(sim, real)

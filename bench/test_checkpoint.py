"""Checkpoint rate: sustained checkpoints per second on one simulated guest.

Two paths, the same session API (torpor's ``checkpoints``, as Remus runs
them): the xenstore handshake and the suspend event channel.  The simulated
guest does no work (no freeze time), so this measures torpor and the
simulator, not a guest.  Per-phase medians show where the time goes.
Targets: >= 1000/s through the event channel, >= 300/s through xenstore.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import pytest

from torpor.facade import Torpor
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost

COUNT = 2000
TARGETS = {"event-channel": 1000.0, "xenstore": 300.0}


@pytest.mark.parametrize("path", ["event-channel", "xenstore"])
def test_checkpoint_rate(sim_host: SimHost, record: Any, path: str) -> None:
    domid = sim_host.create_guest("pv", behaviour=Behaviour(suspend_evtchn=path == "event-channel"))
    with Torpor(sim_host.toolstack_host(), own_host=True) as t:
        t.checkpoints(domid, 50)  # warm up
        phases: dict[str, list[float]] = defaultdict(list)
        totals: list[float] = []

        def keep(res: Any) -> None:
            totals.append(res.seconds)
            seen: dict[str, float] = defaultdict(float)
            for timing in res.timings:
                seen[f"{timing.phase}"] += timing.seconds
            for name, sec in seen.items():
                phases[name].append(sec)

        t0 = time.perf_counter()
        results = t.checkpoints(domid, COUNT, on_result=keep)
        wall = time.perf_counter() - t0
        assert all(r.method == path for r in results)
        # The same, as separate checkpoint() calls: what a session saves.
        n_single = 300
        t0 = time.perf_counter()
        for _ in range(n_single):
            t.checkpoint(domid)
        single_rate = n_single / (time.perf_counter() - t0)
    record(
        f"checkpoint_{path}",
        {
            "checkpoints": COUNT,
            "per_second": round(COUNT / wall, 1),
            "target_per_second": TARGETS[path],
            "single_calls_per_second": round(single_rate, 1),
            "median_ms": round(statistics.median(totals) * 1000, 3),
            "p90_ms": round(statistics.quantiles(totals, n=10)[-1] * 1000, 3),
            "phase_median_ms": {
                k: round(statistics.median(v) * 1000, 4) for k, v in phases.items()
            },
        },
    )

"""Checkpoint rate: sustained checkpoints per second on one simulated guest.

Two paths, the same session API (torpor's ``checkpoints``, as Remus runs
them): the xenstore handshake and the suspend event channel.  The simulated
guest does no work (no freeze time), so this measures torpor and the
simulator, not a guest.  Per-phase medians show where the time goes.
Targets: >= 3000/s through the event channel, >= 2000/s through xenstore.
For scale, the same guest through the bare xenstore protocol (the overhead
benchmark's blocking baseline: request, ack, shutdown, ``resume(fast=1)``,
XS_RESUME), timed in the same test: what the simulated host itself allows.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from typing import Any

import pytest
from test_overhead import bare_cycle

from torpor.facade import Torpor
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost

COUNT = 2000
TARGETS = {"event-channel": 3000.0, "xenstore": 2000.0}


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
        bare_rate = None
        if path == "xenstore":
            xs, hv = t.host.xenstore, t.host.hypervisor
            released = threading.Event()
            with xs.watch("@releaseDomain", lambda _p, _t: released.set()):
                n_bare = 1000
                t0 = time.perf_counter()
                for _ in range(n_bare):
                    bare_cycle(xs, hv, domid, released)
                bare_rate = round(n_bare / (time.perf_counter() - t0), 1)
    record(
        f"checkpoint_{path}",
        {
            "checkpoints": COUNT,
            "per_second": round(COUNT / wall, 1),
            "target_per_second": TARGETS[path],
            "single_calls_per_second": round(single_rate, 1),
            "bare_protocol_per_second": bare_rate,
            "median_ms": round(statistics.median(totals) * 1000, 3),
            "p90_ms": round(statistics.quantiles(totals, n=10)[-1] * 1000, 3),
            "phase_median_ms": {
                k: round(statistics.median(v) * 1000, 4) for k, v in phases.items()
            },
        },
    )

"""torpor's overhead over the bare protocol, measured side by side in one run.

One simulated PV guest; a cycle is a suspend (xenstore handshake) and a
cooperative resume.  The baseline does the minimal protocol steps by hand on
*the same* xenstore connection and *the same* hypervisor backend torpor uses:
write ``control/shutdown``, wait for the ack, wait for the shutdown through a
standing ``@releaseDomain`` watch, ``resume(fast=1)``, ``XS_RESUME``.
Rounds alternate baseline and torpor so load on the machine hits both alike.
Target: torpor / baseline <= 1.10 (median).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from torpor.orchestrator import Torpor
from torpor.sim.host import SimHost

ROUNDS = 30
CYCLES_PER_ROUND = 20


def bare_cycle(xs: Any, hv: Any, domid: int, released: threading.Event) -> None:
    path = f"/local/domain/{domid}/control/shutdown"
    xs.write(path, "suspend")
    xs.wait(path, lambda v: v != "suspend", timeout=10)
    deadline = time.monotonic() + 10
    while not hv.domain_info(domid).suspended:
        released.clear()
        if hv.domain_info(domid).suspended:
            break
        if not released.wait(max(deadline - time.monotonic(), 0)):
            raise AssertionError("guest did not suspend")
    hv.resume(domid, fast=True)
    xs.resume(domid)


def test_overhead_suspend_resume(sim_host: SimHost, record: Any) -> None:
    domid = sim_host.create_guest("pv")
    t = Torpor(sim_host.toolstack_host(), own_host=True)
    xs, hv = t.host.xenstore, t.host.hypervisor  # shared by torpor and the baseline
    released = threading.Event()
    watch = xs.watch("@releaseDomain", lambda _p, _t: released.set())
    try:
        for _ in range(CYCLES_PER_ROUND):  # warm up both
            bare_cycle(xs, hv, domid, released)
            t.suspend(domid)
            t.resume(domid)
        base: list[float] = []
        torpor: list[float] = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            for _ in range(CYCLES_PER_ROUND):
                bare_cycle(xs, hv, domid, released)
            base.append((time.perf_counter() - t0) / CYCLES_PER_ROUND)
            t0 = time.perf_counter()
            for _ in range(CYCLES_PER_ROUND):
                t.suspend(domid)
                t.resume(domid)
            torpor.append((time.perf_counter() - t0) / CYCLES_PER_ROUND)
    finally:
        watch.unwatch()
        t.close()
    ratio = statistics.median(torpor) / statistics.median(base)
    record("overhead", {
        "baseline_ms": _summary(base), "torpor_ms": _summary(torpor),
        "ratio": round(ratio, 3), "target": 1.10,
    })


def _summary(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4)
    return {"median": round(statistics.median(xs) * 1000, 3),
            "iqr": round((q[2] - q[0]) * 1000, 3),
            "min": round(min(xs) * 1000, 3)}

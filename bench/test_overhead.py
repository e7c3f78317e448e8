"""torpor's overhead over the bare protocol, measured side by side in one run.

One simulated PV guest; a cycle is a suspend (xenstore handshake) and a
cooperative resume.  The baselines do the minimal protocol steps by hand on
*the same* xenstore connection and *the same* hypervisor backend torpor uses:
write ``control/shutdown``, wait for the ack, wait for the shutdown through a
standing ``@releaseDomain`` watch, ``resume(fast=1)``, ``XS_RESUME``:

* ``baseline_async``: written with the adapter's asyncio API and run on the
  very event loop torpor's synchronous facade uses, entered the same way --
  the comparison the target is about (torpor's orchestration vs. none);
* ``baseline_sync``: written with the adapter's blocking API from the
  calling thread (no event loop at all), for reference.

Rounds alternate them so load on the machine hits them alike.
Targets (medians, torpor / baseline_async): in process <= 1.25 with intent
records on and <= 1.10 without; against a daemon <= 1.30.

Measured twice: against a simulated host in this process (xenstored, the
hypervisor model and the guest share torpor's GIL, so none of torpor's work
overlaps theirs) and against a ``torpor sim`` daemon in another process, as a
dom0 toolstack talks to a separate xenstored and hypervisor.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

from torpor.facade import Torpor
from torpor.host import Host
from torpor_sim import daemon
from torpor_sim.host import SimHost

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


async def bare_cycle_async(xs: Any, hv: Any, domid: int, released: asyncio.Event) -> None:
    path = f"/local/domain/{domid}/control/shutdown"
    await xs.write(path, "suspend")
    await xs.wait(path, lambda v: v != "suspend", timeout=10)
    while True:
        released.clear()
        if hv.domain_info(domid).suspended:
            break
        await asyncio.wait_for(released.wait(), 10)
    hv.resume(domid, fast=True)
    await xs.resume(domid)


def test_overhead_suspend_resume(sim_host: SimHost, record: Any) -> None:
    domid = sim_host.create_guest("pv")
    t = Torpor(sim_host.toolstack_host(), own_host=True)
    lean = Torpor(sim_host.toolstack_host(), own_host=True, record_intent=False)
    record("overhead", {**_measure(t, lean, domid), "target": 1.25, "target_no_intent": 1.10})


def test_overhead_suspend_resume_daemon(short_dir: str, record: Any) -> None:
    (guest,) = daemon.start(short_dir, ["pv"], qemu=False)
    try:
        t = Torpor(Host.sim(short_dir), own_host=True)
        lean = Torpor(Host.sim(short_dir), own_host=True, record_intent=False)
        record("overhead_daemon", {**_measure(t, lean, int(guest["domid"])), "target": 1.30})
    finally:
        daemon.stop(short_dir)


def _measure(t: Torpor, lean: Torpor, domid: int) -> dict[str, Any]:
    xs, hv = t.host.xenstore, t.host.hypervisor  # shared by torpor and the baseline
    released = threading.Event()
    watch = xs.watch("@releaseDomain", lambda _p, _t: released.set())
    aio_released = asyncio.Event()

    async def arm() -> Any:
        return await xs.aio.watch("@releaseDomain", lambda _p, _t: aio_released.set())

    aio_watch = t._run(arm())

    def async_cycle() -> None:
        t._run(bare_cycle_async(xs.aio, hv, domid, aio_released))

    try:
        for _ in range(CYCLES_PER_ROUND):  # warm up all three
            bare_cycle(xs, hv, domid, released)
            async_cycle()
            t.suspend(domid)
            t.resume(domid)
            lean.suspend(domid)
            lean.resume(domid)
        base: list[float] = []
        no_intent: list[float] = []
        base_async: list[float] = []
        torpor: list[float] = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            for _ in range(CYCLES_PER_ROUND):
                bare_cycle(xs, hv, domid, released)
            base.append((time.perf_counter() - t0) / CYCLES_PER_ROUND)
            t0 = time.perf_counter()
            for _ in range(CYCLES_PER_ROUND):
                async_cycle()
            base_async.append((time.perf_counter() - t0) / CYCLES_PER_ROUND)
            t0 = time.perf_counter()
            for _ in range(CYCLES_PER_ROUND):
                t.suspend(domid)
                t.resume(domid)
            torpor.append((time.perf_counter() - t0) / CYCLES_PER_ROUND)
            t0 = time.perf_counter()
            for _ in range(CYCLES_PER_ROUND):
                lean.suspend(domid)
                lean.resume(domid)
            no_intent.append((time.perf_counter() - t0) / CYCLES_PER_ROUND)
    finally:
        watch.unwatch()
        t._run(xs.aio.unwatch(aio_watch))
        t.close()
        lean.close()
    return {
        "baseline_sync_ms": _summary(base),
        "baseline_async_ms": _summary(base_async),
        "torpor_ms": _summary(torpor),
        "ratio": round(statistics.median(torpor) / statistics.median(base_async), 3),
        "ratio_vs_sync": round(statistics.median(torpor) / statistics.median(base), 3),
        "torpor_no_intent_ms": _summary(no_intent),
        "ratio_no_intent": round(statistics.median(no_intent) / statistics.median(base_async), 3),
    }


def _summary(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4)
    return {
        "median": round(statistics.median(xs) * 1000, 3),
        "iqr": round((q[2] - q[0]) * 1000, 3),
        "min": round(min(xs) * 1000, 3),
    }

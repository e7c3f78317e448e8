"""Host-wide suspend: N guests suspended then resumed together vs. one by one.

Each simulated guest takes 100 ms to freeze its tasks.  The guests live in a
``torpor sim`` daemon (another process), so torpor's own threads and memory
are what is measured here.  Target: N = 1000 suspended and resumed in <= 3 s
wall on 2 cores; time at most linear in N; threads independent of N.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Any

import pytest

from torpor.facade import Torpor
from torpor.host import Host
from torpor_sim import daemon

FREEZE = 0.1
SIZES = [int(n) for n in os.environ.get("TORPOR_BENCH_SIZES", "10,100,1000").split(",")]
SEQUENTIAL_MAX = int(os.environ.get("TORPOR_BENCH_SEQUENTIAL_MAX", "1000"))


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (peak RSS) for this process (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _ThreadPeak:
    def __init__(self) -> None:
        self.peak = threading.active_count()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, threading.active_count() - 1)  # not counting itself

    def __enter__(self) -> _ThreadPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


@pytest.mark.parametrize("n", SIZES)
def test_hostwide_suspend_resume(short_dir: str, record: Any, n: int) -> None:
    d = os.path.join(short_dir, f"h{n}")
    t0 = time.monotonic()
    daemon.start(d, ["pv"] * n, freeze_time=FREEZE, timeout=900)
    boot = time.monotonic() - t0
    try:
        with Torpor(Host.sim(d), own_host=True) as t:
            doms = list(range(1, n + 1))
            t.suspend(1)  # warm up the connection and monitor
            t.resume(1)
            _reset_peak_rss()
            rss0 = _peak_rss_kb()
            with _ThreadPeak() as threads:
                t0 = time.monotonic()
                suspended = t.suspend_many(doms)
                t1 = time.monotonic()
                resumed = t.resume_many(doms)
                t2 = time.monotonic()
            failures = [r for r in [*suspended, *resumed] if not hasattr(r, "outcome")]
            assert not failures, failures[:3]
            bulk_rss = _peak_rss_kb()
            seq: dict[str, float] | None = None
            if n <= SEQUENTIAL_MAX:
                t3 = time.monotonic()
                for dom in doms:
                    t.suspend(dom)
                t4 = time.monotonic()
                for dom in doms:
                    t.resume(dom)
                t5 = time.monotonic()
                seq = {
                    "suspend_s": round(t4 - t3, 3),
                    "resume_s": round(t5 - t4, 3),
                    "total_s": round(t5 - t3, 3),
                }
    finally:
        daemon.stop(d)
    bulk_total = t2 - t0
    record(
        f"hostwide_{n}",
        {
            "guests": n,
            "freeze_s": FREEZE,
            "daemon_boot_s": round(boot, 2),
            "bulk": {
                "suspend_s": round(t1 - t0, 3),
                "resume_s": round(t2 - t1, 3),
                "total_s": round(bulk_total, 3),
            },
            "sequential": seq,
            "speedup": round(seq["total_s"] / bulk_total, 1) if seq else None,
            "peak_threads": threads.peak,
            "peak_rss_kb": bulk_rss,
            "rss_growth_kb": bulk_rss - rss0,
            "target_total_s": 3.0 if n == 1000 else None,
        },
    )

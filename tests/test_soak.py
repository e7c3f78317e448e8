"""Soak: thousands of suspend/resume cycles; file descriptors, threads and RSS stay flat.

torpor runs in this process against a `torpor sim` daemon in another, so what
is measured is torpor's own footprint.  ``TORPOR_SOAK_CYCLES`` sets the length
(CI: 2,000; ``make soak``: 10,000).  The slope of RSS over cycles is reported
(``TORPOR_SOAK_REPORT=path`` writes it as JSON) and must be below a small bound
once the first samples have warmed the allocator.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator

import pytest

from torpor.facade import Torpor
from torpor.host import Host
from torpor_sim import daemon
from torpor_sim.guest import Behaviour

CYCLES = int(os.environ.get("TORPOR_SOAK_CYCLES", "2000"))
SAMPLES = 10
#: Growth torpor may show per 1,000 cycles after warm-up (allocator noise).
MAX_KB_PER_1000 = 64.0


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


@pytest.fixture
def soak_host(short_dir: str) -> Iterator[str]:
    daemon.start(short_dir, ["pv", "pv"])
    yield short_dir
    daemon.stop(short_dir)


def test_soak_suspend_resume_cycles(soak_host: str) -> None:
    samples: list[tuple[int, int, int, int]] = []  # cycles, rss kB, fds, threads
    step = max(CYCLES // SAMPLES, 1)
    with Torpor(Host.sim(soak_host), own_host=True) as t:
        for i in range(CYCLES):
            domid = 1 + i % 2  # two guests, alternating
            t.suspend(domid)
            t.resume(domid)
            if i % step == 0:
                samples.append(
                    (i, _rss_kb(), len(os.listdir("/proc/self/fd")), threading.active_count())
                )
        # The guests went through every cycle and still run, counting.
        for domid in (1, 2):
            assert t.status(domid)["state"] == "running"
    warm = samples[SAMPLES // 3 :]  # the first samples warm caches and the allocator
    xs = [float(c) for c, *_ in warm]
    rss_slope = _slope(xs, [float(r) for _, r, _, _ in warm]) * 1000
    fd_slope = _slope(xs, [float(f) for _, _, f, _ in warm]) * 1000
    thread_slope = _slope(xs, [float(th) for *_, th in warm]) * 1000
    report = {
        "cycles": CYCLES,
        "rss_kb_per_1000_cycles": round(rss_slope, 2),
        "fds_per_1000_cycles": round(fd_slope, 3),
        "threads_per_1000_cycles": round(thread_slope, 3),
        "rss_kb": [r for _, r, _, _ in samples],
        # After warm-up (each domain's lock file is opened once, on first use).
        "fds": sorted({f for _, _, f, _ in warm}),
        "threads": sorted({th for *_, th in warm}),
    }
    print(json.dumps(report))
    if os.environ.get("TORPOR_SOAK_REPORT"):
        with open(os.environ["TORPOR_SOAK_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    assert len(report["fds"]) == 1, f"file descriptors changed: {report['fds']}"
    assert len(report["threads"]) == 1, f"threads changed: {report['threads']}"
    assert rss_slope < MAX_KB_PER_1000, f"RSS grows {rss_slope:.1f} kB per 1000 cycles"


def test_soak_daemon_side_stays_bounded(short_dir: str) -> None:
    """The simulator itself must not grow with cycles either (its guests' logs are bounded)."""
    from torpor_sim.host import SimHost

    host = SimHost(short_dir, qemu=False)
    host.start()
    try:
        domid = host.create_guest("pv", behaviour=Behaviour())
        with Torpor(host.toolstack_host(), own_host=True) as t:
            for _ in range(min(CYCLES, 1000)):
                t.checkpoint(domid)
        assert len(host.guest(domid).log) <= 200
    finally:
        host.stop()

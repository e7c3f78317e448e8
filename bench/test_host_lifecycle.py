"""Host-wide save and restore on the simulated host: `save_all` vs a sequential loop.

N simulated PV guests (each taking 100 ms to freeze) in a ``torpor sim``
daemon: ``Torpor.save_all`` (what ``torpor host save-all`` runs) at the
default concurrency, then ``restore_all``; against a loop that saves them
one after another with ``Torpor.save`` and restores them one after another
-- what xendomains does with ``xl save`` / ``xl restore``.  Then, for the
default concurrency: save-all of 100 guests at several concurrencies, and
this machine's disk writing eight fsynced 64 MiB files at several
concurrencies (a save is a stream of guest memory to disk).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any

import pytest

from torpor.facade import Torpor
from torpor.host import Host
from torpor.operations.hostwide import DEFAULT_CONCURRENCY
from torpor_sim import daemon

FREEZE = 0.1
SIZES = [int(n) for n in os.environ.get("TORPOR_BENCH_HOST_SIZES", "10,100").split(",")]


def _when() -> str:
    """When and on what: this section may be measured apart from the rest of the report."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"{stamp} on {cpu}, {os.cpu_count()} cores"


@pytest.mark.parametrize("n", SIZES)
def test_host_save_all_vs_sequential(short_dir: str, record: Any, n: int) -> None:
    d = os.path.join(short_dir, f"h{n}")
    daemon.start(d, ["pv"] * n, freeze_time=FREEZE, timeout=900)
    try:
        with Torpor(Host.sim(d), own_host=True) as t, tempfile.TemporaryDirectory() as save:
            t0 = time.monotonic()
            saved = t.save_all(save)
            t1 = time.monotonic()
            restored = t.restore_all(save)
            t2 = time.monotonic()
            assert saved.count("saved") == n, saved.to_dict()
            assert restored.count("restored") == n, restored.to_dict()
            doms = sorted(d["domid"] for d in t.list_domains())
            t3 = time.monotonic()
            for dom in doms:
                t.save(dom, os.path.join(save, f"{dom}.save"))
            t4 = time.monotonic()
            for dom in doms:
                t.restore(os.path.join(save, f"{dom}.save"))
                os.unlink(os.path.join(save, f"{dom}.save"))
            t5 = time.monotonic()
    finally:
        daemon.stop(d)
    bulk, seq = t2 - t0, t5 - t3
    record(
        f"host_lifecycle_{n}",
        {
            "guests": n,
            "freeze_s": FREEZE,
            "concurrency": saved.concurrency,
            "bytes": saved.bytes,
            "save_all_s": round(t1 - t0, 3),
            "restore_all_s": round(t2 - t1, 3),
            "sequential_save_s": round(t4 - t3, 3),
            "sequential_restore_s": round(t5 - t4, 3),
            "speedup": round(seq / bulk, 1),
            "measured": _when(),
        },
    )


def test_save_all_concurrency_sweep(short_dir: str, record: Any) -> None:
    n = 100
    d = os.path.join(short_dir, "sweep")
    daemon.start(d, ["pv"] * n, freeze_time=FREEZE, timeout=900)
    out: dict[str, float] = {}
    try:
        with Torpor(Host.sim(d), own_host=True) as t, tempfile.TemporaryDirectory() as save:
            for c in (1, 2, 4, 8, 16, 64):
                t0 = time.monotonic()
                rep = t.save_all(save, concurrency=c)
                out[str(c)] = round(time.monotonic() - t0, 3)
                assert rep.count("saved") == n
                assert t.restore_all(save).count("restored") == n
    finally:
        daemon.stop(d)
    record("host_lifecycle_sweep", {"guests": n, "freeze_s": FREEZE, "save_all_s": out})


def _write(path: str, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def test_disk_write_concurrency(record: Any) -> None:
    """Eight 64 MiB files, fsynced, written by 1, 2, 4, 8 writers at a time."""
    files, size = 8, 64 << 20
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TORPOR_BENCH_DISK", "/var/tmp")) as tmp:
        for c in (1, 2, 4, 8):
            sem = threading.Semaphore(c)

            def one(i: int, sem: threading.Semaphore = sem) -> None:
                with sem:
                    _write(os.path.join(tmp, f"f{i}"), size)

            t0 = time.monotonic()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(files)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            out[str(c)] = round(files * size / (time.monotonic() - t0) / 2**20, 1)
            for i in range(files):
                os.unlink(os.path.join(tmp, f"f{i}"))
    record(
        "host_lifecycle_disk",
        {"files": files, "mib_each": size >> 20, "mib_per_s": out, "default": DEFAULT_CONCURRENCY},
    )

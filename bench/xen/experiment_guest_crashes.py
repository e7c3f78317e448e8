"""Do lab guests crash during xl's own migrations when dom0 is busy?

Not collected by default (its name is not ``test_*.py``); run it by path::

    python3 lab/run --results DIR -- bench/xen/experiment_guest_crashes.py

Why it exists: in the migration benchmark (test_migrate_downtime.py) PVH
and PVHVM guests triple-faulted now and then -- in a domain ``xl create``
built, in one xl's receiver built, in one torpor's receiver built -- three
times during a torpor sender's precopy, once seconds after a torpor ->
torpor migration.  Was torpor doing it?  Here no torpor
process runs: a PVHVM guest ticking every 50 ms is migrated to ``localhost``
by ``xl migrate`` alone, ``N`` times with two CPU-bound processes in dom0
(the load a Python command puts on an emulated CPU), then ``N`` times with
none.  Each crash is judged as the benchmark judges it (the hypervisor's
shutdown reason and ``xl dmesg``), recorded, and the guest replaced.  The
counts go to ``<results>/crash-experiment.json``; docs/real-xen.md keeps
what a run found.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import test_migrate_downtime as bench
import xenlab

N = 20


@pytest.fixture
def no_crash_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "MAX_CRASHES", 10 * N)


@pytest.mark.timeout(3000)
@pytest.mark.parametrize("burners", [2, 0])
@pytest.mark.usefixtures("no_crash_limit")
def test_xl_only_migrations_with_and_without_a_busy_dom0(
    make_guest: bench.MakeGuest, xc: xenlab.XenCtrl, burners: int
) -> None:
    load = [subprocess.Popen(["python3", "-c", "while True: pass"]) for _ in range(burners)]
    crashes: list[dict[str, Any]] = []
    try:
        runs = bench.alternate(
            make_guest, xc, "pvhvm", lambda name: [("xl", bench.ways(name)["xl"])], N, crashes
        )
    finally:
        for p in load:
            p.kill()
            p.wait()
    out = os.environ.get("TORPOR_LAB_OUT")
    if out:
        path = Path(out, "crash-experiment.json")
        found = json.loads(path.read_text()) if path.exists() else {}
        found[f"burners_{burners}"] = {
            "migrations": len(runs["xl"]) + len(crashes),
            "crashes": crashes,
            "totals": [r["total"] for r in runs["xl"]],
        }
        path.write_text(json.dumps(found, indent=1) + "\n")

"""The CLI's fixed cost: ``torpor --json suspend`` start-up vs. ``python -c pass``.

Measured side by side in the same run (alternating), against a ``torpor sim``
daemon: interpreter start, imports, plugin loading, connecting, the
operation itself.  ``import_ms`` is ``python -X importtime`` of ``torpor.cli``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

from torpor_sim import daemon

RUNS = 15


def _time(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def test_cli_fixed_cost(short_dir: str, record: Any) -> None:
    daemon.start(short_dir, ["pv"])
    env = {**os.environ, "TORPOR_HOST": f"sim:{short_dir}"}
    torpor = [sys.executable, "-m", "torpor.cli", "--json"]
    try:
        bare, help_, op = [], [], []
        for i in range(RUNS):
            bare.append(_time([sys.executable, "-c", "pass"], env))
            help_.append(_time([sys.executable, "-m", "torpor.cli", "--help"], env))
            op.append(_time([*torpor, "suspend" if i % 2 == 0 else "resume", "1"], env))
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import torpor.cli"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr.splitlines()
    finally:
        daemon.stop(short_dir)
    cumulative = [
        int(line.split("|")[1])
        for line in out
        if line.startswith("import time:") and line.split("|")[1].strip().isdigit()
    ]
    record(
        "cli",
        {
            "python_pass_ms": round(statistics.median(bare) * 1000, 1),
            "torpor_help_ms": round(statistics.median(help_) * 1000, 1),
            "torpor_json_suspend_or_resume_ms": round(statistics.median(op) * 1000, 1),
            "ratio_suspend_vs_python": round(statistics.median(op) / statistics.median(bare), 2),
            "ratio_help_vs_python": round(statistics.median(help_) / statistics.median(bare), 2),
            "import_torpor_cli_ms": round(max(cumulative) / 1000, 1) if cumulative else None,
        },
    )

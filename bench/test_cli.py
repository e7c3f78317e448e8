"""The CLI's fixed cost: whole ``torpor`` processes vs. ``python -c pass``.

Measured side by side in the same run (alternating), against a ``torpor sim``
daemon, with the venv's ``torpor`` script: ``--help``, ``--json suspend N`` /
``resume N`` (alternately, so the guest is in the state each expects) and
``list``; interpreter start, imports, plugin loading, connecting, the
operation itself.  For scale, the *floor*: a process that only imports the
libraries an operation cannot do without (asyncio, attrs, pluggy, pyxs).
``imports`` is ``python -X importtime`` of ``torpor --json list``: the
milliseconds of each top-level import, grouped (torpor's own modules, asyncio,
attrs, pluggy, pyxs, the rest).

The sources are byte-compiled first, as ``pip install`` leaves them: with
``PYTHONDONTWRITEBYTECODE`` set (this workplace's shells set it) a module
edited since its ``.pyc`` was written would otherwise be compiled again by
every process timed -- milliseconds each, which once went into these numbers.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

from importtime import group_imports

from torpor_sim import daemon

RUNS = 21


def _time(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _imports(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    err = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stderr
    return group_imports(err, ("asyncio", "attrs", "pluggy", "pyxs"))


def compile_sources() -> None:
    """Byte-compile what a ``torpor`` process imports (stale ``.pyc`` only):
    torpor, the simulator, and every plugin package the ``torpor`` entry
    points name (the built-ins, and the examples where installed)."""
    import compileall
    import importlib
    from importlib.metadata import entry_points

    names = {"torpor", "torpor_sim"} | {
        ep.value.split(":")[0].split(".")[0] for ep in entry_points(group="torpor")
    }
    for name in sorted(names):
        for path in importlib.import_module(name).__path__:
            assert compileall.compile_dir(path, quiet=1), f"cannot compile {path}"


def test_cli_fixed_cost(short_dir: str, record: Any) -> None:
    compile_sources()
    daemon.start(short_dir, ["pv"])
    env = {**os.environ, "TORPOR_HOST": f"sim:{short_dir}"}
    script = os.path.join(os.path.dirname(sys.executable), "torpor")
    torpor = [script] if os.path.exists(script) else [sys.executable, "-m", "torpor.cli"]
    floor_argv = [sys.executable, "-c", "import asyncio, attrs, pluggy, pyxs"]
    try:
        bare, floor, help_, op, listing = [], [], [], [], []
        for i in range(RUNS):
            bare.append(_time([sys.executable, "-c", "pass"], env))
            floor.append(_time(floor_argv, env))
            help_.append(_time([*torpor, "--help"], env))
            op.append(_time([*torpor, "--json", "suspend" if i % 2 == 0 else "resume", "1"], env))
            listing.append(_time([*torpor, "list"], env))
        if len(op) % 2:  # leave the guest running
            subprocess.run(
                [*torpor, "resume", "1"], check=False, env=env, stdout=subprocess.DEVNULL
            )
        imports = _imports(["-m", "torpor.cli", "--json", "list"], env)
    finally:
        daemon.stop(short_dir)
    base = statistics.median(bare)

    def ms(xs: list[float]) -> float:
        return round(statistics.median(xs) * 1000, 1)

    record(
        "cli",
        {
            "python_pass_ms": ms(bare),
            "floor_imports_ms": ms(floor),
            "torpor_help_ms": ms(help_),
            "torpor_json_suspend_or_resume_ms": ms(op),
            "torpor_list_ms": ms(listing),
            "ratio_suspend_vs_python": round(statistics.median(op) / base, 2),
            "ratio_list_vs_python": round(statistics.median(listing) / base, 2),
            "ratio_help_vs_python": round(statistics.median(help_) / base, 2),
            "ratio_floor_vs_python": round(statistics.median(floor) / base, 2),
            "imports_ms_list": imports,
            "target": 3.0,
        },
    )

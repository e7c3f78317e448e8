"""Benchmark fixtures: simulated hosts, in process and as daemons."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from torpor_sim.host import SimHost


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="tb", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sim_host(short_dir: str) -> Iterator[SimHost]:
    host = SimHost(short_dir, qemu=False, name="bench")
    host.start()
    yield host
    host.stop()


_results: dict[str, object] = {}


@pytest.fixture
def record() -> object:
    """record(name, data): keep a benchmark's numbers for the report."""

    def put(name: str, data: object) -> None:
        _results[name] = data
        print(f"\n{name}: {data}")

    return put


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import json
    import os

    out = os.environ.get("TORPOR_BENCH_JSON")
    if out and _results:
        existing: dict[str, object] = {}
        if os.path.exists(out):
            with open(out) as f:
                existing = json.load(f)
        existing.update(_results)
        with open(out, "w") as f:
            json.dump(existing, f, indent=1, sort_keys=True)

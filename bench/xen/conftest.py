"""Fixtures for the real-Xen benchmark (bench/xen): the lab's, from tests/xen.

These benchmarks run only in the lab's dom0 (`make bench-xen`); anywhere else
they are skipped, like tests/xen.  The fixtures are the lab's oracles
(tests/xen/xenlab.py), deliberately independent of torpor.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests" / "xen"))
import xenlab  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    on_xen = xenlab.in_dom0()
    skip = pytest.mark.skip(reason="needs a Xen dom0: run `make bench-xen` (the real-Xen lab)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.xen)
            if not on_xen:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def lab_results() -> Path:
    out = os.environ.get("TORPOR_LAB_OUT")
    return Path(out) if out else Path(tempfile.mkdtemp(prefix="torpor-lab-"))


@pytest.fixture(scope="session")
def xc() -> Iterator[xenlab.XenCtrl]:
    handle = xenlab.XenCtrl()
    yield handle
    handle.close()


@pytest.fixture
def make_guest(lab_results: Path, xc: xenlab.XenCtrl) -> Iterator[Callable[..., xenlab.Guest]]:
    factory = xenlab.GuestFactory(lab_results, xc)
    yield factory.create
    factory.destroy_all()

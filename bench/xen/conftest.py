"""Fixtures for the real-Xen benchmark (bench/xen): the lab's, from tests/xen.

These benchmarks run only in the lab's dom0 (`make bench-xen`); anywhere else
they are skipped, like tests/xen.  The fixtures are the lab's oracles
(tests/xen/xenlab.py), deliberately independent of torpor.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests" / "xen"))
sys.path.insert(0, str(HERE.parent))  # bench/: importtime.py
from labfixtures import lab_results, make_guest, mark_lab_items, xc  # noqa: E402

__all__ = ["lab_results", "make_guest", "xc"]  # fixtures, registered by being here


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_lab_items(items, HERE, "make bench-xen")

"""The lab's pytest fixtures and collection rule, shared by tests/xen and bench/xen.

Each of those folders' conftest.py imports the fixtures from here (so pytest
registers them there) and calls :func:`mark_lab_items` from its own
``pytest_collection_modifyitems``.  They are the lab's oracles
(``xenlab.py``), deliberately independent of torpor.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xenlab


def mark_lab_items(items: list[pytest.Item], folder: Path, command: str) -> None:
    """Mark every item under ``folder`` ``xen``; skip them outside a Xen dom0."""
    on_xen = xenlab.in_dom0()
    skip = pytest.mark.skip(reason=f"needs a Xen dom0: run `{command}` (the real-Xen lab)")
    for item in items:
        if folder in Path(item.path).resolve().parents:
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

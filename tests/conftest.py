"""Shared fixtures: an in-process simulated host and an orchestrator on it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from torpor.facade import Torpor
from torpor_sim.host import SimHost


@pytest.fixture
def short_dir() -> Iterator[str]:
    # AF_UNIX socket paths are limited to 108 bytes: keep the directory short.
    d = tempfile.mkdtemp(prefix="tp", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sim_host(short_dir: str) -> Iterator[SimHost]:
    host = SimHost(short_dir, qemu=False)
    host.start()
    yield host
    host.stop()


@pytest.fixture
def torpor(sim_host: SimHost) -> Iterator[Torpor]:
    t = Torpor(sim_host.toolstack_host(), own_host=True)
    yield t
    t.close()

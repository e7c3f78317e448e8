"""Fixtures for the simulated xenstored's tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pyxs

from torpor_sim.xenstored import XenstoredThread

from .xs_helpers import FakeHypervisor, LoopSim, RawXs

GUESTS = (1, 2)


class Served:
    """A XenstoredThread serving dom0's socket and one socket per guest domid."""

    def __init__(self, thread: XenstoredThread, root: str) -> None:
        self.thread = thread
        self.root = root
        self.sock = os.path.join(root, "xs")

    @property
    def xs(self) -> Any:
        return self.thread.xenstored

    def guest(self, domid: int) -> str:
        return os.path.join(self.root, f"g{domid}")

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.thread.call(fn, *args)


@pytest.fixture
def sockdir() -> Iterator[str]:
    # AF_UNIX paths are limited to 108 bytes: keep them short.
    d = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def hv() -> FakeHypervisor:
    h = FakeHypervisor()
    for d in GUESTS:
        h.create(d)
    return h


@pytest.fixture
def served(sockdir: str, hv: FakeHypervisor) -> Iterator[Served]:
    guests = {d: os.path.join(sockdir, f"g{d}") for d in GUESTS}
    thread = XenstoredThread(os.path.join(sockdir, "xs"), domain_info=hv, guest_sockets=guests)
    thread.start()
    try:
        yield Served(thread, sockdir)
    finally:
        thread.stop()


@pytest.fixture
def raw(served: Served) -> Iterator[Callable[..., RawXs]]:
    made: list[RawXs] = []

    def make(domid: int = 0) -> RawXs:
        c = RawXs(served.sock if domid == 0 else served.guest(domid))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def pyxs_client(served: Served) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(domid: int = 0, su: bool = False) -> Any:
        c = pyxs.Client(unix_socket_path=served.sock if domid == 0 else served.guest(domid))
        # pyxs refuses privileged calls client-side unless SU (a pyxs quirk).
        c.SU = su
        c.connect()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def sim(hv: FakeHypervisor) -> Iterator[LoopSim]:
    s = LoopSim(domain_info=hv)
    yield s
    s.close()

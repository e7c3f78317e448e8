"""Helpers for the HVM device-model tests: both models, one harness.

``KINDS`` parametrizes a test over real QEMU (marked ``qemu``, skipped with a
reason where ``qemu-system-x86_64`` is absent) and the in-process model.
``no_leaked_qemu`` asserts that a test left no QEMU process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from torpor.qmp import QmpClient
from torpor_sim.devicemodel import DeviceModelBase
from torpor_sim.fake_qemu import FakeDeviceModel
from torpor_sim.qemu import QemuDeviceModel, qemu_binary, running_qemu_pids

T = TypeVar("T")

HAVE_QEMU = qemu_binary() is not None
QEMU_MARKS = [
    pytest.mark.qemu,
    pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 is not installed"),
]
KINDS = [
    pytest.param("qemu", marks=QEMU_MARKS, id="qemu"),
    pytest.param("in-process", id="in-process"),
]
#: Generous per-step deadline: a step that hangs fails well inside pytest-timeout.
STEP = 10.0


def arun(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run one test coroutine on a fresh event loop, bounded."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def new_model(kind: str, **kw: Any) -> DeviceModelBase:
    if kind == "qemu":
        return QemuDeviceModel(**kw)
    return FakeDeviceModel(**kw)


@contextlib.asynccontextmanager
async def running(kind: str, **kw: Any) -> AsyncIterator[tuple[DeviceModelBase, QmpClient]]:
    """A started device model and a QMP client connected to its socket."""
    dm = new_model(kind, **kw)
    qmp = QmpClient(domid=kw.get("domid"))
    try:
        await dm.start(timeout=STEP)
        await qmp.connect(dm.qmp_path, timeout=STEP)
        yield dm, qmp
    finally:
        await qmp.close()
        await dm.stop()


def with_model(
    kind: str, body: Callable[[DeviceModelBase, QmpClient], Awaitable[None]], **kw: Any
) -> None:
    async def main() -> None:
        async with running(kind, **kw) as (dm, qmp):
            await body(dm, qmp)

    arun(main())


@pytest.fixture
def no_leaked_qemu() -> Iterator[None]:
    assert running_qemu_pids() == [], "a QEMU was left over by an earlier test"
    yield
    assert running_qemu_pids() == [], "this test left a QEMU process running"

"""The fault matrix: every guest misbehaviour and toolstack-side fault x every guest type.

Each cell checks that the fault ends in the specific documented error within
its deadline, that the domain is left in the documented state -- read from
the simulated hypervisor and device model themselves after the operation
(``SimHost.observed_state``), and equal to the state torpor's error names --
that the guest's memory is intact (its content is exactly what its own work
wrote), and that nothing leaked (watches, threads, file descriptors, QEMU
processes).  Set ``TORPOR_RELIABILITY_REPORT=docs/reliability.md`` to write
the matrix from the run (``make reliability``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from reliability_report import write_section

from torpor import hookimpl
from torpor.errors import (
    DomainVanished,
    OperationError,
    ResumeFailed,
    TorporError,
)
from torpor.facade import Torpor
from torpor.model import Phase, SuspendMethod, Timeouts
from torpor.plugins import get_plugin_manager
from torpor.testing.suite import expected_failure
from torpor_sim.guest import MISBEHAVIOURS, Behaviour
from torpor_sim.host import SimHost

try:
    import torpor_pvh.plugin  # noqa: F401  (the example third-party plugin)

    KINDS = ("pv", "pvhvm", "hvm", "pvh")
except ImportError:  # pragma: no cover - CI installs it
    KINDS = ("pv", "pvhvm", "hvm")

METHOD = {
    "pv": SuspendMethod.XENSTORE,
    "pvhvm": SuspendMethod.XENSTORE,
    "pvh": SuspendMethod.XENSTORE,
    "hvm": SuspendMethod.ACPI_S3,
}
TIMEOUTS = Timeouts(ack=0.3, suspend=0.6, resume=5.0, device_model=2.0)
SLACK = 2.0  # seconds beyond the deadline a failure may take (shared, noisy machines)
TOOLSTACK_FAULTS = (
    "device_model_dies",
    "xenstore_connection_drops",
    "hypervisor_errors",
    "domain_destroyed",
)


@attrs.frozen
class Cell:
    kind: str
    fault: str
    error: str
    phase: str
    state: str  # observed on the simulated host after the operation
    reported: str  # what torpor's error (or result) said
    seconds: float
    deadline: float
    memory: str  # "intact", "DAMAGED", or "n/a: why"
    leaks: str


_rows: list[Cell] = []


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    target = os.environ.get("TORPOR_RELIABILITY_REPORT")
    if target and _rows:
        _write_report(target, _rows)


def _write_report(path: str, rows: list[Cell]) -> None:
    lines = [
        "| guest | fault | error | phase | left | time (s) | deadline (s) | memory | leaks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (KINDS.index(r.kind), r.fault)):
        lines.append(
            f"| {r.kind} | {r.fault} | {r.error} | {r.phase} | {r.state} | {r.seconds:.2f} "
            f"| {r.deadline:.1f} | {r.memory} | {r.leaks} |"
        )
    lines += [
        "",
        f"{len(rows)} cells, "
        f"{sum(1 for r in rows if r.memory != 'DAMAGED' and r.leaks == 'none')} clean.",
    ]
    write_section(path, "fault-matrix", "\n".join(lines))


def _leak_state(host: SimHost, conns: int | None = None) -> tuple[int, int, int, int]:
    """(watches, threads, fds, QEMU processes).  With ``conns``: first wait until
    the simulated xenstored is back to that many connections and every QMP proxy
    has closed its ends of the connections torpor closed (they live in this
    process, and a hang-up reaches them asynchronously)."""
    from torpor_sim.qemu import running_qemu_pids

    async def watches() -> int:
        assert host.xenstored is not None
        xenstored = host.xenstored
        if conns is not None:
            with contextlib.suppress(TimeoutError):  # still connected: counted below
                await xenstored.wait_until(lambda: xenstored.connection_count() <= conns, 5)
            for guest in list(host.guests.values()):
                proxy = getattr(guest, "proxy", None)
                if proxy is not None:
                    await asyncio.wait_for(proxy.idle(), 5)
        return len(xenstored.watches())

    return (
        host.run(watches()),
        threading.active_count(),
        len(os.listdir("/proc/self/fd")),
        len(running_qemu_pids()),
    )


class _Injector:
    """Does something nasty at the start of one phase (a plugin, as a fault would strike)."""

    def __init__(self, phase: Phase, action: Callable[[Any], None]) -> None:
        self.phase = phase
        self.action = action
        self.fired = False

    @hookimpl
    def torpor_phase_started(self, ctx: Any, phase: Phase) -> None:
        if phase == self.phase and not self.fired:
            self.fired = True
            self.action(ctx)


def _run_cell(host: SimHost, kind: str, fault: str) -> Cell:
    name = fault.split("=", maxsplit=1)[0]
    behaviour = Behaviour.parse(fault) if name in MISBEHAVIOURS else Behaviour()
    if fault == "hypervisor_errors" and kind == "hvm":
        # No agent: the hard suspend, so that the resume calls the hypervisor.
        behaviour = Behaviour(agent=False, frontends=())
    domid = host.create_guest(kind, behaviour=behaviour)
    assert host.xenstored is not None
    conns = host.xenstored.connection_count()
    base = _leak_state(host, conns)
    plugins: list[object] = []
    op = "suspend"
    deadline = TIMEOUTS.ack + TIMEOUTS.suspend
    if fault == "device_model_dies":
        phase = Phase.SHUTDOWN if kind == "hvm" else Phase.DEVICE_MODEL_SUSPEND
        plugins.append(_Injector(phase, lambda ctx: host.run(host.device_models[domid].stop())))
    elif fault == "xenstore_connection_drops":
        plugins.append(_Injector(Phase.REQUEST, lambda ctx: ctx.host.xenstore.close()))
    elif fault == "domain_destroyed":
        plugins.append(_Injector(Phase.SHUTDOWN, lambda ctx: host.destroy_guest(domid)))
    pm = get_plugin_manager(plugins=plugins)
    t = Torpor(host.toolstack_host(), own_host=True, plugin_manager=pm, timeouts=TIMEOUTS)
    error: OperationError | None = None
    t0 = time.monotonic()
    try:
        if fault == "hypervisor_errors":
            op = "resume"
            t.suspend(domid)
            host.xen.fail_ops["resume"] = errno.EIO
            t0 = time.monotonic()
            deadline = TIMEOUTS.resume
        try:
            t.suspend(domid) if op == "suspend" else t.resume(domid)
        except OperationError as e:
            error = e
    finally:
        host.xen.fail_ops.pop("resume", None)
        elapsed = time.monotonic() - t0
        t.close()
    left = host.observed_state(domid)  # the truth, before anything else touches it
    guest = host.guests.get(domid)
    memory = "n/a: domain gone"
    if guest is not None and domid in host.xen.domains:
        try:
            memory = "intact" if host.run(_consistent(guest)) else "DAMAGED"
        except TorporError as e:  # an HVM guest's memory lives in its (dead) QEMU
            memory = f"n/a: {e.message}"
    if op == "resume" and error is not None:
        t2 = Torpor(host.toolstack_host(), own_host=True)
        t2.resume(domid)  # leave it running, as an operator would
        t2.close()
    after = _leak_state(host, conns)
    names = ("watches", "threads", "fds", "qemu")
    leaks = (
        ", ".join(f"{n} {a}->{b}" for n, a, b in zip(names, base, after, strict=True) if b > a)
        or "none"
    )
    return Cell(
        kind,
        fault,
        type(error).__name__ if error else "none (succeeded)",
        str(error.phase) if error else "-",
        left,
        (error.state or "?") if error else "suspended",
        elapsed,
        deadline,
        memory,
        leaks,
    )


async def _consistent(guest: Any) -> bool:
    return bool(guest.memory_consistent())


def _expected(kind: str, fault: str) -> tuple[type[OperationError] | None, str]:
    name = fault.split("=", maxsplit=1)[0]
    if name in MISBEHAVIOURS:
        exp = expected_failure(name, METHOD[kind])
        return exp.error, exp.state
    if fault == "device_model_dies":
        # torpor resumed the domain; QEMU is dead, and the state says so.
        return OperationError, "running, device model gone"
    if fault == "xenstore_connection_drops":
        return OperationError, "running"
    if fault == "hypervisor_errors":
        return ResumeFailed, "suspended"
    if fault == "domain_destroyed":
        return DomainVanished, "gone"
    raise AssertionError(fault)


FAULTS = [*(m if m != "slow_ack" else "slow_ack=5" for m in MISBEHAVIOURS), *TOOLSTACK_FAULTS]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", KINDS)
def test_fault(kind: str, fault: str, short_dir: str) -> None:
    if fault == "device_model_dies" and kind in ("pv", "pvh"):
        pytest.skip(f"a {kind} guest has no device model")
    host = SimHost(short_dir, qemu=False)
    host.start()
    try:
        cell = _run_cell(host, kind, fault)
    finally:
        host.stop()
    _rows.append(cell)
    error, state = _expected(kind, fault)
    if error is None:
        assert cell.error == "none (succeeded)", cell
    else:
        assert cell.error == error.__name__ or (
            error is OperationError and cell.error.endswith(("Error", "Timeout"))
        ), cell
        assert cell.state == state, cell
    assert cell.reported == cell.state, f"torpor reported {cell.reported!r}: {cell}"
    assert cell.seconds <= cell.deadline + SLACK, cell
    if fault == "device_model_dies" and kind == "hvm":
        assert cell.memory.startswith("n/a"), cell  # QEMU *was* the guest
    elif fault != "domain_destroyed" and fault != "vanish":
        assert cell.memory == "intact", cell
    assert cell.leaks == "none", cell

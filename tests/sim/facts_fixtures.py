"""Helpers for driving the simulated host's protocol by hand, as a toolstack would.

Nothing here goes through torpor's orchestrator: a test writes xenstore nodes
with :class:`torpor.xenstore.Xenstore` and calls the hypervisor through
``SimHost.hypervisor()`` (in process) or :class:`RemoteHypervisor` (the
``hypervisor.sock`` a ``torpor sim`` daemon serves).

Every wait is for an event: a xenstore watch (``@releaseDomain``, a node), an
event-channel descriptor becoming readable, a domain state change the
hypervisor model announces.  Where a test must show that something does *not*
happen, it uses a :meth:`ReleaseDomain.fence`: a xenstore round trip on the
connection that holds the watch.  xenstored sends a watch event before the reply
of any request it processes later, and the simulated hypervisor queues
VIRQ_DOM_EXC in xenstored's loop before the state change it reports becomes
visible, so after the fence every event that was going to fire has fired.
Only what has no event at all (a guest that ignores a request) is shown with a
bounded wait, :data:`QUIET`.
"""

from __future__ import annotations

import asyncio
import errno
import select
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from torpor.errors import HypervisorError
from torpor.hypervisor.remote import RemoteHypervisor
from torpor.model import DomainInfo, ShutdownReason
from torpor.xenstore import Xenstore
from torpor_sim.host import SimHost
from torpor_sim.qemu import running_qemu_pids

from .dm_fixtures import KINDS

T = TypeVar("T")

#: Deadline for anything that has an event (it comes in milliseconds).
STEP = 10.0
#: How long a test listens for something that must not happen and has no event.
QUIET = 0.25
#: Guest work: one tick per 10 ms of vCPU time (torpor_sim.guest.TICK_NS).
TICK = 0.01


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["local", "remote"])
def hv(request: pytest.FixtureRequest, sim_host: SimHost) -> Iterator[Any]:
    """The host's hypervisor: in process, or through its ``hypervisor.sock``."""
    h: Any
    if request.param == "local":
        h = sim_host.hypervisor()
    else:
        run = sim_host.dir / "run"  # libxl's suspend event channel locks go here
        run.mkdir(exist_ok=True)
        h = RemoteHypervisor(sim_host.hypervisor_socket, timeout=STEP, lock_dir=str(run))
    yield h
    h.close()


@pytest.fixture
def xs(sim_host: SimHost) -> Iterator[Xenstore]:
    """dom0's toolstack connection to the host's xenstored (a real socket)."""
    x = Xenstore(sim_host.xenstore_socket, timeout=STEP).connect()
    yield x
    x.close()


@pytest.fixture
def release(xs: Xenstore) -> Iterator[ReleaseDomain]:
    r = ReleaseDomain(xs)
    yield r
    r.close()


@pytest.fixture(params=KINDS)
def hvm_host(request: pytest.FixtureRequest, short_dir: str) -> Iterator[SimHost]:
    """A host whose HVM guests run on real QEMU (``qemu``) or the in-process model."""
    before = running_qemu_pids()
    host = SimHost(short_dir, qemu=request.param == "qemu")
    host.start()
    try:
        yield host
    finally:
        host.stop()
    assert running_qemu_pids() == before, "the simulated host left a QEMU behind"


# --------------------------------------------------------------------------- @releaseDomain


class ReleaseDomain:
    """A toolstack's ``@releaseDomain`` watch that counts events.

    The event xenstored fires at registration is consumed here: :attr:`count`
    starts at 0.
    """

    def __init__(self, xs: Xenstore) -> None:
        self.xs = xs
        self._cond = threading.Condition()
        self._count = 0
        self._watch = xs.watch("@releaseDomain", self._on_event)
        self.fence()
        with self._cond:
            assert self._count == 1, "XS_WATCH fires one event at once"
            self._count = 0

    def _on_event(self, _path: str, _token: str) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def fence(self) -> int:
        """A round trip on the watching connection; returns the count after it."""
        self.xs.exists("/local/domain/0")
        return self.count

    def wait_beyond(self, seen: int, timeout: float = STEP) -> int:
        """Wait until more than ``seen`` events have arrived; return the count."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._count > seen, timeout):
                raise AssertionError(f"@releaseDomain did not fire within {timeout:g} s")
            return self._count

    def wait_domain(
        self,
        hv: Any,
        domid: int,
        predicate: Callable[[DomainInfo | None], bool],
        timeout: float = STEP,
    ) -> DomainInfo | None:
        """As libxl does: re-check the domain on every ``@releaseDomain``.

        ``predicate`` gets the domain's info, ``None`` once it is gone.
        """
        deadline = time.monotonic() + timeout
        while True:
            seen = self.count
            info = domain_info_or_none(hv, domid)
            if predicate(info):
                return info
            self.wait_beyond(seen, max(0.0, deadline - time.monotonic()))

    def assert_quiet(self, seen: int, window: float = QUIET) -> None:
        """No event beyond ``seen`` within ``window`` (for what has no event of its own)."""
        with self._cond:
            fired = self._cond.wait_for(lambda: self._count > seen, window)
        assert not fired, "@releaseDomain fired"

    def close(self) -> None:
        self._watch.unwatch()


def domain_info_or_none(hv: Any, domid: int) -> DomainInfo | None:
    try:
        info: DomainInfo = hv.domain_info(domid)
    except HypervisorError as e:
        if e.errno == errno.ESRCH:
            return None
        raise
    return info


def is_suspended(info: DomainInfo | None) -> bool:
    return info is not None and info.shutdown_reason == ShutdownReason.SUSPEND


def shut_down_with(reason: ShutdownReason) -> Callable[[DomainInfo | None], bool]:
    return lambda info: info is not None and info.shutdown_reason == reason


# --------------------------------------------------------------------------- the handshake


def control_shutdown(domid: int) -> str:
    return f"/local/domain/{domid}/control/shutdown"


def request(xs: Xenstore, domid: int, command: str = "suspend") -> None:
    """libxl: write the command to ``control/shutdown``."""
    xs.write(control_shutdown(domid), command)


def wait_ack(xs: Xenstore, domid: int, command: str = "suspend", timeout: float = STEP) -> None:
    """The guest acked: the node holds anything but the command, or is gone."""
    xs.wait(control_shutdown(domid), lambda v: v != command, timeout=timeout, what="the ack")


def cancel(xs: Xenstore, domid: int, command: str = "suspend") -> bool:
    """The toolstack's cancel, in a transaction: True if the guest acked meanwhile."""

    def body(tx: Any) -> bool:
        if tx.read_or(control_shutdown(domid), None) != command:
            return True
        tx.write(control_shutdown(domid), "")
        return False

    acked: bool = xs.run_transaction(body)
    return acked


def suspend_by_hand(xs: Xenstore, release: ReleaseDomain, hv: Any, domid: int) -> DomainInfo:
    """The xenstore path, steps 3 and 5: request, ack, shut down with reason suspend."""
    seen = release.fence()
    request(xs, domid)
    wait_ack(xs, domid)
    info = release.wait_domain(hv, domid, is_suspended)
    assert info is not None
    assert release.fence() == seen + 1, "@releaseDomain fires once per noticed shutdown"
    return info


# --------------------------------------------------------------------------- the host


def on_host(host: SimHost, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in the simulated host's loop and wait for it."""
    return host.run(coro, timeout=STEP)


async def _drain() -> None:
    # Callbacks and task steps queued in the host's loop before this
    # coroutine was scheduled run before its first step completes; a few more
    # yields let short chains of them (a hypercall returning into a kernel's
    # synchronous post-suspend path) finish.
    for _ in range(10):
        await asyncio.sleep(0)


async def in_host(host: SimHost, coro: Coroutine[Any, Any, T]) -> T:
    """From another event loop: await ``coro`` run in the host's loop."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, host.loop))


def drain(host: SimHost) -> None:
    """Let the host's loop run what the caller has already caused."""
    on_host(host, _drain())


def report(host: SimHost, domid: int) -> dict[str, Any]:
    result: dict[str, Any] = on_host(host, host.guest_report(domid))
    return result


def latched(host: SimHost, domid: int) -> bool:
    async def ask() -> bool:
        assert host.xenstored is not None
        return host.xenstored.is_latched(domid)

    return on_host(host, ask())


class DomainEvents:
    """What the hypervisor model tells a domain's listeners (``shutdown``, ``resumed``...)."""

    def __init__(self, host: SimHost, domid: int) -> None:
        self._cond = threading.Condition()
        self.seen: list[str] = []
        host.xen.domain(domid).listeners.append(self._on)

    def _on(self, what: str) -> None:
        with self._cond:
            self.seen.append(what)
            self._cond.notify_all()

    def wait(self, what: str, *, after: int = 0, timeout: float = STEP) -> int:
        """Wait for ``what`` at index ``after`` or later; return its index."""
        with self._cond:
            ok = self._cond.wait_for(lambda: what in self.seen[after:], timeout)
            if not ok:
                raise AssertionError(f"domain never reported {what!r}; saw {self.seen}")
            return self.seen.index(what, after)


def ticks_go_on(host: SimHost, domid: int, since: int) -> int:
    """The guest's counter runs on from ``since`` (time must pass for a tick)."""
    time.sleep(5 * TICK)  # measuring a rate: 50 ms of vCPU time is >= 4 ticks
    ticks: int = report(host, domid)["counters"]["ticks"]
    assert ticks > since, f"counter stuck at {ticks} (was {since})"
    return ticks


# --------------------------------------------------------------------------- event channels


def wait_port(hv: Any, timeout: float = STEP) -> int:
    """The next pending port on the hypervisor handle (its descriptor turns readable)."""
    deadline = time.monotonic() + timeout
    fd = hv.evtchn_fileno()
    while True:
        port = hv.evtchn_pending()
        if port is not None:
            return int(port)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no event-channel event within {timeout:g} s")
        select.select([fd], [], [], remaining)


def no_port(hv: Any) -> None:
    """Nothing pending on the handle (call after a fence)."""
    port = hv.evtchn_pending()
    assert port is None, f"unexpected event on port {port}"


def booted(host: SimHost, domid: int) -> None:
    """Wait until the guest's boot is over: every frontend and backend Connected."""
    with Xenstore(host.xenstore_socket, timeout=STEP) as x:
        for kind, devid in host.behaviours[domid].frontends:
            for path in (
                f"/local/domain/{domid}/device/{kind}/{devid}/state",
                f"/local/domain/0/backend/{kind}/{domid}/{devid}/state",
            ):
                x.wait(path, lambda v: v == "4", timeout=STEP, what=f"{path} = Connected")

"""Interruptions from a library's point of view: a second event loop, a cancelled
task, ``Torpor.close()`` and Ctrl-C while an operation is in flight.

The guest is judged by the simulated host itself (its state, its
``control/shutdown`` node, the intent record in xenstore), not by torpor.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any

import pytest

from torpor import hookimpl
from torpor.errors import Interrupted, WrongEventLoop
from torpor.facade import Torpor
from torpor.intent import read_record
from torpor.model import Timeouts
from torpor.orchestrator import Orchestrator
from torpor.plugins import get_plugin_manager
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost


def node(host: SimHost, path: str) -> str | None:
    xs = host.toolstack_host().xenstore
    try:
        return xs.read_or(path, None)
    finally:
        xs.close()


def shutdown_node(host: SimHost, domid: int) -> str | None:
    return node(host, f"/local/domain/{domid}/control/shutdown")


def wait_for_request(host: SimHost, domid: int) -> None:
    """Until the guest has been asked (a watch on control/shutdown, no polling)."""
    xs = host.toolstack_host().xenstore
    try:
        xs.wait(f"/local/domain/{domid}/control/shutdown", lambda v: v == "suspend", timeout=10)
    finally:
        xs.close()


def test_an_orchestrator_refuses_a_second_event_loop_before_touching_the_guest(
    sim_host: SimHost,
) -> None:
    dom = sim_host.create_guest("pv")
    orch = Orchestrator(sim_host.toolstack_host())
    result = asyncio.run(orch.suspend(dom))
    assert result.state == "suspended"
    with pytest.raises(WrongEventLoop):
        asyncio.run(orch.resume(dom))
    with pytest.raises(WrongEventLoop):
        asyncio.run(orch.list_domains())
    # Nothing was asked of the guest from the second loop: still suspended.
    assert sim_host.observed_state(dom) == "suspended"
    # The bound loop is closed: close() from a third one releases what needs no loop.
    asyncio.run(orch.close())
    orch.host.close()
    with Torpor(sim_host.toolstack_host(), own_host=True) as t:
        t.resume(dom)
    assert sim_host.observed_state(dom) == "running"


def test_close_from_another_loop_while_the_bound_one_runs_is_refused(
    sim_host: SimHost,
) -> None:
    with Torpor(sim_host.toolstack_host(), own_host=True) as t:
        t.list_domains()  # binds the orchestrator to t's loop
        with pytest.raises(WrongEventLoop):
            asyncio.run(t.orchestrator.close())


def test_cancelling_an_operation_task_withdraws_the_request(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv", behaviour=Behaviour(misbehaviour="never_ack"))

    async def main() -> None:
        orch = Orchestrator(sim_host.toolstack_host())
        try:
            task = asyncio.create_task(orch.suspend(dom))
            await asyncio.to_thread(wait_for_request, sim_host, dom)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task  # the caller's own cancellation: CancelledError, as asyncio has it
        finally:
            await orch.close()
            orch.host.close()

    asyncio.run(main())
    assert shutdown_node(sim_host, dom) == ""
    assert sim_host.observed_state(dom) == "running"
    assert read_record(f"{sim_host.dir}/locks", dom) is None


def test_close_interrupts_an_operation_in_flight(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv", behaviour=Behaviour(misbehaviour="never_ack"))
    t = Torpor(sim_host.toolstack_host(), own_host=True)
    outcome: list[Any] = []

    def suspend() -> None:
        try:
            outcome.append(t.suspend(dom))
        except Exception as e:
            outcome.append(e)

    worker = threading.Thread(target=suspend)
    worker.start()
    wait_for_request(sim_host, dom)
    t.close()
    worker.join(10)
    assert not worker.is_alive()
    [err] = outcome
    assert isinstance(err, Interrupted), err
    assert err.reason == "closed" and err.clean and err.state == "running"
    assert "withdrew the pending suspend request" in err.actions
    assert shutdown_node(sim_host, dom) == ""
    assert sim_host.observed_state(dom) == "running"


def test_operations_after_an_interrupt_are_refused_untouched(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv")
    with Torpor(sim_host.toolstack_host(), own_host=True) as t:
        t.interrupt("SIGTERM")
        with pytest.raises(Interrupted) as caught:
            t.suspend(dom)
    assert caught.value.clean and caught.value.state == "running"
    assert shutdown_node(sim_host, dom) in ("", None)


def test_an_interrupt_that_cannot_bring_the_guest_back_keeps_the_intent_record(
    sim_host: SimHost,
) -> None:
    """The guest crashes while the rollback waits for its suspend: torpor says
    so, and leaves the intent record, marked, for ``torpor recover``."""
    dom = sim_host.create_guest("pv", behaviour=Behaviour(misbehaviour="crash_during_suspend"))
    held = threading.Event()

    class Hold:
        """Holds the operation in its shutdown phase (the guest acked, then crashed)."""

        @hookimpl
        async def torpor_phase_started(self, ctx: Any, phase: Any) -> None:
            if str(phase) == "shutdown" and not held.is_set():
                held.set()
                await asyncio.get_running_loop().create_future()  # until interrupted

    t = Torpor(
        sim_host.toolstack_host(),
        own_host=True,
        plugin_manager=get_plugin_manager(plugins=[Hold()]),
        timeouts=Timeouts(settle=2.0),
    )
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: _capture(outcome, lambda: t.suspend(dom)))
    worker.start()
    assert held.wait(10)
    t.interrupt("SIGINT")
    worker.join(15)
    t.close()
    [err] = outcome
    assert isinstance(err, Interrupted), err
    seen = sim_host.observed_state(dom)
    assert err.state == seen and seen != "running"
    assert not err.clean and "torpor recover" in err.message
    record = read_record(f"{sim_host.dir}/locks", dom) or {}
    assert record.get("interrupted") == "SIGINT" and record.get("left") == seen


def _capture(out: list[Any], fn: Any) -> None:
    try:
        out.append(fn())
    except Exception as e:
        out.append(e)


def test_ctrl_c_in_a_program_without_a_handler_rolls_back_then_raises(sim_host: SimHost) -> None:
    """A script calling ``t.suspend()`` gets KeyboardInterrupt, with the guest
    already brought back (the facade interrupts and waits for the rollback)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    dom = sim_host.create_guest("pv", behaviour=Behaviour(misbehaviour="never_ack"))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    assert main is not None

    def press_ctrl_c() -> None:
        wait_for_request(sim_host, dom)
        signal.pthread_kill(main, signal.SIGINT)

    try:
        with Torpor(sim_host.toolstack_host(), own_host=True) as t:
            presser = threading.Thread(target=press_ctrl_c)
            presser.start()
            with pytest.raises(KeyboardInterrupt):
                t.suspend(dom)
            presser.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert shutdown_node(sim_host, dom) == ""
    assert sim_host.observed_state(dom) == "running"
    assert read_record(f"{sim_host.dir}/locks", dom) is None


def test_an_interrupted_suspend_of_a_paused_guest_leaves_it_paused_and_clean(
    sim_host: SimHost,
) -> None:
    """A paused guest never acks; interrupted, the request is withdrawn and the
    guest is back where the suspend found it -- paused -- with no intent record
    left (as on real Xen, tests/xen/test_signals_real.py)."""
    dom = sim_host.create_guest("pv")
    sim_host.xen.pause(dom)
    t = Torpor(sim_host.toolstack_host(), own_host=True)
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: _capture(outcome, lambda: t.suspend(dom)))
    worker.start()
    wait_for_request(sim_host, dom)
    t.interrupt("SIGINT")
    worker.join(10)
    t.close()
    [err] = outcome
    assert isinstance(err, Interrupted), err
    assert err.clean and err.state == "paused" == sim_host.observed_state(dom)
    assert "run `torpor recover" not in err.message
    assert shutdown_node(sim_host, dom) == ""
    assert read_record(f"{sim_host.dir}/locks", dom) is None
    sim_host.xen.unpause(dom)

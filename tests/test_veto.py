"""The veto point (issue 13, seen item 9): ``torpor_veto_suspend``.

A plugin that must quiesce something before a suspend (qemu-ga
``guest-fsfreeze-freeze``, a database flush) refuses it by returning a
reason: the operation fails with :class:`~torpor.errors.Vetoed`, and the
guest is never asked -- judged by the simulated guest itself (its kernel log,
its counters, its agent's log), not by torpor's report alone.  The veto
applies to every operation that suspends: suspend, each checkpoint of a
session, save, migrate, and each domain of a bulk suspend.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from torpor import hookimpl
from torpor.errors import Interrupted, OperationError, TorporError, Vetoed
from torpor.facade import Torpor
from torpor.model import HVM_PARAM_ACPI_S_STATE, Phase
from torpor.plugins import get_plugin_manager
from torpor_sim.host import SimHost


class Recorder:
    """What torpor told the plugins: every lifecycle event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @hookimpl
    def torpor_before_suspend(self, ctx: Any) -> None:
        self.events.append(("before_suspend", ctx.domid))

    @hookimpl
    def torpor_phase_started(self, ctx: Any, phase: Phase) -> None:
        self.events.append(("phase", str(phase)))

    @hookimpl
    def torpor_operation_failed(self, ctx: Any, error: TorporError) -> None:
        self.events.append(("failed", error))

    def phases(self) -> list[str]:
        return [p for kind, p in self.events if kind == "phase"]

    def failures(self) -> list[TorporError]:
        return [e for kind, e in self.events if kind == "failed"]


class Veto:
    """Refuses the suspend of the domains in ``domids`` (every domain if None)."""

    def __init__(self, reason: str = "the database is not flushed", domids: Any = None) -> None:
        self.reason = reason
        self.domids = domids
        self.asked: list[tuple[str, int, str | None]] = []
        self.failed: list[TorporError] = []

    @hookimpl
    def torpor_veto_suspend(self, ctx: Any) -> str | None:
        self.asked.append((ctx.operation, ctx.domid, ctx.method and str(ctx.method)))
        if self.domids is None or ctx.domid in self.domids:
            return self.reason
        return None

    @hookimpl
    def torpor_operation_failed(self, ctx: Any, error: TorporError) -> None:
        self.failed.append(error)


def guest_log(host: SimHost, domid: int) -> list[str]:
    return list(host.run(host.guest_report(domid))["log"])


def counters(host: SimHost, domid: int) -> dict[str, Any]:
    return dict(host.run(host.guest_report(domid))["counters"])


def test_a_reason_vetoes_the_suspend_and_the_guest_is_never_asked(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv")
    veto, rec = Veto(), Recorder()
    pm = get_plugin_manager(plugins=[rec, veto])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(Vetoed) as caught:
            t.suspend(dom)
        err = caught.value
        assert isinstance(err, OperationError)
        assert err.plugin == pm.get_name(veto) and err.reason == veto.reason
        assert err.state == "running" and err.phase == Phase.VALIDATE and err.domid == dom
        assert veto.reason in str(err) and pm.get_name(veto) in str(err)
        assert err.to_dict()["plugin"] == err.plugin and err.to_dict()["reason"] == veto.reason
        # Asked once, after the method was chosen.
        assert veto.asked == [("suspend", dom, "xenstore")]
        # Nothing was asked of the guest: no request phase, no before_suspend...
        assert rec.phases() == ["validate"]
        assert not [e for e in rec.events if e[0] == "before_suspend"]
        # ...and the guest saw nothing: no request in its log, no suspend counted.
        assert not [line for line in guest_log(sim_host, dom) if "suspend" in line]
        assert counters(sim_host, dom)["suspends"] == 0
        assert sim_host.observed_state(dom) == "running"
        assert t.status(dom)["request_pending"] is False and t.status(dom)["intent"] is None
        # Every plugin hears of the failure once, the one that vetoed included.
        assert rec.failures() == [err] and veto.failed == [err]
    # Without the veto the same suspend goes through: the veto was the cause.
    with Torpor(sim_host.toolstack_host(), own_host=True) as t:
        assert t.suspend(dom).outcome == "suspended"
        t.resume(dom)


def test_raising_a_torpor_error_vetoes_with_it_as_cause(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv")

    class Raises:
        @hookimpl
        async def torpor_veto_suspend(self, ctx: Any) -> None:
            raise TorporError("cannot reach the database", domid=ctx.domid)

    pm = get_plugin_manager(plugins=[Raises()])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(Vetoed) as caught:
            t.suspend(dom)
    err = caught.value
    assert err.reason == "cannot reach the database"
    assert type(err.cause) is TorporError and err.__cause__ is err.cause
    assert err.state == "running"
    assert counters(sim_host, dom)["suspends"] == 0


def test_a_plugin_bug_in_the_veto_hook_is_an_operation_error_not_a_veto(
    sim_host: SimHost,
) -> None:
    dom = sim_host.create_guest("pv")

    class Buggy:
        @hookimpl
        def torpor_veto_suspend(self, ctx: Any) -> None:
            raise KeyError("oops")

    class WrongType:
        @hookimpl
        def torpor_veto_suspend(self, ctx: Any) -> bool:
            return False

    for plugin, words in ((Buggy(), "failed in torpor_veto_suspend"), (WrongType(), "str")):
        pm = get_plugin_manager(plugins=[plugin])
        with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
            with pytest.raises(OperationError) as caught:
                t.suspend(dom)
        assert not isinstance(caught.value, Vetoed)
        assert words in caught.value.message and pm.get_name(plugin) in caught.value.message
        assert caught.value.state == "running"
    assert counters(sim_host, dom)["suspends"] == 0
    assert sim_host.observed_state(dom) == "running"


def test_first_reason_wins_and_an_earlier_quiescer_hears_of_the_veto(sim_host: SimHost) -> None:
    """firstresult: the plugin asked first that gives a reason vetoes; those after
    it are not asked; one asked before it (it quiesced, returned None) gets
    torpor_operation_failed with the Vetoed and can undo what it did."""
    dom = sim_host.create_guest("pv")
    order: list[str] = []

    class Quiescer:
        undone: list[TorporError] = []

        @hookimpl
        def torpor_veto_suspend(self, ctx: Any) -> None:
            order.append("quiescer")

        @hookimpl
        def torpor_operation_failed(self, ctx: Any, error: TorporError) -> None:
            self.undone.append(error)

    class Vetoer(Veto):
        @hookimpl
        def torpor_veto_suspend(self, ctx: Any) -> str | None:
            order.append("vetoer")
            return super().torpor_veto_suspend(ctx)

    class Late:
        @hookimpl(trylast=True)
        def torpor_veto_suspend(self, ctx: Any) -> str:
            order.append("late")
            return "never reached"

    quiescer, vetoer = Quiescer(), Vetoer("flush failed")
    # The most recently registered plugin is asked first.
    pm = get_plugin_manager(plugins=[Late(), vetoer, quiescer])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(Vetoed) as caught:
            t.suspend(dom)
    assert order == ["quiescer", "vetoer"]
    assert caught.value.plugin == pm.get_name(vetoer) and caught.value.reason == "flush failed"
    assert quiescer.undone == [caught.value]


def test_a_veto_refuses_an_hvm_guests_s3_before_its_agent_is_asked(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("hvm")
    veto = Veto()
    pm = get_plugin_manager(plugins=[veto])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(Vetoed) as caught:
            t.suspend(dom)
    assert caught.value.state == "running"
    assert veto.asked == [("suspend", dom, "acpi-s3")]  # the method was chosen first
    assert not [line for line in guest_log(sim_host, dom) if "guest-suspend-ram" in line]
    assert sim_host.hypervisor().get_hvm_param(dom, HVM_PARAM_ACPI_S_STATE) == 0
    assert sim_host.observed_state(dom) == "running"
    assert counters(sim_host, dom)["suspends"] == 0


def test_each_checkpoint_of_a_session_is_asked(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv")

    class SecondTime(Veto):
        @hookimpl
        def torpor_veto_suspend(self, ctx: Any) -> str | None:
            self.asked.append((ctx.operation, ctx.domid, str(ctx.method)))
            return "a backup is running" if len(self.asked) == 2 else None

    veto = SecondTime()
    pm = get_plugin_manager(plugins=[veto])
    done: list[Any] = []
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(Vetoed) as caught:
            t.checkpoints(dom, 3, on_result=done.append)
    assert [a[0] for a in veto.asked] == ["checkpoint", "checkpoint"]
    assert len(done) == 1 and done[0].outcome == "checkpointed"
    assert caught.value.reason == "a backup is running" and caught.value.state == "running"
    # One checkpoint happened in the guest, the second was never asked for.
    assert counters(sim_host, dom)["suspends"] == 1
    assert sim_host.observed_state(dom) == "running"


def test_save_vetoed_writes_nothing_and_keeps_the_guest(sim_host: SimHost, tmp_path: Path) -> None:
    dom = sim_host.create_guest("pvhvm")
    veto = Veto("not now")
    pm = get_plugin_manager(plugins=[veto])
    target = tmp_path / "g.img"
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(Vetoed) as caught:
            t.save(dom, target)
    assert veto.asked == [("save", dom, "xenstore")]
    assert caught.value.state == "running"
    assert list(tmp_path.iterdir()) == []
    assert sim_host.observed_state(dom) == "running"
    assert counters(sim_host, dom)["suspends"] == 0


def test_migrate_vetoed_leaves_the_guest_where_it_was(
    sim_host: SimHost, short_dir: str, tmp_path: Path
) -> None:
    dom = sim_host.create_guest("pv")
    dest_host = SimHost(str(tmp_path / "d"), qemu=False, name="destination")
    dest_host.start()
    try:
        veto = Veto()
        pm = get_plugin_manager(plugins=[veto])
        with (
            Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as src,
            Torpor(dest_host.toolstack_host(), own_host=True) as dst,
        ):
            with pytest.raises(Vetoed) as caught:
                src.migrate(dom, dst)
        assert veto.asked == [("migrate", dom, "xenstore")]
        assert caught.value.state == "running"
        assert sim_host.observed_state(dom) == "running"
        assert dest_host.guests == {}
    finally:
        dest_host.stop()


def test_a_bulk_suspend_vetoes_only_the_domains_refused(sim_host: SimHost) -> None:
    a, b = sim_host.create_guest("pv"), sim_host.create_guest("pvhvm")
    veto = Veto("busy", domids={b})
    pm = get_plugin_manager(plugins=[veto])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        ra, rb = t.suspend_many([a, b])
        assert not isinstance(ra, TorporError) and ra.outcome == "suspended"
        assert isinstance(rb, Vetoed) and rb.reason == "busy" and rb.state == "running"
        assert sim_host.observed_state(a) == "suspended"
        assert sim_host.observed_state(b) == "running"
        t.resume(a)


def test_an_interrupt_during_a_slow_veto_is_rolled_back_with_nothing_to_undo(
    sim_host: SimHost,
) -> None:
    """A quiescing plugin may take long; an interrupt cancels it like any wait,
    the guest was not asked, and every plugin hears of the Interrupted."""
    dom = sim_host.create_guest("pv")
    entered = threading.Event()

    class Slow:
        failed: list[TorporError] = []

        @hookimpl
        async def torpor_veto_suspend(self, ctx: Any) -> None:
            import asyncio

            entered.set()
            await asyncio.Event().wait()  # a quiesce that never finishes

        @hookimpl
        def torpor_operation_failed(self, ctx: Any, error: TorporError) -> None:
            self.failed.append(error)

    slow = Slow()
    pm = get_plugin_manager(plugins=[slow])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                t.suspend(dom)
            except BaseException as e:
                outcome.append(e)

        th = threading.Thread(target=run)
        th.start()
        assert entered.wait(30)
        t.interrupt("SIGTERM")
        th.join(30)
    (err,) = outcome
    assert isinstance(err, Interrupted) and err.clean and err.state == "running"
    assert "nothing had been done to the guest" in err.message
    assert slow.failed == [err]
    assert counters(sim_host, dom)["suspends"] == 0
    assert sim_host.observed_state(dom) == "running"

"""The API a plugin author or an embedding toolstack relies on (issue 13).

Capability flags are honoured, not just declared; plugin objects have names;
``torpor plugins`` shows the order hooks ask in; hook arguments agree with
the caller's Result; errors are also the standard exceptions they resemble.
Guests are judged by the simulated host itself.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import attrs
import pytest

import torpor
from torpor import (
    GuestType,
    Result,
    Timeout,
    Torpor,
    UnsafeResume,
    UsageError,
    hookimpl,
)
from torpor.cli import EXIT_OK, main
from torpor.errors import OperationError
from torpor.model import SuspendMethod
from torpor.plugins import ask_order, get_plugin_manager, plugin_names
from torpor_sim.host import SimHost


def counters(host: SimHost, domid: int) -> dict[str, Any]:
    return dict(host.run(host.guest_report(domid))["counters"])


class Retyped:
    """Claims a kind's domains first, with a GuestType that differs in some flags."""

    def __init__(self, kind: str, **flags: Any) -> None:
        import torpor_hvm.plugin
        import torpor_pv.plugin
        import torpor_pvhvm.plugin

        base = {
            "pv": torpor_pv.plugin.GUEST_TYPE,
            "pvhvm": torpor_pvhvm.plugin.GUEST_TYPE,
            "hvm": torpor_hvm.plugin.GUEST_TYPE,
        }[kind]
        self.base = base
        self.gt = attrs.evolve(base, **flags)

    @hookimpl(tryfirst=True)
    def torpor_classify_domain(self, domain: Any, host: Any) -> GuestType | None:
        import torpor_hvm.plugin
        import torpor_pv.plugin
        import torpor_pvhvm.plugin

        for mod in (torpor_pv.plugin, torpor_pvhvm.plugin, torpor_hvm.plugin):
            if mod.torpor_classify_domain(domain=domain, host=host) is self.base:
                return self.gt
        return None


# --------------------------------------------------------------------------- capability flags


def test_cooperative_resume_false_means_never_a_fast_resume(sim_host: SimHost) -> None:
    """A type whose hypercall cannot return 1 but which survives fast=0 in place
    (an HVM guest without PV drivers: fast=0 is just resumedomain for it)."""
    dom = sim_host.create_guest("hvm", behaviour=sim_host_behaviour(agent=False))
    plugin = Retyped("hvm", cooperative_resume=False)
    assert plugin.gt.survives_inplace_noncooperative
    pm = get_plugin_manager(plugins=[plugin])
    resumes: list[bool] = []
    real = sim_host.xen.resume

    def spy(domid: int, *, fast: bool) -> None:
        resumes.append(fast)
        real(domid, fast=fast)

    sim_host.xen.resume = spy  # type: ignore[method-assign]
    try:
        with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
            t.suspend(dom)
            res = t.resume(dom)  # asked cooperatively: the type says it cannot be
    finally:
        sim_host.xen.resume = real  # type: ignore[method-assign]
    assert res.cooperative is False and res.state == "running"
    assert resumes == [False]  # xc_domain_resume(fast=0), never fast=1
    assert sim_host.observed_state(dom) == "running"


def test_cooperative_resume_false_without_a_safe_fast0_is_refused_in_place(
    sim_host: SimHost,
) -> None:
    dom = sim_host.create_guest("pv")
    pm = get_plugin_manager(plugins=[Retyped("pv", cooperative_resume=False)])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        t.suspend(dom)
        with pytest.raises(UnsafeResume) as refused:
            t.resume(dom)
        assert refused.value.state == "suspended"
        assert sim_host.observed_state(dom) == "suspended"  # nothing was done
        with pytest.raises(UnsafeResume):
            t.checkpoint(dom)  # refused before the guest is asked
    assert sim_host.observed_state(dom) == "suspended"
    with Torpor(sim_host.toolstack_host(), own_host=True) as t:
        t.resume(dom)  # as a pv guest it can be resumed; the refusal was the flag's


def test_acpi_s3_false_keeps_an_hvm_guest_off_s3(sim_host: SimHost) -> None:
    """The HVM plugin asks the agent for S3 only if the type declares it."""
    dom = sim_host.create_guest("hvm")
    pm = get_plugin_manager(plugins=[Retyped("hvm", acpi_s3=False)])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        res = t.suspend(dom)
        assert (res.method, res.state) == (SuspendMethod.HARD_SHUTDOWN, "suspended")
        t.resume(dom)
    assert sim_host.observed_state(dom) == "running"


class ChoosesXenstore:
    @hookimpl(tryfirst=True)
    def torpor_choose_suspend_method(self, ctx: Any, default: Any) -> SuspendMethod:
        return SuspendMethod.XENSTORE


def test_a_method_the_type_does_not_declare_is_refused_before_the_guest_is_asked(
    sim_host: SimHost,
) -> None:
    dom = sim_host.create_guest("hvm", behaviour=sim_host_behaviour(agent=False))
    pm = get_plugin_manager(plugins=[ChoosesXenstore()])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        with pytest.raises(OperationError) as refused:
            t.suspend(dom)
    assert "declares xenstore_handshake=False" in refused.value.message
    assert refused.value.state == "running"
    xs = sim_host.toolstack_host().xenstore
    try:
        assert xs.read_or(f"/local/domain/{dom}/control/shutdown", "") == ""
    finally:
        xs.close()


def sim_host_behaviour(**kw: Any) -> Any:
    from torpor_sim.guest import Behaviour

    return Behaviour(**kw)


def test_device_model_true_alone_stops_and_continues_qemu(sim_host: SimHost) -> None:
    """A new type on a PVHVM guest with no device-model code of its own."""
    dom = sim_host.create_guest("pvhvm")

    class WinPv:
        gt = GuestType(name="winpv", plugin="winpv", device_model=True)

        @hookimpl(tryfirst=True)
        def torpor_classify_domain(self, domain: Any, host: Any) -> GuestType | None:
            return self.gt if domain.hvm else None

    pm = get_plugin_manager(plugins=[("winpv", WinPv())], block=["pvhvm"])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        res = t.suspend(dom)
        assert res.guest_type == "winpv"
        assert sim_host.device_models[dom].run_state == "paused"  # QMP stop
        t.resume(dom)
        assert sim_host.device_models[dom].run_state == "running"  # QMP cont
    assert sim_host.observed_state(dom) == "running"


# --------------------------------------------------------------------------- plugins


class Metrics:
    @hookimpl
    def torpor_phase_finished(self, ctx: Any, phase: Any, seconds: float, error: Any) -> None:
        pass


def test_plugin_objects_are_named_never_by_id() -> None:
    pm = get_plugin_manager(plugins=[Metrics(), ("metrics", Metrics())], autoload=False)
    names = [n for n, _ in plugin_names(pm)]
    assert "metrics" in names
    assert "test_public_api.Metrics" in names
    assert not any(n.isdigit() for n in names)


def test_ask_order_follows_pluggy_and_tryfirst() -> None:
    pm = get_plugin_manager(plugins=[("late", Metrics())])
    order = ask_order(pm, "torpor_classify_domain")
    assert order[-1] == "hvm" or "hvm" in order
    first = Retyped("pv")
    pm2 = get_plugin_manager(plugins=[("retyped", first)])
    assert ask_order(pm2, "torpor_classify_domain")[0] == "retyped"


def test_torpor_plugins_prints_the_order_hooks_ask_in(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == EXIT_OK
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    pm = get_plugin_manager()
    assert [r["name"] for r in rows] == [n for n, _ in plugin_names(pm)]
    classify = ask_order(pm, "torpor_classify_domain")
    for r in rows:
        if r["name"] in classify:
            assert r["asked"]["torpor_classify_domain"] == classify.index(r["name"]) + 1
    assert main(["plugins"]) == EXIT_OK
    text = capsys.readouterr().out
    assert f"classify_domain          {', '.join(classify)}" in text


# --------------------------------------------------------------------------- hooks and results


class Seen:
    def __init__(self) -> None:
        self.results: list[Result] = []

    @hookimpl
    def torpor_after_resume(self, ctx: Any, result: Result) -> None:
        self.results.append(result)


def test_after_resume_of_a_restore_says_restored_as_the_result_does(sim_host: SimHost) -> None:
    dom = sim_host.create_guest("pv")
    seen = Seen()
    pm = get_plugin_manager(plugins=[("seen", seen)])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        path = f"{sim_host.dir}/g.img"
        t.save(dom, path)
        res = t.restore(path)
    assert (res.operation, res.outcome) == ("restore", "restored")
    assert [(r.operation, r.outcome) for r in seen.results] == [("restore", "restored")]


# --------------------------------------------------------------------------- errors


def test_errors_are_the_standard_exceptions_they_resemble() -> None:
    assert issubclass(Timeout, TimeoutError)
    assert issubclass(UsageError, ValueError)
    with pytest.raises(TimeoutError):
        raise Timeout("late", deadline=1.0)
    e = Timeout("late", deadline=1.0, domid=3)
    assert str(e) == "[domain 3] late" and e.deadline == 1.0

    async def main_() -> None:
        # asyncio.timeout()-style handling catches torpor's deadline too
        try:
            raise Timeout("late")
        except TimeoutError:
            return

    asyncio.run(main_())


def test_everything_public_is_importable_from_torpor() -> None:
    for name in torpor.__all__:
        assert getattr(torpor, name) is not None
    assert torpor.OperationError is OperationError


# --------------------------------------------------------------------------- plugins come and go


def test_a_plugin_registered_or_removed_after_use_is_asked_or_not(sim_host: SimHost) -> None:
    """The engine keeps pluggy's live implementation lists (no copy per call):
    a plugin registered after hooks were dispatched is asked from then on, a
    removed one no longer -- for notifications and firstresult hooks alike."""
    domid = sim_host.create_guest("pv")
    t = Torpor(sim_host.toolstack_host(), own_host=True)
    seen: list[str] = []

    class Late:
        @hookimpl
        def torpor_phase_started(self, ctx: Any, phase: Any) -> None:
            seen.append(str(phase))

        @hookimpl(tryfirst=True)
        def torpor_choose_suspend_method(self, ctx: Any, default: Any) -> Any:
            seen.append("chose")
            return None

    try:
        t.suspend(domid)
        t.resume(domid)
        assert seen == []
        late = Late()
        t.orchestrator.pm.register(late, name="late")
        t.suspend(domid)
        assert "chose" in seen and "request" in seen, seen
        t.orchestrator.pm.unregister(late)
        seen.clear()
        t.resume(domid)
        t.suspend(domid)
        assert seen == []
        t.resume(domid)
    finally:
        t.close()


def test_a_pv_domain_is_classified_once_an_hvm_domain_every_time(sim_host: SimHost) -> None:
    """A PV domain's type is fixed when it is built: asked once per identity (domid,
    UUID, classifiers registered).  An HVM guest can load or drop its PV drivers
    between two operations: asked every time."""
    pv = sim_host.create_guest("pv")
    hvm = sim_host.create_guest("pvhvm")
    t = Torpor(sim_host.toolstack_host(), own_host=True)
    asked: list[int] = []

    class Counting:
        @hookimpl(tryfirst=True)
        def torpor_classify_domain(self, domain: Any, host: Any) -> None:
            asked.append(domain.domid)

    try:
        t.orchestrator.pm.register(Counting(), name="counting")
        for _ in range(2):
            t.suspend(pv)
            t.resume(pv)
            t.suspend(hvm)
            t.resume(hvm)
        assert asked.count(pv) == 1, asked
        assert asked.count(hvm) == 4, asked
        # Another classifier: every cached verdict is asked for again.
        t.orchestrator.pm.register(Counting(), name="counting-2")
        t.suspend(pv)
        t.resume(pv)
        assert asked.count(pv) == 3, asked  # both classifiers, once
    finally:
        t.close()

"""torpor-fsfreeze on the simulated host: frozen while suspended, thawed after, and on
every failure path; a veto when the freeze cannot be had.

Every judgement is the simulated guest's own: its filesystem's freeze flag and
its writer's counters in guest memory (``fs_frozen``, ``fs_writes``: the
guest writes each tick, and nothing while frozen), and its agent's log
(``agent: FIFREEZE`` / ``agent: FITHAW``).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import torpor_fsfreeze.plugin
from torpor import hookimpl
from torpor.errors import (
    DeviceModelError,
    Interrupted,
    OperationError,
    TorporError,
    UsageError,
    Vetoed,
)
from torpor.facade import Torpor
from torpor.model import SuspendMethod
from torpor.plugins import get_plugin_manager
from torpor.qmp import GuestAgent
from torpor_fsfreeze import FsFreeze
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None


def make_host(qemu: bool) -> Iterator[SimHost]:
    d = tempfile.mkdtemp(prefix="tf", dir="/tmp")  # AF_UNIX paths are short
    host = SimHost(d, qemu=qemu)
    host.start()
    try:
        yield host
    finally:
        host.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def host() -> Iterator[SimHost]:
    yield from make_host(False)


@pytest.fixture(
    params=[
        "in-process",
        pytest.param(
            "qemu", marks=pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 missing")
        ),
    ]
)
def any_host(request: pytest.FixtureRequest) -> Iterator[SimHost]:
    """The in-process device model, and real QEMU running the boot-sector guest."""
    yield from make_host(request.param == "qemu")


def fs(host: SimHost, domid: int) -> dict[str, int]:
    """The guest's filesystem, read from its memory (safe from any thread)."""
    c = host.guest(domid).counters()
    return {k: c[k] for k in ("fs_frozen", "fs_writes", "fs_blocked", "ticks")}


def agent_log(host: SimHost, domid: int) -> list[str]:
    return [line for line in host.guest(domid).log if line.startswith("agent: FI")]


def torpor(host: SimHost, *plugins: object, **kw: Any) -> Torpor:
    """A Torpor with the built-ins and exactly these plugins (the entry point's
    fsfreeze instance, off unless configured, is blocked for clarity)."""
    pm = get_plugin_manager(plugins=list(plugins), block=["fsfreeze"])
    return Torpor(host.toolstack_host(), own_host=True, plugin_manager=pm, **kw)


class Watch:
    """Reads the guest's filesystem at each point of the operation."""

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.seen: dict[str, dict[str, int]] = {}

    @hookimpl
    def torpor_before_suspend(self, ctx: Any) -> None:  # after the veto hook: frozen
        self.seen["before_suspend"] = fs(self.host, ctx.domid)

    @hookimpl
    def torpor_after_suspend(self, ctx: Any, result: Any) -> None:
        self.seen["after_suspend"] = fs(self.host, ctx.domid)

    @hookimpl
    def torpor_before_resume(self, ctx: Any) -> None:
        self.seen["before_resume"] = fs(self.host, ctx.domid)


def test_suspend_freezes_and_the_resume_thaws(any_host: SimHost) -> None:
    host = any_host
    dom = host.create_guest("hvm")
    watch = Watch(host)
    with torpor(host, FsFreeze(avoid_s3=True), watch) as t:
        res = t.suspend(dom)
        # Out of S3 (qemu-ga refuses guest-suspend-ram once frozen): libxl's hard suspend.
        assert (res.method, res.state) == (SuspendMethod.HARD_SHUTDOWN, "suspended")
        assert fs(host, dom)["fs_frozen"] == 1  # frozen while suspended
        t.resume(dom)
    frozen, suspended, resuming = (
        watch.seen[k] for k in ("before_suspend", "after_suspend", "before_resume")
    )
    assert frozen["fs_frozen"] == suspended["fs_frozen"] == resuming["fs_frozen"] == 1
    # Frozen, the guest wrote nothing (one tick may have been in flight).
    assert resuming["fs_writes"] - frozen["fs_writes"] <= 1
    after = fs(host, dom)
    assert after["fs_frozen"] == 0  # thawed once the guest was back
    assert agent_log(host, dom) == ["agent: FIFREEZE", "agent: FITHAW"]
    assert host.observed_state(dom) == "running"


def test_every_checkpoint_is_frozen_and_thawed(host: SimHost) -> None:
    dom = host.create_guest("hvm")
    during: list[int] = []
    with torpor(host, FsFreeze(avoid_s3=True)) as t:
        for _ in range(3):
            res = t.checkpoint(dom, lambda _r: during.append(fs(host, dom)["fs_frozen"]))
            assert res.outcome == "checkpointed"
            assert fs(host, dom)["fs_frozen"] == 0
    assert during == [1, 1, 1]
    assert agent_log(host, dom) == ["agent: FIFREEZE", "agent: FITHAW"] * 3


def test_a_guest_that_sleeps_in_s3_is_not_frozen(host: SimHost) -> None:
    dom = host.create_guest("hvm")
    with torpor(host, FsFreeze()) as t:
        res = t.suspend(dom)
        assert res.state == "S3"  # the HVM plugin's choice, kept
        t.resume(dom)
    assert agent_log(host, dom) == []
    assert fs(host, dom)["fs_frozen"] == 0


def test_save_freezes_and_the_restored_guest_is_thawed(host: SimHost, tmp_path: Path) -> None:
    dom = host.create_guest("hvm")
    watch = Watch(host)
    image = tmp_path / "g.img"
    with torpor(host, FsFreeze(), watch) as t:
        saved = t.save(dom, image)  # a save is a hard suspend: frozen without avoid_s3
        assert saved.method == SuspendMethod.HARD_SHUTDOWN
        assert watch.seen["after_suspend"]["fs_frozen"] == 1
        restored = t.restore(image)
    new = restored.domid
    # The freeze is in the guest's memory, so in the image; the restore thawed it.
    assert agent_log(host, new) == ["agent: FITHAW"]
    assert fs(host, new)["fs_frozen"] == 0
    assert host.observed_state(new) == "running"


def test_the_agent_refusing_the_freeze_vetoes_the_suspend(host: SimHost) -> None:
    dom = host.create_guest("hvm")
    path = host.toolstack_host().agent_path(dom)
    assert path is not None

    async def admin(cmd: str) -> Any:  # someone froze the guest by hand
        async with GuestAgent(domid=dom) as agent:
            await agent.connect(path, timeout=10)
            await agent.sync(timeout=10)
            return await agent.execute(cmd, timeout=10)

    assert asyncio.run(admin("guest-fsfreeze-freeze")) == 1
    plugin = FsFreeze(avoid_s3=True)
    with torpor(host, plugin) as t:
        with pytest.raises(Vetoed) as caught:
            t.suspend(dom)
        name = t.orchestrator.pm.get_name(plugin)
    err = caught.value
    assert err.state == "running" and err.plugin == name
    assert err.reason == (
        "the guest agent refused guest-fsfreeze-freeze: CommandNotFound: "
        "Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state"
    )
    assert host.observed_state(dom) == "running"
    assert host.guest(dom).counters()["suspends"] == 0
    # Someone else's freeze is theirs to thaw: the plugin left it.
    assert fs(host, dom)["fs_frozen"] == 1
    assert asyncio.run(admin("guest-fsfreeze-thaw")) == 1


@pytest.mark.parametrize("require_agent", [True, False])
def test_a_guest_without_an_agent(host: SimHost, require_agent: bool) -> None:
    dom = host.create_guest("hvm", behaviour=Behaviour(agent=False))
    with torpor(host, FsFreeze(require_agent=require_agent)) as t:
        if require_agent:
            with pytest.raises(Vetoed) as caught:
                t.suspend(dom)
            assert "no guest agent" in caught.value.reason
            assert caught.value.state == "running"
            assert host.observed_state(dom) == "running"
            return
        res = t.suspend(dom)  # suspended unfrozen (nothing could freeze it)
        assert res.state == "suspended" and fs(host, dom)["fs_frozen"] == 0
        t.resume(dom)


class FailingDeviceModel:
    """A device model that refuses to stop: the suspend fails after the guest suspended."""

    @hookimpl(tryfirst=True)
    def torpor_device_model_suspend(self, ctx: Any) -> None:
        raise DeviceModelError("QMP stop: the device model refused", domid=ctx.domid)


def test_thawed_after_a_failed_suspend(host: SimHost) -> None:
    dom = host.create_guest("hvm")
    t = torpor(host, FsFreeze(avoid_s3=True), FailingDeviceModel())
    with t, pytest.raises(OperationError) as caught:
        t.suspend(dom)
    assert caught.value.state == "running"  # rolled back: resumed cooperatively
    assert "the device model refused" in str(caught.value)
    assert agent_log(host, dom) == ["agent: FIFREEZE", "agent: FITHAW"]
    assert fs(host, dom)["fs_frozen"] == 0


def test_thawed_after_a_later_plugins_veto(host: SimHost) -> None:
    dom = host.create_guest("hvm")

    class Later:
        @hookimpl(trylast=True)
        def torpor_veto_suspend(self, ctx: Any) -> str:
            assert fs(host, ctx.domid)["fs_frozen"] == 1  # fsfreeze was asked first
            return "the database is not flushed"

    with torpor(host, FsFreeze(avoid_s3=True), Later()) as t, pytest.raises(Vetoed) as caught:
        t.suspend(dom)
    assert caught.value.reason == "the database is not flushed"
    assert agent_log(host, dom) == ["agent: FIFREEZE", "agent: FITHAW"]
    assert fs(host, dom)["fs_frozen"] == 0
    assert host.observed_state(dom) == "running"


def test_thawed_after_an_interrupt(host: SimHost) -> None:
    """Interrupted after the freeze, before the guest was asked: nothing to roll
    back in the guest but the freeze, which torpor_operation_failed thaws."""
    dom = host.create_guest("hvm")
    frozen = threading.Event()

    class Stall:
        @hookimpl
        async def torpor_before_suspend(self, ctx: Any) -> None:
            frozen.set()
            await asyncio.Event().wait()  # held here until the interrupt

    outcome: list[BaseException] = []
    with torpor(host, FsFreeze(avoid_s3=True), Stall()) as t:

        def run() -> None:
            try:
                t.suspend(dom)
            except TorporError as e:
                outcome.append(e)

        th = threading.Thread(target=run)
        th.start()
        assert frozen.wait(30)
        assert fs(host, dom)["fs_frozen"] == 1
        t.interrupt("SIGTERM")
        th.join(30)
    (err,) = outcome
    assert isinstance(err, Interrupted) and err.clean and err.state == "running"
    assert agent_log(host, dom) == ["agent: FIFREEZE", "agent: FITHAW"]
    assert fs(host, dom)["fs_frozen"] == 0


def test_a_resume_in_another_process_thaws_what_it_finds_frozen(host: SimHost) -> None:
    """The freeze is the guest's state, not the plugin's memory: a resume by
    another Torpor (another `torpor` command) thaws it."""
    dom = host.create_guest("hvm")
    with torpor(host, FsFreeze(avoid_s3=True)) as t:
        t.suspend(dom)
    assert fs(host, dom)["fs_frozen"] == 1
    with torpor(host, FsFreeze()) as t:
        t.resume(dom)
    assert fs(host, dom)["fs_frozen"] == 0
    assert agent_log(host, dom) == ["agent: FIFREEZE", "agent: FITHAW"]


def test_the_entry_point_instance_is_off_unless_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert get_plugin_manager().get_plugin("fsfreeze") is torpor_fsfreeze.plugin.plugin
    f = FsFreeze.from_environment({})
    assert (f.enabled, f.require_agent, f.avoid_s3) == (False, True, False)
    f = FsFreeze.from_environment(
        {
            "TORPOR_FSFREEZE": "on",
            "TORPOR_FSFREEZE_REQUIRE_AGENT": "0",
            "TORPOR_FSFREEZE_AVOID_S3": "yes",
        }
    )
    assert (f.enabled, f.require_agent, f.avoid_s3) == (True, False, True)
    with pytest.raises(UsageError, match="TORPOR_FSFREEZE='maybe'"):
        FsFreeze.from_environment({"TORPOR_FSFREEZE": "maybe"})


def test_an_instance_that_is_off_does_nothing(host: SimHost) -> None:
    dom = host.create_guest("hvm", behaviour=Behaviour(agent=False))
    with torpor(host, FsFreeze(enabled=False, avoid_s3=True)) as t:
        assert t.suspend(dom).state == "suspended"  # no agent, yet no veto
        t.resume(dom)


@pytest.fixture
def daemon_host() -> Iterator[str]:
    """A simulated host in its own process: a PV guest (no agent) and an HVM guest."""
    from torpor_sim import daemon

    d = tempfile.mkdtemp(prefix="tg", dir="/tmp")
    try:
        daemon.start(d, ["pv", "hvm"], qemu=False, timeout=120)
        yield d
    finally:
        daemon.stop(d)
        shutil.rmtree(d, ignore_errors=True)


def test_the_torpor_command_with_the_entry_point_configured(daemon_host: str) -> None:
    """`torpor` as an operator runs it: the entry point's instance, turned on by
    the environment; a suspend and a resume in two processes."""
    import contextlib
    import json
    import os
    import subprocess
    import sys

    from torpor.hypervisor.remote import RemoteHypervisor

    env = {**os.environ, "TORPOR_FSFREEZE": "1", "TORPOR_FSFREEZE_AVOID_S3": "1"}

    def torpor_cli(*args: str) -> tuple[int, dict[str, Any]]:
        cmd = [sys.executable, "-m", "torpor", "--host", f"sim:{daemon_host}", "--json", *args]
        out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
        (line,) = [ln for ln in out.stdout.splitlines() if ln.strip()]
        return out.returncode, json.loads(line)

    def report(domid: int) -> Any:  # the simulated host's own view of the guest
        with contextlib.closing(RemoteHypervisor(f"{daemon_host}/hypervisor.sock")) as hv:
            return hv.call("sim_guest", domid=domid)

    def status() -> Any:
        async def ask() -> Any:
            async with GuestAgent(domid=2) as agent:
                await agent.connect(f"{daemon_host}/qmp/qga-2", timeout=10)
                await agent.sync(timeout=10)
                return await agent.execute("guest-fsfreeze-status", timeout=10)

        return asyncio.run(ask())

    code, out = torpor_cli("suspend", "1")  # a PV guest: no agent, require_agent
    assert code != 0 and out["error"] == "Vetoed" and out["state"] == "running"
    assert out["plugin"] == "fsfreeze" and "no guest agent" in out["reason"]
    code, out = torpor_cli("suspend", "2")
    assert code == 0 and out["method"] == "hard-shutdown" and out["state"] == "suspended"
    assert report(2)["counters"]["fs_frozen"] == 1  # the guest's memory: frozen
    code, out = torpor_cli("resume", "2")  # another process: it finds the guest frozen
    assert code == 0 and out["state"] == "running"
    assert status() == "thawed" and report(2)["counters"]["fs_frozen"] == 0
    assert report(2)["log"][-2:] == ["agent: FIFREEZE", "agent: FITHAW"]

"""``torpor host save-all`` / ``restore-all`` on the simulated host (issue 16).

Every guest saved concurrently with a manifest written atomically, brought
back in the saved order; the failure paths: a guest that refuses (left
running, or shut down cleanly with the fallback), a full disk, an image
that fails verification, a name already in use, and a power loss
mid-way (a separate ``torpor host save-all`` process killed with SIGKILL).
Every state judged here is read from the simulated host's own models.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import torpor
from torpor import savedir
from torpor.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from torpor.facade import Torpor
from torpor.hookspecs import hookimpl
from torpor.host import Host
from torpor.model import ShutdownReason, Timeouts
from torpor.plugins import get_plugin_manager
from torpor.savedir import (
    MANIFEST,
    GuestFilter,
    file_digest,
    read_manifest,
    write_manifest,
)
from torpor.versions import XEN_LIBRARIES
from torpor_sim import daemon
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost


def report(host: SimHost, domid: int) -> dict[str, Any]:
    return host.run(host.guest_report(domid))


def ticks(host: SimHost, domid: int) -> dict[str, int]:
    return dict(report(host, domid)["counters"])


def names(host: SimHost) -> dict[str, int]:
    """name -> domid of every guest domain, read from xenstore."""
    xs = host.toolstack_host().xenstore
    try:
        out = {}
        for d in sorted(host.xen.domains):
            if d:
                out[xs.read_or(f"/local/domain/{d}/name", "")] = d
        return out
    finally:
        xs.close()


@pytest.fixture
def save_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="tpsave")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def torpor_on(host: SimHost, **kw: Any) -> Torpor:
    return Torpor(host.toolstack_host(), own_host=True, **kw)


def test_save_all_then_restore_all_brings_every_guest_back_where_it_was(
    sim_host: SimHost, save_dir: str
) -> None:
    doms = [sim_host.create_guest(k) for k in ("pv", "pv", "pvhvm", "pv")]
    before_names = names(sim_host)
    before = {d: ticks(sim_host, d) for d in doms}
    seen: list[tuple[str, int, int]] = []
    with torpor_on(sim_host) as t:
        rep = t.save_all(
            save_dir, concurrency=2, on_guest=lambda o, p: seen.append((o.name, p.done, p.total))
        )
    assert rep.ok and rep.count("saved") == 4 and rep.concurrency == 2
    assert [p[1] for p in seen] == [1, 2, 3, 4] and {p[2] for p in seen} == {4}
    # The domains are gone (destroyed once their image verified), as the hypervisor says.
    assert sorted(sim_host.xen.domains) == [0]
    manifest = read_manifest(save_dir)
    assert manifest is not None and manifest["complete"] is True
    assert manifest["torpor"] == torpor.__version__
    assert manifest["xen"]["hypervisor"] == "simulated"
    assert set(manifest["xen"]["libraries"]) == set(XEN_LIBRARIES)
    by_name = {g["name"]: g for g in manifest["guests"]}
    assert set(by_name) == set(before_names)
    for o in rep.guests:
        g = by_name[o.name]
        assert g["status"] == "saved" and g["domid"] == o.domid == before_names[o.name]
        assert g["guest_type"] == ("pvhvm" if o.domid == doms[2] else "pv")
        size, digest = file_digest(os.path.join(save_dir, g["image"]))
        assert (g["bytes"], g["sha256"]) == (size, digest) == (o.bytes, o.sha256)
        assert o.state == "destroyed"
    # Saved order: domid order.
    assert [g["domid"] for g in manifest["guests"]] == sorted(doms)

    with torpor_on(sim_host) as t:
        back = t.restore_all(save_dir)
    assert back.ok and back.count("restored") == 4
    assert [o.domid for o in back.guests] == sorted(doms)
    now = names(sim_host)
    assert set(now) == set(before_names)
    for o in back.guests:
        new = now[o.name]
        assert o.new_domid == new and o.state == "running"
        assert sim_host.xen.domain_info(new).running
        c = ticks(sim_host, new)
        old = before[before_names[o.name]]
        # The same boot, going on from where it was; one rebuild in a new domain.
        assert c["boots"] == old["boots"] and c["ticks"] >= old["ticks"]
        assert c["new_domain_resumes"] == old["new_domain_resumes"] + 1
        assert report(sim_host, new)["memory_consistent"] is True
    # Images are gone once their guests run; the manifest is put aside.
    assert not [f for f in os.listdir(save_dir) if f.endswith(".save")]
    assert read_manifest(save_dir) is None
    done = json.loads(open(os.path.join(save_dir, savedir.DONE)).read())
    assert all(g["status"] == "restored" for g in done["guests"])
    assert {g["restored"]["domid"] for g in done["guests"]} == set(now.values())


def test_a_guest_that_refuses_is_reported_and_left_running_the_others_saved(
    sim_host: SimHost, save_dir: str
) -> None:
    good = sim_host.create_guest("pv")
    bad = sim_host.create_guest("pv", behaviour=Behaviour(misbehaviour="never_ack"))
    good2 = sim_host.create_guest("pvhvm")
    with torpor_on(sim_host, timeouts=Timeouts(ack=0.5)) as t:
        rep = t.save_all(save_dir)
    outcome = {o.domid: o for o in rep.guests}
    assert outcome[good].outcome == outcome[good2].outcome == "saved"
    refused = outcome[bad]
    assert refused.outcome == "left running" and not refused.ok
    assert type(refused.error).__name__ == "AckTimeout"
    assert refused.state == "running" and sim_host.xen.domain_info(bad).running
    assert sorted(sim_host.xen.domains) == [0, bad]
    assert report(sim_host, bad)["state"] == "running"  # the guest's own model says so
    entry = {g["domid"]: g for g in read_manifest(save_dir)["guests"]}[bad]  # type: ignore[index]
    assert entry["status"] == "not saved" and entry["outcome"] == "left running"
    assert entry["error"]["error"] == "AckTimeout" and entry["image"] is None
    assert not rep.ok


def test_shutdown_fallback_powers_off_a_guest_that_cannot_be_saved(
    sim_host: SimHost, save_dir: str
) -> None:
    # Knows poweroff but not suspend (a kernel without CONFIG_HIBERNATE_CALLBACKS).
    nosuspend = sim_host.create_guest("pv", behaviour=Behaviour(misbehaviour="unknown_command"))
    hung = sim_host.create_guest("pv", behaviour=Behaviour(misbehaviour="never_ack"))
    fine = sim_host.create_guest("pv")
    with torpor_on(sim_host, timeouts=Timeouts(ack=0.5)) as t:
        rep = t.save_all(save_dir, shutdown_fallback=True, shutdown_timeout=1.0)
    outcome = {o.domid: o for o in rep.guests}
    assert outcome[fine].outcome == "saved"
    off = outcome[nosuspend]
    assert off.outcome == "shut down" and off.ok and off.state == "powered-off"
    info = sim_host.xen.domain_info(nosuspend)
    assert info.shutdown and info.shutdown_reason == ShutdownReason.POWEROFF
    assert "control/shutdown = poweroff" in off.detail
    # One that ignores poweroff too is reported, still there, never silently lost.
    stuck = outcome[hung]
    assert stuck.outcome == "left running" and not stuck.ok and stuck.state == "running"
    assert "still running after 1s" in stuck.detail
    assert sim_host.xen.domain_info(hung).running


def test_restore_all_refuses_a_name_already_running_and_keeps_its_image(
    sim_host: SimHost, save_dir: str, tmp_path: Any
) -> None:
    a = sim_host.create_guest("pv")
    b = sim_host.create_guest("pv")
    before = names(sim_host)
    with torpor_on(sim_host) as t:
        assert t.save_all(save_dir).ok
        manifest = read_manifest(save_dir)
        assert manifest is not None
        image_a = os.path.join(save_dir, manifest["guests"][0]["image"])
        # Someone else brings guest a back first (a copy of its image).
        copy = tmp_path / "a-copy.save"
        shutil.copy(image_a, copy)
        holder = t.restore(str(copy)).domid
        rep = t.restore_all(save_dir)
    outcome = {o.domid: o for o in rep.guests}
    assert outcome[b].outcome == "restored"
    refused = outcome[a]
    assert refused.outcome == "refused" and not refused.ok
    assert type(refused.error).__name__ == "NameInUse"
    assert refused.error.holder == holder  # type: ignore[union-attr]
    assert os.path.exists(image_a)  # kept: nothing was built from it
    now = names(sim_host)
    assert now[next(n for n, d in before.items() if d == a)] == holder
    assert len(now) == 2  # no second domain of that name
    left = read_manifest(save_dir)
    assert left is not None  # not put aside: something is left to restore
    assert {g["domid"]: g["status"] for g in left["guests"]} == {a: "saved", b: "restored"}
    assert not rep.ok


def test_an_image_that_fails_verification_is_skipped_kept_and_reported(
    sim_host: SimHost, save_dir: str
) -> None:
    doms = [sim_host.create_guest("pv") for _ in range(3)]
    with torpor_on(sim_host) as t:
        assert t.save_all(save_dir).ok
        manifest = read_manifest(save_dir)
        assert manifest is not None
        bad = manifest["guests"][1]
        path = os.path.join(save_dir, bad["image"])
        with open(path, "r+b") as f:  # one flipped byte in the middle
            f.seek(bad["bytes"] // 2)
            byte = f.read(1)
            f.seek(bad["bytes"] // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        rep = t.restore_all(save_dir)
    outcome = {o.domid: o for o in rep.guests}
    assert outcome[doms[1]].outcome == "skipped" and "SHA-256" in outcome[doms[1]].detail
    assert outcome[doms[0]].outcome == outcome[doms[2]].outcome == "restored"
    assert os.path.exists(path)
    assert len(names(sim_host)) == 2


def test_the_concurrency_bound_holds_and_is_reached(sim_host: SimHost, save_dir: str) -> None:
    for _ in range(6):
        sim_host.create_guest("pv", behaviour=Behaviour(freeze_time=0.2))

    class InFlight:
        def __init__(self) -> None:
            self.now = self.peak = 0

        @hookimpl
        def torpor_before_suspend(self, ctx: Any) -> None:
            self.now += 1
            self.peak = max(self.peak, self.now)

        @hookimpl
        def torpor_after_suspend(self, ctx: Any, result: Any) -> None:
            self.now -= 1

    spy = InFlight()
    pm = get_plugin_manager(plugins=[spy])
    with Torpor(sim_host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
        rep = t.save_all(save_dir, concurrency=3)
    assert rep.count("saved") == 6
    assert spy.peak == 3


def test_max_rate_paces_the_starts(sim_host: SimHost, save_dir: str) -> None:
    for _ in range(3):
        sim_host.create_guest("pv")
    with torpor_on(sim_host) as t:
        fast = t.save_all(save_dir, concurrency=3)
        t.restore_all(save_dir)
        size = max(o.bytes or 0 for o in fast.guests)
        rate = size * 4.0  # bytes/s: three images need >= 2 * 1/4 s of pacing
        slow = t.save_all(save_dir, concurrency=3, max_rate=rate)
    assert slow.count("saved") == 3
    # The third save may start only once the first two images' bytes fit the rate.
    assert slow.seconds >= 2 * size / rate * 0.9
    assert slow.seconds > fast.seconds


def test_only_and_except_pick_guests_by_name_domid_and_regex(
    sim_host: SimHost, save_dir: str
) -> None:
    doms = [sim_host.create_guest("pv") for _ in range(4)]
    by_domid = {d: n for n, d in names(sim_host).items()}
    pick = GuestFilter.parse(
        only=[f"re:{by_domid[doms[0]][:-1]}.*"], exclude=[f"{doms[1]},{by_domid[doms[2]]}"]
    )
    with torpor_on(sim_host) as t:
        rep = t.save_all(save_dir, select=pick)
    outcome = {o.domid: o.outcome for o in rep.guests}
    assert outcome == {doms[0]: "saved", doms[1]: "excluded", doms[2]: "excluded",
                       doms[3]: "saved"}  # fmt: skip
    assert rep.ok and len(rep.attempted) == 2
    assert sorted(sim_host.xen.domains) == [0, doms[1], doms[2]]


def test_a_bad_regex_is_a_usage_error() -> None:
    from torpor.errors import UsageError

    with pytest.raises(UsageError, match="invalid regular expression"):
        GuestFilter.parse(only=["re:("])


def test_the_manifest_is_replaced_atomically_or_not_at_all(
    save_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = {"format": savedir.MANIFEST_FORMAT, "version": 1, "guests": [{"name": "a"}]}
    write_manifest(save_dir, good)

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(savedir.os, "fsync", fail)
    with pytest.raises(OSError):
        write_manifest(save_dir, {**good, "guests": []})
    assert read_manifest(save_dir) == good
    assert os.listdir(save_dir) == [MANIFEST]  # no temporary file left


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="tpfull")
    # Room for the manifest's reserve and two of the sim's ~65 KiB images, not three.
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", d],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", d], check=False)
    os.rmdir(d)


def test_a_full_disk_leaves_the_guest_running_and_the_manifest_true(
    sim_host: SimHost, small_disk: str
) -> None:
    doms = [sim_host.create_guest("pv") for _ in range(3)]
    with torpor_on(sim_host) as t:
        rep = t.save_all(small_disk, concurrency=1)
        outcome = {o.domid: o for o in rep.guests}
        saved = [d for d in doms if outcome[d].outcome == "saved"]
        full = [d for d in doms if outcome[d].outcome != "saved"]
        assert saved == doms[:2] and full == doms[2:]
        o = outcome[doms[2]]
        assert o.outcome == "left running" and o.state == "running"
        assert "No space left on device" in o.detail
        assert sim_host.xen.domain_info(doms[2]).running
        assert not [f for f in os.listdir(small_disk) if "torpor-partial" in f]
        manifest = read_manifest(small_disk)
        assert manifest is not None and manifest["complete"]
        status = {g["domid"]: g["status"] for g in manifest["guests"]}
        assert status == {doms[0]: "saved", doms[1]: "saved", doms[2]: "not saved"}
        back = t.restore_all(small_disk)
    assert back.count("restored") == 2 and back.count("not saved") == 1


# --------------------------------------------------------------------------- the command


def test_cli_usage_errors_name_the_valid_range(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, text in (
        (["host", "save-all", "--dir", "/tmp/x", "--concurrency", "0"], "from 1 to 1024"),
        (["host", "save-all", "--dir", "/tmp/x", "--max-rate", "fast"], "bytes per second"),
        (["host", "restore-all", "--dir", "/tmp/x", "--only", "re:("], "regular expression"),
        (["host", "restore-all", "--dir", "/tmp/x", "--ack-timeout", "3"], "does not apply"),
        (["host", "save-all"], "--dir"),
    ):
        assert main(argv) == EXIT_USAGE, argv
        assert text in capsys.readouterr().err, argv


def test_cli_max_rate_units() -> None:
    from torpor.cli import _rate

    assert _rate("200M") == 200 * 2**20
    assert _rate("1.5GiB/s") == 1.5 * 2**30
    assert _rate("4096") == 4096


# --------------------------------------------------------------------------- power loss

CLI_TIMEOUT = 120


def _cli(*args: str) -> list[str]:
    script = shutil.which("torpor", path=os.path.dirname(sys.executable))
    return [*([script] if script else [sys.executable, "-m", "torpor.cli"]), *args]


@pytest.fixture
def sim_daemon() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="tpd", dir="/tmp")
    yield d
    daemon.stop(d)
    shutil.rmtree(d, ignore_errors=True)


def test_power_loss_mid_save_all_restores_exactly_what_completed(
    sim_daemon: str, save_dir: str
) -> None:
    """A ``torpor host save-all`` process SIGKILLed after three guests, then every
    domain gone (the host rebooted): restore-all brings back exactly those three
    and reports the other two as never saved."""
    # Guest 4 acks only after 60 s: it is in flight when the process dies.
    daemon.start(sim_daemon, ["pv"] * 5, {4: "slow_ack=60"})
    host = f"sim:{sim_daemon}"
    before: dict[int, dict[str, Any]] = {}
    with Host.sim(sim_daemon) as h:
        for d in range(1, 6):
            before[d] = h.hypervisor.call("sim_guest", domid=d)["counters"]  # type: ignore[attr-defined]
    proc = subprocess.Popen(
        _cli("--host", host, "--json", "host", "save-all", "--dir", save_dir,
             "--concurrency", "1", "--ack-timeout", "300"),
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    saved: list[dict[str, Any]] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            obj = json.loads(line)
            assert obj["outcome"] == "saved", obj
            saved.append(obj)
            if len(saved) == 3:
                break
        # Guest 4's request is out (the guest holds it for 60 s): kill now.
        path = "/local/domain/4/control/shutdown"
        with Host.sim(sim_daemon) as h:
            changed = threading.Event()
            watch = h.xenstore.watch(path, lambda _p, _t: changed.set())
            deadline = time.monotonic() + 30
            while h.xenstore.read_or(path, "") != "suspend":
                left = deadline - time.monotonic()
                assert left > 0 and changed.wait(left), "the save of guest 4 never began"
                changed.clear()
            watch.unwatch()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(CLI_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert [s["domid"] for s in saved] == [1, 2, 3]
    manifest = read_manifest(save_dir)
    assert manifest is not None and manifest["complete"] is False
    assert {g["domid"]: g["status"] for g in manifest["guests"]} == {
        1: "saved", 2: "saved", 3: "saved", 4: "pending", 5: "pending"
    }  # fmt: skip
    assert any("torpor-partial" in f for f in os.listdir(save_dir))  # guest 4's, half-written
    # The reboot: every domain that was left is gone.
    with Host.sim(sim_daemon) as h:
        for d in (4, 5):
            h.hypervisor.destroy(d)
        assert [i.domid for i in h.hypervisor.domain_info_list()] == [0]
    r = subprocess.run(
        _cli("--host", host, "--json", "host", "restore-all", "--dir", save_dir),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert r.returncode == EXIT_PARTIAL, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    summary = lines[-1]
    assert summary["summary"] and summary["counts"] == {"restored": 3, "not saved": 2}
    per = {x["domid"]: x for x in lines[:-1]}
    assert {d: per[d]["outcome"] for d in per} == {
        1: "restored", 2: "restored", 3: "restored", 4: "not saved", 5: "not saved"
    }  # fmt: skip
    assert "did not finish" in per[4]["detail"]
    assert not any("torpor-partial" in f for f in os.listdir(save_dir))
    with Host.sim(sim_daemon) as h:
        for d in (1, 2, 3):
            new = per[d]["new_domid"]
            assert h.hypervisor.domain_info(new).running
            c = h.hypervisor.call("sim_guest", domid=new)["counters"]  # type: ignore[attr-defined]
            assert c["boots"] == before[d]["boots"] and c["ticks"] >= before[d]["ticks"]
            assert c["new_domain_resumes"] == before[d]["new_domain_resumes"] + 1


def test_cli_save_all_and_restore_all_exit_codes(sim_daemon: str, save_dir: str) -> None:
    daemon.start(sim_daemon, ["pv", "pv"], {2: "never_ack"})
    host = f"sim:{sim_daemon}"
    r = subprocess.run(
        _cli("--host", host, "host", "save-all", "--dir", save_dir, "--ack-timeout", "0.5"),
        capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip
    assert r.returncode == EXIT_PARTIAL, r.stderr
    assert "pv-guest-1 (domain 1, pv): saved ->" in r.stdout
    assert "pv-guest-2 (domain 2, pv): LEFT RUNNING" in r.stdout
    assert "save-all: 1 saved, 1 left running" in r.stdout
    r = subprocess.run(
        _cli("--host", host, "host", "restore-all", "--dir", save_dir, "--except", "re:.*"),
        capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip
    assert r.returncode == EXIT_OK and "restore-all: 2 excluded" in r.stdout
    r = subprocess.run(
        _cli("--host", host, "host", "restore-all", "--dir", save_dir),
        capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip
    assert r.returncode == EXIT_PARTIAL and "restored from pv-guest-1.save" in r.stdout
    # Nothing left: the next boot's restore-all has nothing to do.
    r = subprocess.run(
        _cli("--host", host, "host", "restore-all", "--dir", save_dir),
        capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip
    assert r.returncode == EXIT_OK and "nothing to restore" in r.stdout

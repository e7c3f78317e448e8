"""`torpor save` on real Xen writes xl's save format; `xl restore` restores it.

In the lab's dom0 (Xen 4.17): torpor's own suspend runs inside
xc_domain_save as its suspend callback, the file is xl's header + libxl's
config + libxl's stream v2 with libxenguest's stream inside, the domain is
destroyed only after the file verified, and then Xen's own `xl restore`
(or `torpor restore`, which delegates the building to libxl) brings the
guest back: its counter goes on, it did not reboot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xenlab
from xenlab import sh

from torpor.errors import AckTimeout
from torpor.facade import Torpor
from torpor.host import Host
from torpor.model import Timeouts
from torpor.xl_savefile import read_save_file, sniff

MakeGuest = Callable[..., xenlab.Guest]

#: dom0's root is in RAM: keep saves small and remove them
SAVE_DIR = Path("/var/lib/torpor-lab-saves")


@pytest.fixture
def save_dir() -> Iterator[Path]:
    SAVE_DIR.mkdir(parents=True, exist_ok=True)
    yield SAVE_DIR
    for p in SAVE_DIR.iterdir():
        p.unlink()


def torpor_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`torpor --host xen ARGS` in dom0, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "torpor.cli", "--host", "xen", "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def gone(xc: xenlab.XenCtrl, domid: int) -> bool:
    return xc.info(domid) is None


def now_domid(g: xenlab.Guest) -> int:
    return int(sh("xl", "domid", g.name).strip())


def last_tick_of_saved(g: xenlab.Guest) -> xenlab.Tick:
    """The guest's last tick once its domain is gone: what it had done when saved."""
    tick = g.last_tick()
    assert tick is not None
    return tick


def check_counter_went_on(
    g: xenlab.Guest, before: xenlab.Tick, timeout: float = 120, *, new_log: bool = False
) -> None:
    """Two new ticks after the restore: it runs on from where it was, not rebooted.

    ``new_log``: the console log was started afresh by the restore (plain HVM's
    ttyS0 is a file the new QEMU truncates, seen in the lab), so a reboot
    would show as a boot line in it, and continuity as none.
    """
    first = g.wait_tick(after=before.n, timeout=timeout)
    after = g.wait_tick(after=first.n, timeout=timeout)
    assert before.n < first.n < after.n, (before, first, after)
    assert after.uptime > before.uptime
    boots = g.console().count("TORPOR-GUEST boot")
    assert boots == (0 if new_log else 1), f"the guest rebooted ({boots} boot lines)"
    record(
        g,
        "ticks",
        {"saved_at": [before.n, before.uptime], "after_restore": [after.n, after.uptime]},
    )


_RESULTS: dict[str, dict[str, object]] = {}


def record(g: xenlab.Guest, key: str, value: object) -> None:
    """Timings and facts per guest, written to the lab's results (xl-save.json)."""
    _RESULTS.setdefault(g.name, {"kind": g.kind})[key] = value
    out = os.environ.get("TORPOR_LAB_OUT")
    if out:
        Path(out, "xl-save.json").write_text(json.dumps(_RESULTS, indent=2) + "\n")


def check_xl_file(path: Path, kind: str) -> dict[str, object]:
    assert sniff(path) == "xl"
    info = read_save_file(path)
    assert info.config["c_info"]["domid"] == 0
    assert info.guest_type == kind
    return info.summary()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", ["pv", "pvh"])
def test_torpor_save_of_a_pv_or_pvh_guest_is_restored_by_xl_restore(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, save_dir: Path, kind: str
) -> None:
    # PVH: claimed by the example plugin (examples/torpor-pvh); libxc saves it
    # as an x86 HVM stream, and libxl writes no QEMU state (it has none).
    g = make_guest(kind, overrides={"memory": "128"})
    old = g.domid
    g.wait_tick()
    path = save_dir / f"{kind}.save"
    t0 = time.monotonic()
    with Torpor(Host.xen(), own_host=True) as t:
        res = t.save(old, path)
    took = time.monotonic() - t0
    assert res.outcome == "saved" and res.state == "destroyed"
    assert gone(xc, old)
    before = last_tick_of_saved(g)
    details = dict(res.details)
    assert details["format"] == "xl" and details["bytes"] == path.stat().st_size
    assert details["libxl_records"] == ["LIBXC_CONTEXT", "END"]
    record(g, "torpor_save", {"seconds": round(took, 3), "result": res.to_dict()})
    check_xl_file(path, kind)
    t1 = time.monotonic()
    sh("xl", "restore", str(path), timeout=120)
    record(g, "xl_restore_seconds", round(time.monotonic() - t1, 3))
    g.domid = now_domid(g)
    assert g.domid != old
    check_counter_went_on(g, before)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", ["pv", "pvh"])
def test_torpor_cli_save_then_torpor_restore_of_a_pv_or_pvh_guest(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, save_dir: Path, kind: str
) -> None:
    g = make_guest(kind, overrides={"memory": "128"})
    old = g.domid
    g.wait_tick()
    path = save_dir / f"{kind}-cli.save"
    t0 = time.monotonic()
    r = torpor_cli("save", str(old), str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    saved = json.loads(r.stdout.splitlines()[-1])
    assert saved["outcome"] == "saved", saved
    record(g, "cli_save", {"seconds": round(time.monotonic() - t0, 3), "result": saved})
    assert gone(xc, old)
    before = last_tick_of_saved(g)
    check_xl_file(path, kind)
    t0 = time.monotonic()
    r = torpor_cli("restore", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    restored = json.loads(r.stdout.splitlines()[-1])
    assert restored["outcome"] == "restored" and restored["state"] == "running", restored
    g.domid = int(restored["domid"])
    assert g.domid == now_domid(g) and g.domid != old
    record(g, "cli_restore", {"seconds": round(time.monotonic() - t0, 3), "result": restored})
    check_counter_went_on(g, before)
    # The file is untouched by a restore: still a valid xl save file.
    check_xl_file(path, kind)


@pytest.mark.timeout(300)
def test_a_paused_guest_never_acks_save_fails_guest_left_running_no_file(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, xs: xenlab.XsConn, save_dir: Path
) -> None:
    g = make_guest("pv", overrides={"memory": "128"})
    before = g.wait_tick()
    sh("xl", "pause", str(g.domid))
    path = save_dir / "never.save"
    t0 = time.monotonic()
    try:
        with Torpor(Host.xen(), own_host=True, timeouts=Timeouts(ack=3.0)) as t:
            with pytest.raises(AckTimeout) as ei:
                t.save(g.domid, path)
    finally:
        sh("xl", "unpause", str(g.domid))
    record(g, "ack_timeout", {"seconds": round(time.monotonic() - t0, 3), "error": str(ei.value)})
    assert ei.value.domid == g.domid
    info = xc.info(g.domid)
    assert info is not None and not info.shutdown
    # the request was withdrawn in a transaction
    assert xs.read(f"/local/domain/{g.domid}/control/shutdown") in ("", None)
    assert not path.exists()
    assert os.listdir(save_dir) == []
    check_counter_went_on(g, before)


@pytest.mark.timeout(300)
def test_a_full_disk_mid_save_resumes_the_guest_where_it_was(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, xs: xenlab.XsConn, save_dir: Path
) -> None:
    """A save file torpor cannot create is refused before the guest is asked.
    xc_domain_save failing after the suspend (ENOSPC on a 4 MiB tmpfs): the
    partial file goes, the guest is resumed cooperatively (fast=1 + XS_RESUME)
    and keeps counting in the same domain."""
    from torpor.errors import ImageError, MigrationFailed

    g = make_guest("pv", overrides={"memory": "128"})
    small = save_dir / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small))
    try:
        before = g.wait_tick()
        t0 = time.monotonic()
        request = f"/local/domain/{g.domid}/control/shutdown"
        xs.watch(request, "ask")
        mark = xs.mark()
        with Torpor(Host.xen(), own_host=True) as t:
            with pytest.raises(ImageError, match="cannot write save file"):
                t.save(g.domid, save_dir / "no-such-dir" / "x.save")
            # xenstored delivers events in order: a request written during the
            # save would have fired before the new watch's initial event.
            xs.watch("/torpor-lab-fence", "fence")
            assert not xs.saw(request, "ask", mark), "the guest was asked to suspend"
            xs.unwatch("/torpor-lab-fence", "fence")
            xs.unwatch(request, "ask")
            with pytest.raises(MigrationFailed) as ei:
                t.save(g.domid, small / "full.save")
        record(g, "enospc", {"seconds": round(time.monotonic() - t0, 3), "error": str(ei.value)})
        assert ei.value.state == "running", ei.value
        assert "resumed cooperatively" in str(ei.value)
        assert os.listdir(small) == []
    finally:
        sh("umount", str(small))
        small.rmdir()
    info = xc.info(g.domid)
    assert info is not None and not info.shutdown
    check_counter_went_on(g, before)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize(
    ("kind", "restorer"), [("pvhvm", "xl"), ("hvm", "xl"), ("pvhvm", "torpor")]
)
def test_torpor_save_of_an_hvm_guest_is_restored(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, save_dir: Path, kind: str, restorer: str
) -> None:
    # HVM boots are slow under TCG, and slower still while other labs share the cores
    g = make_guest(kind, timeout=600)
    old = g.domid
    g.wait_tick()
    path = save_dir / f"{kind}.save"
    t0 = time.monotonic()
    with Torpor(Host.xen(), own_host=True) as t:
        res = t.save(old, path)
    record(g, "torpor_save", {"seconds": round(time.monotonic() - t0, 3), "result": res.to_dict()})
    assert res.outcome == "saved" and gone(xc, old)
    before = last_tick_of_saved(g)
    summary = check_xl_file(path, "hvm")
    assert summary["libxl_records"][-2:] == ["EMULATOR_CONTEXT", "END"]
    g.close_channel()
    t1 = time.monotonic()
    if restorer == "xl":
        sh("xl", "restore", str(path), timeout=300)
        record(g, "xl_restore_seconds", round(time.monotonic() - t1, 3))
        g.domid = now_domid(g)
    else:
        with Torpor(Host.xen(), own_host=True) as t:
            restored = t.restore(path)
        assert restored.outcome == "restored" and restored.state == "running"
        record(
            g,
            "torpor_restore",
            {"seconds": round(time.monotonic() - t1, 3), "result": restored.to_dict()},
        )
        g.domid = restored.domid
        assert g.domid == now_domid(g)
    check_counter_went_on(g, before, timeout=300, new_log=kind == "hvm")


def xl_names() -> list[str]:
    """The names `xl list` shows, in its order."""
    return [line.split()[0] for line in sh("xl", "list").splitlines()[1:] if line.strip()]


@pytest.mark.timeout(600)
def test_restore_while_a_domain_has_the_name_is_refused_and_name_restores_a_copy(
    make_guest: MakeGuest, xc: xenlab.XenCtrl, xs: xenlab.XsConn, save_dir: Path
) -> None:
    """`xl save -c` leaves the guest running: restoring its file would be a second
    copy of it.  torpor refuses before libxl builds anything (NameInUse, naming
    the running domain; `xl list` unchanged), and `--name` restores a copy that
    runs beside it under its own name and UUID, counting on from the save."""
    from torpor.errors import NameInUse

    g = make_guest("pv", overrides={"memory": "128"})
    before = g.wait_tick()
    path = save_dir / "running.save"
    t0 = time.monotonic()
    sh("xl", "save", "-c", str(g.domid), str(path), timeout=120)
    g.wait_tick()  # the guest runs on in its domain (a checkpoint)
    record(g, "xl_save_c_seconds", round(time.monotonic() - t0, 3))
    # xl's own file (xl leaves c_info.domid out rather than writing 0)
    assert sniff(path) == "xl" and read_save_file(path).name == g.name
    domains = sorted(d.domid for d in xc.domains())
    names = xl_names()
    assert names.count(g.name) == 1

    t0 = time.monotonic()
    with Torpor(Host.xen(), own_host=True) as t, pytest.raises(NameInUse) as ei:
        t.restore(path)
    err = ei.value
    record(g, "name_in_use", {"seconds": round(time.monotonic() - t0, 3), "error": str(err)})
    assert err.holder == g.domid and err.name == g.name and err.state == "not created"
    assert f"domain {g.domid} (running) is already named {g.name!r}" in str(err)
    assert sorted(d.domid for d in xc.domains()) == domains  # nothing was built
    assert xl_names() == names
    g.wait_tick()  # untouched: still counting

    copy_name = f"{g.name}-copy"
    t0 = time.monotonic()
    r = torpor_cli("restore", str(path), "--name", copy_name)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        restored = json.loads(r.stdout.splitlines()[-1])
        copy_domid = int(restored["domid"])
        record(
            g, "restore_as_copy", {"seconds": round(time.monotonic() - t0, 3), "result": restored}
        )
        assert restored["state"] == "running" and restored["name"] == copy_name
        assert copy_domid not in domains
        assert sorted(xl_names()) == sorted([*names, copy_name])
        assert xs.read(f"/local/domain/{copy_domid}/name") == copy_name
        assert xs.read(f"/local/domain/{g.domid}/name") == g.name
        vm_copy = xs.read(f"/local/domain/{copy_domid}/vm")
        vm_first = xs.read(f"/local/domain/{g.domid}/vm")
        assert vm_copy and vm_first and vm_copy != vm_first  # its own UUID
        # The copy counts on from the checkpoint, without a boot (its console log,
        # named after it by xenconsoled, starts with the restore).
        copy = xenlab.Guest(
            "pv",
            copy_name,
            copy_domid,
            g.config,
            xenlab.CONSOLE_DIR / f"guest-{copy_name}.log",
            None,
            g.consoles,
            xc,
            g.releases,
        )
        tick = copy.wait_tick(after=0, timeout=120)
        assert tick.n > before.n, (tick, before)
        assert "TORPOR-GUEST boot" not in copy.console()
        record(g, "copy_ticks", {"before_save": before.n, "copy_first": tick.n})
        g.wait_tick()  # and the original still runs
    finally:
        subprocess.run(["xl", "destroy", copy_name], capture_output=True, timeout=60, check=False)

"""Everything torpor reads from a caller or a guest is validated before it is used.

- domids: only integers 0..0x7FEF (dom0 only where allowed), never strings
  with tricks, bools, floats, huge numbers -- checked before any host is
  touched, so nothing reaches a xenstore path;
- xenstore paths: a NUL, "..", spaces, non-ASCII, a non-str are refused before
  a request is sent;
- guest-written values: ``device/suspend/event-channel`` holding garbage
  cannot crash a suspend; a guest's ``device/`` tree is walked only up to
  :data:`torpor.frontends.MAX_FRONTENDS`;
- no shell: no module of torpor runs one, and arguments with shell
  metacharacters reach a child process literally.
"""

from __future__ import annotations

import ast
import asyncio
import os
import shutil
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor.cli import main as cli_main
from torpor.errors import UsageError
from torpor.facade import Torpor
from torpor.frontends import MAX_FRONTENDS, frontends_verdict
from torpor.host import DOMID_FIRST_RESERVED, validate_domid
from torpor.xenstore import Xenstore
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost

ROOT = Path(__file__).resolve().parents[2]

BAD_DOMIDS: list[Any] = [
    "1/../0",
    "1/",
    "../1",
    "/local/domain/1",
    "1\0",
    "-1",
    -1,
    "+1",
    " 1",
    "1 ",
    "1\n",
    "0x1",
    "1e3",
    "1.0",
    1.0,
    "\u0661",  # ARABIC-INDIC DIGIT ONE: isdigit(), and int() accepts it
    "\u00b2",  # SUPERSCRIPT TWO: isdigit(), int() refuses it
    "",
    "999999",
    DOMID_FIRST_RESERVED,
    str(DOMID_FIRST_RESERVED),
    2**64,
    10**100,
    True,
    False,
    None,
    b"1",
    [1],
]


@pytest.mark.parametrize("bad", BAD_DOMIDS, ids=repr)
def test_validate_domid_refuses(bad: Any) -> None:
    with pytest.raises(UsageError):
        validate_domid(bad)
    with pytest.raises(UsageError):
        validate_domid(bad, allow_dom0=True)


@pytest.mark.parametrize(("good", "want"), [("1", 1), (1, 1), ("32751", 32751), (7, 7)])
def test_validate_domid_accepts(good: Any, want: int) -> None:
    assert validate_domid(good) == want


def test_dom0_only_where_allowed() -> None:
    with pytest.raises(UsageError, match="control domain"):
        validate_domid(0)
    assert validate_domid("0", allow_dom0=True) == 0


@pytest.fixture
def sim() -> Iterator[SimHost]:
    d = tempfile.mkdtemp(prefix="sec", dir="/tmp")
    h = SimHost(d, qemu=False)
    h.start()
    h.create_guest("pv")
    yield h
    h.stop()
    shutil.rmtree(d, ignore_errors=True)


def _tree(host: SimHost) -> dict[str, Any]:
    """What an operation would have written first: intent records, the request."""

    async def snap() -> dict[str, Any]:
        assert host.xenstored is not None
        return {
            p: n.value
            for p, n in host.xenstored.tree_snapshot().items()
            if p.startswith(("/local/domain/0/torpor", "/local/domain/1/control"))
        }

    return host.run(snap())


@pytest.mark.parametrize("bad", ["1/../0", "../../1", "1/control", "-1", True, 2**64])
def test_every_operation_refuses_a_bad_domid_before_touching_the_host(
    sim: SimHost, bad: Any
) -> None:
    before = _tree(sim)
    with Torpor(sim.toolstack_host(), own_host=True) as t:
        for call in (
            lambda: t.suspend(bad),
            lambda: t.resume(bad),
            lambda: t.checkpoint(bad),
            lambda: t.status(bad),
            lambda: t.recover(bad),
            lambda: t.save(bad, os.path.join(sim.dir, "img")),
        ):
            with pytest.raises(UsageError):
                call()
    assert _tree(sim) == before  # not even an intent record
    assert not os.path.exists(os.path.join(sim.dir, "img"))


def test_the_cli_refuses_a_bad_domid_with_exit_code_2(sim: SimHost) -> None:
    before = _tree(sim)
    for argv in (["suspend", "1/../0"], ["resume", "1;reboot"], ["status", "$(id)"]):
        assert cli_main(["--host", f"sim:{sim.dir}", *argv]) == 2
    assert _tree(sim) == before


@pytest.mark.parametrize(
    "bad",
    ["/a\0", "/a\0/b", "/local/domain/1/../0", "relative/../x", "/a b", "/\u00fc", "/a//b", "/a/"],
    ids=repr,
)
def test_xenstore_paths_are_refused_before_a_request_is_sent(bad: str) -> None:
    """The first two: pyxs's path check lets a trailing NUL through, which would
    have ended the path early and slipped a NUL into a written value."""
    xs = Xenstore("/nonexistent/socket")  # never connected: validation comes first
    for call in (
        lambda: xs.read(bad),
        lambda: xs.write(bad, "v"),
        lambda: xs.rm(bad),
        lambda: xs.ls(bad),
        lambda: xs.watch(bad, lambda p, t: None),
    ):
        with pytest.raises(UsageError):
            call()


def test_non_str_paths_and_oversized_values_are_refused() -> None:
    xs = Xenstore("/nonexistent/socket")
    with pytest.raises(UsageError):
        xs.read(b"/a")  # type: ignore[call-overload]
    with pytest.raises(UsageError):
        xs.write("/a", "v" * 5000)


# -- guest-written values -----------------------------------------------------------------

GARBAGE_PORTS = [
    "\u00b2",  # isdigit() but int() fails: crashed the suspend (ValueError)
    "\u0661\u0662",  # Arabic-Indic 12: isdigit() and int() == 12
    "../..",
    "-1",
    "0",
    "99999999999999999999",
    "9" * 2000,
    "0x10",
    " 5",
    "5\n",
    "\udcff",
]


@pytest.mark.parametrize("value", GARBAGE_PORTS, ids=repr)
def test_garbage_suspend_event_channel_falls_back_to_xenstore(sim: SimHost, value: str) -> None:
    """A PV guest publishes anything at device/suspend/event-channel (its own node):
    torpor ignores what is not a plausible port and asks through control/shutdown."""
    with Xenstore(sim.guest_xenstore_socket(1)).connect() as g:  # as the guest
        g.write("device/suspend/event-channel", value.encode("utf-8", "surrogateescape"))
    with Torpor(sim.toolstack_host(), own_host=True) as t:
        result = t.suspend(1)
        assert (result.outcome, str(result.method)) == ("suspended", "xenstore")
        assert t.resume(1).state == "running"


async def _verdict(host: SimHost, domid: int) -> tuple[Any, int]:
    xs = Xenstore(host.xenstore_socket).connect()
    calls = 0
    real_read_or, real_ls = xs.aio.read_or, xs.aio.ls

    async def read_or(*a: Any, **k: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real_read_or(*a, **k)

    async def ls(*a: Any, **k: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real_ls(*a, **k)

    xs.aio.read_or = read_or  # type: ignore[method-assign]
    xs.aio.ls = ls  # type: ignore[method-assign]
    ctx = types.SimpleNamespace(xenstore=xs.aio, dompath=f"/local/domain/{domid}")
    try:
        return await frontends_verdict(ctx), calls  # type: ignore[arg-type]
    finally:
        xs.close()


def _bare_guest(sim: SimHost) -> int:
    """A PV guest without frontends of its own: its device/ is the test's alone."""
    return sim.create_guest("pv", behaviour=Behaviour(frontends=()))


def test_frontends_verdict_reads_a_bounded_part_of_a_flooded_device_tree(sim: SimHost) -> None:
    """A guest fills device/ with frontends up to its node quota: each verdict
    reads what is there once, and gives up past MAX_FRONTENDS (which only a
    toolstack, not a quota-bound guest, can reach)."""
    from torpor.errors import XenstoreError

    d = _bare_guest(sim)
    written = 0
    with Xenstore(sim.guest_xenstore_socket(d)).connect() as g:
        with pytest.raises(XenstoreError, match="ENOSPC"):
            for i in range(MAX_FRONTENDS + 44):
                g.write(f"device/vif/{1000 + i}/state", "1")
                written += 1
    assert written < MAX_FRONTENDS  # the quota stops a guest first
    verdict, calls = asyncio.run(_verdict(sim, d))
    assert not verdict.done and not verdict.failed  # Initialising: pending
    assert "and " in verdict.detail and len(verdict.detail) < 400  # not all of them quoted
    assert calls <= written + 10
    with Xenstore(sim.xenstore_socket).connect() as dom0:
        dom0.rm(f"/local/domain/{d}/device/vif")
        # Spread over the device types so that each listing fits one reply.
        kinds = ("vif", "vbd", "qdisk", "vkbd")
        for i in range(MAX_FRONTENDS + 44):
            dom0.write(f"/local/domain/{d}/device/{kinds[i % 4]}/{i}/state", "1")
    verdict, calls = asyncio.run(_verdict(sim, d))
    assert verdict.failed and f"more than {MAX_FRONTENDS}" in verdict.detail
    assert calls <= MAX_FRONTENDS + 10


def test_frontends_verdict_on_a_listing_too_long_for_one_reply(sim: SimHost) -> None:
    """device/vif names too many ids for one XS_DIRECTORY payload: xenstored says
    E2BIG, the verdict fails saying so (not an exception out of the resume)."""
    d = _bare_guest(sim)
    with Xenstore(sim.xenstore_socket).connect() as dom0:
        for i in range(800):
            dom0.write(f"/local/domain/{d}/device/vif/{100000 + i}/state", "4")
    verdict, calls = asyncio.run(_verdict(sim, d))
    assert verdict.failed and "E2BIG" in verdict.detail and "device/vif" in verdict.detail
    assert calls <= 3


def test_frontends_verdict_on_garbage_states_and_unknown_types(sim: SimHost) -> None:
    d = _bare_guest(sim)
    with Xenstore(sim.guest_xenstore_socket(d)).connect() as g:
        g.write("device/vif/0/state", "../4" + "x" * 1500)
        g.write("device/vbd/51712/state", "4")
        g.write("device/evil-type/0/state", "1")  # not a device type torpor knows
    verdict, _ = asyncio.run(_verdict(sim, d))
    assert not verdict.done and not verdict.failed
    assert "vif/0" in verdict.detail and "evil-type" not in verdict.detail
    assert len(verdict.detail) < 200  # a guest's 1500-byte state is not copied whole
    with Xenstore(sim.guest_xenstore_socket(d)).connect() as g:
        g.write("device/vif/0/state", "4")
    verdict, _ = asyncio.run(_verdict(sim, d))
    assert verdict.done


# -- no shell -------------------------------------------------------------------------------

SHELL_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("os", "execl"),
    ("os", "execlp"),
    ("os", "spawnl"),
    ("os", "spawnlp"),
    ("pty", "spawn"),
    ("asyncio", "create_subprocess_shell"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
}
POPEN_LIKE = {"run", "Popen", "call", "check_call", "check_output", "create_subprocess_exec"}
PROCESS_MODULES = {"subprocess", "asyncio"}


def _shell_uses(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        if (owner, name) in SHELL_CALLS or name in {n for _, n in SHELL_CALLS} - {"spawn"}:
            found.append(f"{path}:{node.lineno}: {owner}.{name}")
        for kw in node.keywords:
            if kw.arg == "shell" and not (
                isinstance(kw.value, ast.Constant) and kw.value.value is False
            ):
                found.append(f"{path}:{node.lineno}: shell={ast.unparse(kw.value)}")
        if (
            owner in PROCESS_MODULES
            and name in POPEN_LIKE
            and node.args
            and isinstance(node.args[0], ast.Constant | ast.JoinedStr | ast.BinOp)
        ):
            found.append(f"{path}:{node.lineno}: {owner}.{name} with a command string")
    return found


def test_no_module_of_torpor_runs_a_shell() -> None:
    sources = [
        p
        for top in ("core/torpor", "plugins", "examples/torpor-pvh")
        for p in (ROOT / top).rglob("*.py")
    ]
    assert len(sources) > 30
    found = [hit for p in sources for hit in _shell_uses(p)]
    assert found == []


def test_the_scan_would_catch_a_shell(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, subprocess, asyncio\n"
        "os.system('x')\n"
        "subprocess.run('ls', shell=True)\n"
        "subprocess.check_output(f'ls {x}')\n"
        "asyncio.create_subprocess_shell('x')\n"
    )
    found = _shell_uses(bad)
    assert [f.split(": ", 1)[1] for f in found] == [
        "os.system",
        "shell=True",
        "subprocess.run with a command string",
        "subprocess.check_output with a command string",
        "asyncio.create_subprocess_shell",
    ]


def test_shell_metacharacters_reach_the_sim_daemon_literally() -> None:
    """`torpor sim start` runs its daemon with an argv list: a directory name full
    of shell syntax is a directory name, and nothing it spells is run."""
    from torpor_sim import daemon

    short = Path(tempfile.mkdtemp(prefix="sh", dir="/tmp"))
    marker = short / "p"
    weird = short / f"x y;touch {marker}|$(touch {marker})"
    try:
        assert len(str(weird / "xenstored" / "domain-1.sock")) < 108
        guests = daemon.start(weird, ["pv"], timeout=60)
        assert [g["domid"] for g in guests] == [1]
        assert (weird / "hypervisor.sock").exists()
        assert not marker.exists()
        assert daemon.stop(weird)
        assert not marker.exists()
    finally:
        shutil.rmtree(short, ignore_errors=True)

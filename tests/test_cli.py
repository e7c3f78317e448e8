"""The ``torpor`` CLI's operations against a ``torpor sim`` daemon (issue 4's check).

One daemon per module: domain 1 a PV guest, 2 a PVHVM guest, 3 an HVM guest
(real QEMU where installed, else the in-process device model), 4 a PV guest
that never acknowledges a suspend request.  Each command runs through
``torpor.cli.main`` in this process (the parser, the host, the output and
the exit code, as a shell sees them) except the first, which runs the
installed ``torpor`` script to prove the entry point.  ``--json`` lines are
parsed and checked against what the daemon says independently (its
hypervisor socket and xenstored), not only against torpor's own claims.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor.cli import EXIT_ALL_FAILED, EXIT_BACKEND, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from torpor.hypervisor.remote import RemoteHypervisor
from torpor.model import HVM_PARAM_ACPI_S_STATE
from torpor.xenstore import Xenstore
from torpor_sim import daemon
from torpor_sim.qemu import qemu_binary

PV, PVHVM, HVM, MUTE = 1, 2, 3, 4
FAST = ["--ack-timeout", "0.5"]  # the mute guest is refused quickly


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="tc", dir="/tmp")
    try:
        daemon.start(
            d,
            ["pv", "pvhvm", "hvm", "pv"],
            {MUTE: "never_ack"},
            qemu=qemu_binary() is not None,
            timeout=120,
        )
        yield d
    finally:
        daemon.stop(d)
        shutil.rmtree(d, ignore_errors=True)


class Cli:
    """``torpor --host sim:DIR ...`` in this process: exit code, stdout lines, stderr."""

    def __init__(self, host: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.host = host
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, list[str], str]:
        self.capsys.readouterr()
        code = main(["--host", f"sim:{self.host}", *args])
        out = self.capsys.readouterr()
        return code, out.out.splitlines(), out.err

    def json(self, *args: str) -> tuple[int, list[dict[str, Any]]]:
        code, lines, _ = self(*args, "--json")
        return code, [json.loads(line) for line in lines]


@pytest.fixture
def cli(host: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(host, capsys)


@pytest.fixture
def witness(host: str) -> Iterator[tuple[RemoteHypervisor, Xenstore]]:
    """The daemon's hypervisor and xenstored, asked directly."""
    hv = RemoteHypervisor(os.path.join(host, "hypervisor.sock"))
    xs = Xenstore(os.path.join(host, "xenstored", "socket")).connect()
    yield hv, xs
    xs.close()
    hv.close()


def _state(hv: RemoteHypervisor, domid: int) -> str:
    return hv.domain_info(domid).state_word()


def test_the_installed_script_lists_the_three_guest_types(host: str) -> None:
    script = shutil.which("torpor", path=os.path.dirname(sys.executable))
    cmd = [script] if script else [sys.executable, "-m", "torpor.cli"]
    proc = subprocess.run(
        [*cmd, "--host", f"sim:{host}", "list", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_OK, proc.stderr
    rows = {r["domid"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert {d: rows[d]["guest_type"] for d in (PV, PVHVM, HVM, MUTE)} == {
        PV: "pv",
        PVHVM: "pvhvm",
        HVM: "hvm",
        MUTE: "pv",
    }
    assert all(rows[d]["state"] == "running" for d in rows)


def test_plugins_lists_the_built_ins_found_through_entry_points(cli: Cli) -> None:
    code, rows = cli.json("plugins")
    assert code == EXIT_OK
    origin = {r["name"]: r["origin"] for r in rows}
    # The built-ins come through the torpor distribution's entry points, the
    # same group a third party's plugin uses; listed in the order hooks ask
    # them, so the core's generic mechanisms (registered first) come last.
    assert rows[-1]["name"] == "torpor.protocol"
    for name in ("pv", "pvhvm", "hvm"):
        assert origin[name].startswith("torpor "), rows
        assert "torpor_classify_domain" in next(r["hooks"] for r in rows if r["name"] == name)


@pytest.mark.parametrize(
    ("domid", "kind", "method", "outcome", "state", "hv_state"),
    [
        (PV, "pv", "xenstore", "suspended", "suspended", "suspended"),
        (PVHVM, "pvhvm", "xenstore", "suspended", "suspended", "suspended"),
        # The sim's HVM guest has a guest agent and QEMU can wake it: ACPI S3.
        # Xen sees a domain in S3 as running (not paused, not shut down).
        (HVM, "hvm", "acpi-s3", "asleep", "S3", "running"),
    ],
)
def test_suspend_then_resume_each_type(
    cli: Cli,
    witness: tuple[RemoteHypervisor, Xenstore],
    domid: int,
    kind: str,
    method: str,
    outcome: str,
    state: str,
    hv_state: str,
) -> None:
    hv, xs = witness
    code, (res,) = cli.json("suspend", str(domid))
    assert code == EXIT_OK, res
    assert res["ok"] and res["domid"] == domid and res["guest_type"] == kind
    assert (res["method"], res["outcome"], res["state"]) == (method, outcome, state)
    # What the hypervisor says, not what torpor says.
    assert _state(hv, domid) == hv_state
    if kind != "pv":  # a PV domain has no HVM params (EINVAL)
        assert hv.get_hvm_param(domid, HVM_PARAM_ACPI_S_STATE) == (3 if state == "S3" else 0)
    assert xs.read_or(f"/local/domain/{domid}/control/shutdown", "") == ""

    code, (res,) = cli.json("resume", str(domid))
    assert code == EXIT_OK, res
    assert res["ok"] and res["state"] == "running"
    if method == "acpi-s3":
        assert res["woke_from_s3"] is True  # no hypercall to return from
        assert hv.get_hvm_param(domid, HVM_PARAM_ACPI_S_STATE) == 0
    else:
        assert res["cooperative"] is True
    assert _state(hv, domid) == "running"
    phases = [p for p, _ in res["phases"]]
    assert phases[0] == "validate" and phases[-1] == "verify"


def test_checkpoint_count_prints_one_result_per_checkpoint(
    cli: Cli, witness: tuple[RemoteHypervisor, Xenstore]
) -> None:
    hv, _ = witness
    code, rows = cli.json("checkpoint", str(PV), "--count", "5")
    assert code == EXIT_OK
    assert len(rows) == 5
    assert all(r["ok"] and r["operation"] == "checkpoint" for r in rows)
    assert all(r["state"] == "running" and r["cooperative"] is True for r in rows)
    assert _state(hv, PV) == "running"


def test_refusals_are_idempotent_and_touch_nothing(
    cli: Cli, witness: tuple[RemoteHypervisor, Xenstore]
) -> None:
    hv, _ = witness
    code, (res,) = cli.json("resume", str(PV))  # running already
    assert code == EXIT_ALL_FAILED
    assert not res["ok"] and res["phase"] == "validate" and res["state"] == "running"

    assert cli.json("suspend", str(PV))[0] == EXIT_OK
    try:
        for _ in range(2):
            code, (res,) = cli.json("suspend", str(PV))
            assert code == EXIT_ALL_FAILED
            assert res["phase"] == "validate" and res["state"] == "suspended"
            assert _state(hv, PV) == "suspended"
        # An in-place non-cooperative resume is refused unless forced.
        code, (res,) = cli.json("resume", str(PV), "--slow")
        assert code == EXIT_ALL_FAILED
        assert res["phase"] == "validate" and res["state"] == "suspended"
        assert "force it" in res["message"]
        assert _state(hv, PV) == "suspended"
    finally:
        assert cli.json("resume", str(PV))[0] == EXIT_OK
    assert _state(hv, PV) == "running"


def test_a_guest_that_never_acks_is_left_running_with_the_request_withdrawn(
    cli: Cli, witness: tuple[RemoteHypervisor, Xenstore]
) -> None:
    hv, xs = witness
    code, (res,) = cli.json("suspend", str(MUTE), *FAST)
    assert code == EXIT_ALL_FAILED
    assert not res["ok"]
    assert res["phase"] == "ack" and res["state"] == "running"
    assert res["error"] == "AckTimeout"
    assert _state(hv, MUTE) == "running"
    assert xs.read_or(f"/local/domain/{MUTE}/control/shutdown", "") == ""
    code, (st,) = cli.json("status", str(MUTE))
    assert code == EXIT_OK
    assert st["state"] == "running" and st["request_pending"] is False and st["intent"] is None


def test_some_failed_is_exit_code_1_and_every_domain_is_reported(cli: Cli) -> None:
    code, rows = cli.json("suspend", str(PV), str(MUTE), *FAST)
    try:
        assert code == EXIT_PARTIAL
        assert [(r["domid"], r["ok"]) for r in rows] == [(PV, True), (MUTE, False)]
    finally:
        assert cli.json("resume", str(PV))[0] == EXIT_OK


def test_each_domain_is_reported_once_on_stdout_and_nothing_on_stderr(cli: Cli) -> None:
    # 999 does not exist: refused before any hook sees it, so reported at the end,
    # by the command; the others as they finish, by the Reporter plugin. Once each.
    code, lines, err = cli("suspend", str(PV), str(MUTE), "999", *FAST)
    try:
        assert code == EXIT_PARTIAL
        assert sorted(line.split(":")[0] for line in lines) == [
            f"domain {PV}",
            f"domain {MUTE}",
            "domain 999",
        ]
        assert sum(f"domain {PV}: suspend ok" in line for line in lines) == 1
        assert lines[-1].startswith("domain 999: suspend FAILED: [domain 999, phase validate]")
        # Not a terminal, and nothing waited a second: no progress at all.
        assert err == ""
    finally:
        assert cli.json("resume", str(PV))[0] == EXIT_OK


def test_text_output_names_the_phase_and_the_state(cli: Cli) -> None:
    code, lines, err = cli("suspend", str(MUTE), *FAST)
    assert code == EXIT_ALL_FAILED
    (line,) = lines
    assert line.startswith(f"domain {MUTE}: suspend FAILED: [domain {MUTE}, phase ack]")
    assert line.endswith("(domain state: running)")
    assert "Traceback" not in err


def test_a_domain_that_does_not_exist(cli: Cli) -> None:
    code, (res,) = cli.json("suspend", "999")
    assert code == EXIT_ALL_FAILED
    assert res["error"] == "NoSuchDomain" and res["phase"] == "validate"


@pytest.mark.parametrize("bad", ["-1", "abc", "32752", "1/../0"])
def test_a_malformed_domid_is_a_usage_error(cli: Cli, bad: str) -> None:
    code, _, err = cli("suspend", "--", bad)
    assert code == EXIT_USAGE
    assert "domid" in err and "Traceback" not in err


def test_no_simulated_host_there_is_backend_unavailable(
    capsys: pytest.CaptureFixture[str], short_dir: str
) -> None:
    code = main(["--host", f"sim:{short_dir}", "suspend", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_BACKEND
    assert "torpor sim start" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    [["save", "1", "/tmp/never-written.img"], ["restore", "IMAGE"], ["migrate", "1"]],
    ids=["save", "restore", "migrate"],
)
def test_a_host_without_a_domain_builder_is_backend_unavailable(
    cli: Cli, host: str, monkeypatch: pytest.MonkeyPatch, command: list[str], tmp_path: Path
) -> None:
    # Every host torpor opens has a builder; an embedder's Host may not.  The
    # orchestrator refuses with BackendUnavailable before touching the guest.
    from torpor.host import Host

    real_sim = Host.sim

    def without_builder(cls: type[Host], directory: str) -> Host:
        h = real_sim(host)  # whichever directory: the module's host, without a builder
        h.builder = None
        return h

    monkeypatch.setattr(Host, "sim", classmethod(without_builder))
    image = tmp_path / "never-read.img"
    image.write_bytes(b"")  # restore refuses a missing FILE as bad usage, before any host
    args = [str(image) if a == "IMAGE" else a for a in command]
    # Not the source itself (refused as bad usage): another directory, the same host.
    args += ["--to", f"sim:{tmp_path}"] if command[0] == "migrate" else []
    code, out, err = cli(*args)
    assert code == EXIT_BACKEND, (out, err)
    assert "no domain builder" in " ".join(out) + err


@pytest.mark.parametrize(
    "option",
    [["--host", "xen"], ["-p", "some_plugin"], ["--no-plugin", "pv"], ["--ack-timeout", "1"]],
)
def test_demo_refuses_options_it_would_not_honour(
    capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    code = main(["demo", *option])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"{option[0]} does not apply to `torpor demo`" in err
    assert "runs its own simulated host" in err and "Traceback" not in err


def test_migrate_names_the_guest_by_its_source_domid_and_its_new_one(
    cli: Cli, short_dir: str
) -> None:
    daemon.start(short_dir, ["pv"], qemu=False)
    try:
        # Both daemons call their first guest pv-guest-1; a name is unique on a
        # host, so the destination's own guest is renamed first (as `xl rename`).
        with Xenstore(f"{short_dir}/xenstored/socket") as xs:
            xs.write("/local/domain/1/name", "destination-guest")
        code, out, _ = cli("migrate", str(PV), "--to", f"sim:{short_dir}")
        assert code == EXIT_OK
        assert out[0].startswith(f"domain {PV}: migrate ok via xenstore (non-cooperative): ")
        assert f"now running as domain 2 on sim:{short_dir}" in out[0]
        code, (back,) = Cli(short_dir, cli.capsys).json("migrate", "2", "--to", f"sim:{cli.host}")
        assert code == EXIT_OK and back["source_domid"] == 2 and back["ok"]
    finally:
        daemon.stop(short_dir)

"""A guest agent's refusal reaches the caller as a typed cause (issue 12, seen item 9).

An HVM guest whose QEMU guest agent was built without ``guest-suspend-ram``
answers it with QMP's ``CommandNotFound``.  The suspend fails at once with an
``OperationError`` (the guest keeps running), and its ``cause`` is the
agent's :class:`~torpor.errors.QmpCommandError` -- error class and
description kept, not flattened into the message -- in the library, in
``to_dict()`` and in the CLI's ``--json`` line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from torpor.cli import EXIT_ALL_FAILED, main
from torpor.errors import OperationError, QmpCommandError
from torpor.facade import Torpor
from torpor.model import HVM_PARAM_ACPI_S_STATE, Phase, Timeouts
from torpor_sim import daemon
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost

NOT_FOUND = "The command guest-suspend-ram has not been found"


def test_a_refusing_agent_is_the_typed_cause_of_the_operation_error(sim_host: SimHost) -> None:
    domid = sim_host.create_guest("hvm", behaviour=Behaviour(misbehaviour="unknown_command"))
    # A long suspend deadline: the refusal must end the wait, not the deadline.
    with Torpor(sim_host.toolstack_host(), own_host=True, timeouts=Timeouts(suspend=60)) as t:
        with pytest.raises(OperationError) as ei:
            t.suspend(domid)
    err = ei.value
    assert err.state == "running" and err.phase == Phase.SHUTDOWN and err.domid == domid
    cause = err.cause
    assert isinstance(cause, QmpCommandError)
    assert cause.error_class == "CommandNotFound"
    assert cause.command == "guest-suspend-ram"
    assert cause.desc == NOT_FOUND
    assert err.__cause__ is cause
    # The guest was never put to sleep and runs on.
    assert sim_host.xen.domain_info(domid).running
    assert sim_host.hypervisor().get_hvm_param(domid, HVM_PARAM_ACPI_S_STATE) == 0

    out = json.loads(json.dumps(err.to_dict()))
    assert out["error"] == "OperationError" and out["state"] == "running"
    assert "CommandNotFound" in out["cause"]  # the repr, as before
    assert out["caused_by"] == {
        "error": "QmpCommandError",
        "message": f"guest agent guest-suspend-ram: CommandNotFound: {NOT_FOUND}",
        "domid": domid,
        "phase": None,
        "cause": None,
        "caused_by": None,
        "command": "guest-suspend-ram",
        "error_class": "CommandNotFound",
        "desc": NOT_FOUND,
    }


def test_an_error_without_a_torpor_cause_has_no_caused_by() -> None:
    err = OperationError("suspend failed", state="running", cause=ValueError("x"))
    assert err.to_dict()["cause"] == "ValueError('x')"
    assert err.to_dict()["caused_by"] is None
    assert OperationError("no cause").to_dict()["caused_by"] is None


@pytest.fixture
def refusing_host() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ta", dir="/tmp")
    try:
        daemon.start(d, ["hvm"], {1: "unknown_command"}, qemu=False, timeout=120)
        yield d
    finally:
        daemon.stop(d)
        shutil.rmtree(d, ignore_errors=True)


def test_the_cli_json_line_carries_the_agents_error_class(
    refusing_host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--host", f"sim:{refusing_host}", "--json", "suspend", "1"])
    assert code == EXIT_ALL_FAILED
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    out = json.loads(line)
    assert out["ok"] is False and out["error"] == "OperationError" and out["state"] == "running"
    assert out["caused_by"]["error"] == "QmpCommandError"
    assert out["caused_by"]["error_class"] == "CommandNotFound"
    assert out["caused_by"]["desc"] == NOT_FOUND

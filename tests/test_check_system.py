"""tools/check_system.py: `make test` names the Debian package a machine lacks."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "check_system.py"


@pytest.fixture
def check_system() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_system", TOOL)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_missing_package_is_named_with_the_command_that_installs_it(
    check_system: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no qemu, no xenstore-read, no gcc
    monkeypatch.setattr(check_system.os.path, "exists", lambda _p: False)
    assert check_system.main() == 1
    err = capsys.readouterr().err
    for package in ("qemu-system-x86", "xenstore-utils", "libxen-dev", "gcc", "python3-dev"):
        assert f"  - {package}: " in err
    assert (
        "sudo apt-get install -y qemu-system-x86 xenstore-utils libxen-dev gcc python3-dev" in err
    )


def test_a_complete_machine_passes(
    check_system: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(check_system.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(check_system.os.path, "exists", lambda _p: True)
    assert check_system.main() == 0
    assert "present" in capsys.readouterr().out

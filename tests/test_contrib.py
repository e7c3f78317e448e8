"""contrib/: the systemd unit and the xendomains-style config file (issue 16).

``systemd-analyze verify`` passes on the unit (with ExecStart/ExecStop
pointed at this test run's ``torpor``: verify checks that the programs
exist); the shipped config file is read by ``torpor host ... --config``
and says what the command's own defaults are.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torpor.cli import build_parser, main, read_host_config
from torpor.errors import UsageError
from torpor.operations.hostwide import DEFAULT_CONCURRENCY, DEFAULT_SHUTDOWN_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib/systemd/torpor-host.service"
DEFAULTS = ROOT / "contrib/default/torpor-host"
INSTALLED = "/usr/local/bin/torpor"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip(
            "systemd-analyze is not installed (Debian package systemd; .ci/run installs it)"
        )
    torpor = shutil.which("torpor", path=str(Path(sys.executable).parent))
    assert torpor is not None, "the torpor command of this test run"
    unit = tmp_path / "torpor-host.service"
    unit.write_text(unit_text.replace(INSTALLED, torpor))
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def test_systemd_analyze_verify_passes_on_the_unit(tmp_path: Path) -> None:
    r = _verify(UNIT.read_text(), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("Type=oneshot", "Type=oneshot-ish")
    r = _verify(broken, tmp_path)
    assert r.returncode != 0 or "oneshot-ish" in r.stderr, r.stdout + r.stderr


def test_the_unit_is_oneshot_restore_at_start_save_at_stop_in_xens_order() -> None:
    d = _directives(UNIT.read_text())
    assert d["Service.Type"] == ["oneshot"] and d["Service.RemainAfterExit"] == ["yes"]
    (start,) = d["Service.ExecStart"]
    (stop,) = d["Service.ExecStop"]
    assert start.startswith(INSTALLED) and " host restore-all " in start
    assert stop.startswith(INSTALLED) and " host save-all " in stop
    for cmd in (start, stop):
        assert "--config /etc/default/torpor-host" in cmd and "--host xen" in cmd
    after = " ".join(d["Unit.After"]).split()
    for unit in ("xenstored.service", "xen-init-dom0.service", "xenconsoled.service",
                 "proc-xen.mount", "network-online.target", "remote-fs.target"):  # fmt: skip
        assert unit in after, unit
    assert d["Unit.Conflicts"] == ["xendomains.service"]
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_the_shipped_config_reads_and_says_the_commands_defaults() -> None:
    cfg = read_host_config(str(DEFAULTS))
    assert cfg == {
        "dir": "/var/lib/xen/save",
        "concurrency": DEFAULT_CONCURRENCY,
        "shutdown_fallback": False,
        "shutdown_timeout": DEFAULT_SHUTDOWN_TIMEOUT,
        "ack_timeout": 30.0,
        "only": [],
        "exclude": [],
        "restore": True,
    }


def _checked(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("host", "plugin", "no_plugin", "ack_timeout", "suspend_timeout"):
        if getattr(args, name, None) is None:
            setattr(args, name, None)
    args.check(args)
    return args


def test_config_settings_apply_where_the_command_line_gives_none(tmp_path: Path) -> None:
    cfg = tmp_path / "torpor-host"
    cfg.write_text(
        f'TORPOR_HOST_SAVE_DIR="{tmp_path}/save"  # a comment\n'
        "TORPOR_HOST_CONCURRENCY=7\nTORPOR_HOST_MAX_RATE=200M\n"
        "TORPOR_HOST_SHUTDOWN_FALLBACK=yes\nTORPOR_HOST_EXCEPT='db1 re:test-.*'\n"
    )
    args = _checked(["host", "save-all", "--config", str(cfg), "--concurrency", "2"])
    assert args.dir == f"{tmp_path}/save" and args.concurrency == 2  # the option wins
    assert args.max_rate == 200 * 2**20 and args.shutdown_fallback is True
    assert args.exclude == ["db1", "re:test-.*"]


def test_a_bad_config_is_a_usage_error_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "torpor-host"
    cfg.write_text("TORPOR_HOST_SAVE_DIR=/x\nTORPOR_HOST_CONCURENCY=4\n")
    with pytest.raises(UsageError, match=r":2: unknown setting"):
        read_host_config(str(cfg))
    cfg.write_text("TORPOR_HOST_CONCURRENCY=0\n")
    assert main(["host", "save-all", "--config", str(cfg)]) == 2
    assert "TORPOR_HOST_CONCURRENCY" in capsys.readouterr().err


def test_restore_at_boot_can_be_turned_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "torpor-host"
    cfg.write_text(f"TORPOR_HOST_SAVE_DIR={tmp_path}\nTORPOR_HOST_RESTORE=no\n")
    assert main(["--host", "sim:/nonexistent", "host", "restore-all", "--config", str(cfg)]) == 0
    assert "nothing restored" in capsys.readouterr().out

"""The bench's own tools: the lab numbers' collection and their rendering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def collect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / "xen" / "collect.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_collect_merges_partial_lab_runs_the_later_winning(tmp_path: Path) -> None:
    a, b, dst = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "results.json"
    a.write_text(json.dumps({"pvh": {"n": 5}, "pvhvm": {"n": 1}}))
    b.write_text(json.dumps({"pvhvm": {"n": 5}, "anatomy_pvh": {"total_s": 14.0}}))
    dst.write_text(json.dumps({"real_xen": {"kept": True}}))
    r = collect(str(a), str(b), str(dst), "real_xen_migration")
    assert r.returncode == 0, r.stderr
    got = json.loads(dst.read_text())
    assert got["real_xen"] == {"kept": True}
    assert got["real_xen_migration"] == {
        "pvh": {"n": 5},
        "pvhvm": {"n": 5},
        "anatomy_pvh": {"total_s": 14.0},
    }


def test_collect_one_source_keeps_its_old_form(tmp_path: Path) -> None:
    src, dst = tmp_path / "bench-xen.json", tmp_path / "results.json"
    src.write_text(json.dumps({"ratio_torpor_vs_raw": 2.0}))
    assert collect(str(src), str(dst)).returncode == 0
    assert json.loads(dst.read_text()) == {"real_xen": {"ratio_torpor_vs_raw": 2.0}}


def test_collect_names_a_missing_source(tmp_path: Path) -> None:
    r = collect(str(tmp_path / "nope.json"), str(tmp_path / "r.json"), "real_xen_migration")
    assert r.returncode == 1
    assert "nope.json is missing" in r.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCH))
    import report as module

    return module


def test_report_lists_a_guest_crash_with_the_hypervisors_words(report: Any) -> None:
    mig = {
        "pvhvm": {
            "guest_crashes": [
                {
                    "sender": "torpor_to_torpor",
                    "domid": 20,
                    "reason": "reboot",
                    "after_success": True,
                    "last_tick_into_command_s": 9.1,
                    "hypervisor_log": ["(XEN) d20v0 Triple fault - invoking HVM shutdown action 1"],
                    "run": 0,
                }
            ]
        }
    }
    text = "\n".join(report._guest_crashes(mig, {"torpor_to_torpor": "torpor -> torpor"}))
    assert "| pvhvm | torpor -> torpor | 0 | d20: reboot |" in text
    assert "9.1 s into the command (the migration itself succeeded)" in text
    assert "Triple fault" in text
    assert report._guest_crashes({"pvh": {"guest_crashes": []}}, {}) == []


def test_report_outside_phases_is_the_total_less_every_phase(report: Any) -> None:
    runs = [
        {"total": 10.0, "torpor": {"phases": [["connect", 1.0], ["precopy", 5.0]]}},
        {"total": 12.0, "torpor": {"phases": [["connect", 1.0], ["precopy", 6.0]]}},
        {"total": 11.0, "torpor": {"phases": [["connect", 1.0], ["precopy", 5.5]]}},
        {"total": 9.0},  # xl's runs have no phases
    ]
    assert report._outside_phases(runs) == 4.5
    assert report._outside_phases([{"total": 9.0}]) is None


def test_report_anatomy_keeps_one_row_per_call_chain(report: Any) -> None:
    rows = [
        {"function": "cli.py:1(main)", "calls": 1, "own_ms": 0.1, "cumulative_ms": 1000.0},
        {"function": "cli.py:9(_main)", "calls": 1, "own_ms": 0.1, "cumulative_ms": 999.0},
        {"function": "host.py:1(<module>)", "calls": 1, "own_ms": 1.0, "cumulative_ms": 500.0},
        {"function": "xenstore.py:1(<module>)", "calls": 1, "own_ms": 1.0, "cumulative_ms": 495.0},
        {"function": "libxl.py:9(open)", "calls": 1, "own_ms": 200.0, "cumulative_ms": 300.0},
    ]
    anatomy = {
        "total_s": 14.0,
        "in_phases_s": 9.0,
        "outside_phases_s": 5.0,
        "imports_ms": {
            "whole_ms": 2500.0,
            "slowest": [["torpor.host", 900.0], ["  asyncio", 400.0]],
        },
        "profile_total_s": 20.0,
        "profile": rows,
    }
    text = "\n".join(report._anatomy(anatomy))
    assert "14.0 s in all, 9.0 s in the phases it reports, 5.0 s outside them" in text
    assert "| ↳ asyncio | 400.0 |" in text
    assert "`host.py:1(<module>)`" in text and "`libxl.py:9(open)`" in text
    assert "xenstore.py" not in text  # within 2% of the row above: the same chain
    assert "cli.py:9(_main)" not in text  # the command's own frames
    assert report._anatomy(None) == []

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


def _hostwide(save4: float, restore4: float, save1: float, restore1: float) -> dict[str, Any]:
    def run(save: float, restore: float, c: int) -> dict[str, Any]:
        return {
            "save_all_wall": save,
            "restore_all_wall": restore,
            "bytes": 1000,
            "concurrency": c,
            "save_per_guest": {"a": 1.0, "b": 2.0},
            "restore_per_guest": {"a": 3.0, "b": 4.0},
        }

    return {
        "guests": {"a": {"kind": "pv"}, "b": {"kind": "pvh"}},
        "torpor_default_concurrency": run(save4, restore4, 4),
        "torpor_concurrency_1": run(save1, restore1, 1),
        "xendomains_sequential_xl": {
            "save_wall": 2.0,
            "restore_wall": 1.5,
            "save_per_guest": {"a": 0.5, "b": 1.5},
            "restore_per_guest": {"a": 0.5, "b": 1.0},
        },
    }


def test_report_host_lifecycle_real_is_computed_from_the_labs_json(report: Any) -> None:
    text = "\n".join(report._host_lifecycle_real(_hostwide(5.0, 6.0, 7.0, 8.0)))
    assert (
        "| `torpor host save-all` / `restore-all`, default concurrency (4) | 5.0 | 6.0 | 11.0 |"
        in text
    )
    assert "add up to 3.0 s of save-all's 7.0 s" in text
    assert "to 7.0 s of restore-all's 8.0 s" in text
    assert "xl's own saves and restores: 2.0 s and 1.5 s" in text
    assert "(PV, PVH; 1,000 octets of images)" in text


def test_report_concurrency_choice_says_what_the_lab_showed(report: Any) -> None:
    sweep = {"guests": 100, "save_all_s": {"1": 12.0, "4": 3.0, "8": 2.0}}
    disk = {"mib_per_s": {"1": 100.0, "4": 180.0, "8": 200.0}}
    text = report._concurrency_choice(sweep, disk, _hostwide(5.0, 9.0, 7.0, 8.0))
    assert "from 12.0 s at 1 to 3.0 s at 4" in text
    assert "Four writers reached 90% of the best" in text
    assert "faster than one at a time to save (5.0 s against 7.0 s)" in text
    assert "slower to restore (9.0 s against 8.0 s)" in text
    assert "still gains (2.0 s at 8)," in text
    assert "In the lab" not in report._concurrency_choice(sweep, None, None)


IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |     typing
import time:       300 |        900 |   attr
import time:       200 |       1500 | attrs
import time:       500 |       2500 |   torpor.model
import time:       700 |       4000 | torpor
import time:       100 |        100 | json
"""


@pytest.fixture
def importtime(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCH))
    import importtime as module

    return module


def test_importtime_depths_from_the_indentation(importtime: Any) -> None:
    assert importtime.parse(IMPORTTIME) == [
        (2, 0.1, "typing"),
        (1, 0.9, "attr"),
        (0, 1.5, "attrs"),
        (1, 2.5, "torpor.model"),
        (0, 4.0, "torpor"),
        (0, 0.1, "json"),
    ]


def test_importtime_groups_only_top_level_imports(importtime: Any) -> None:
    assert importtime.group_imports(IMPORTTIME) == {"attrs": 1.5, "other": 0.1, "torpor": 4.0}


def test_importtime_slowest_keeps_two_levels(importtime: Any) -> None:
    got = importtime.slowest_imports(IMPORTTIME, top=3)
    assert got == {
        "whole_ms": 5.6,
        "slowest": [["torpor", 4.0], ["  torpor.model", 2.5], ["attrs", 1.5]],
    }


def test_report_gives_the_downtime_difference_in_ticks(report: Any) -> None:
    def side(downtime: float) -> dict[str, Any]:
        return {
            "downtime_median": downtime,
            "guest_downtime_median": downtime,
            "total_median": 9.0,
            "n": 5,
            "runs": [],
        }

    mig = {
        "machine": {"tick_s": 0.05},
        "pvh": {
            "memory_mib": 256,
            "torpor": side(0.811),
            "xl": side(0.699),
            "downtime_ratio_torpor_vs_xl": 1.16,
            "total_ratio_torpor_vs_xl": 1.43,
        },
    }
    text = "\n".join(report._migration(mig))
    assert "pvh: torpor / xl downtime 1.16 (+112 ms, +2.2 ticks) (target <= 1)" in text

"""The fuzzers' session summary: what each tried, with which budget."""

from __future__ import annotations

from typing import Any

from . import budget


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not budget.STATS:
        return
    terminalreporter.section("torpor fuzz")
    mode = "on demand" if budget.ON_DEMAND else "CI budget, derandomized"
    terminalreporter.write_line(f"mode: {mode}")
    for key in sorted(budget.STATS):
        terminalreporter.write_line(f"{key}: {budget.STATS[key]}")

"""pytest plugin for the lab's dom0 session: one console line per test.

pytest's own output goes to a file on the 9p share; these short lines go to
dom0's console, which the host follows, so it can report each test as it
finishes and name the test that was running if the session hangs.
"""

from __future__ import annotations

from typing import Any

_console: list[Any] = []  # the opened /dev/console, once
_state: dict[str, list[Any]] = {}


def _emit(msg: str) -> None:
    if not _console:
        try:
            _console.append(open("/dev/console", "w", buffering=1))  # noqa: SIM115
        except OSError:
            _console.append(None)
    if _console[0] is not None:
        _console[0].write(f"TORPOR-LAB {msg}\n")


def pytest_collection_finish(session: Any) -> None:
    _emit(f"collected n={len(session.items)}")


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _state[nodeid] = ["passed", 0.0]
    _emit(f"start {nodeid}")


def pytest_runtest_logreport(report: Any) -> None:
    st = _state.setdefault(report.nodeid, ["passed", 0.0])
    st[1] += report.duration
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            st[0] = "xfailed" if report.skipped else "xpassed"
        else:
            st[0] = report.outcome
    elif report.failed:
        st[0] = "error"
    elif report.skipped and report.when == "setup":
        st[0] = "skipped"
    if report.when == "teardown":
        _emit(f"test {st[0]} {st[1]:.2f} {report.nodeid}")

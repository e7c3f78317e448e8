"""Turn the dom0 session's junit XML and log into the host's summary."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    test: str
    outcome: str  # passed | failed | error | skipped
    seconds: float
    message: str


def _nodeid(classname: str, name: str, repo: Path | None) -> str:
    """pytest's node id back from junit's dotted classname, when the file exists."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if repo is not None and (repo / path).is_file():
            return "::".join([path, *parts[cut:], name])
    return f"{classname}::{name}"


def read_junit(path: Path, repo: Path | None = None) -> list[Case]:
    root = ET.parse(path).getroot()
    cases = []
    for tc in root.iter("testcase"):
        test = _nodeid(tc.get("classname", ""), tc.get("name", ""), repo)
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or "").strip().splitlines()[0:1]
                message = message[0] if message else ""
                break
        cases.append(Case(test, outcome, float(tc.get("time") or 0.0), message))
    return cases


def counts(cases: list[Case]) -> dict[str, int]:
    c = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in cases:
        c[case.outcome] = c.get(case.outcome, 0) + 1
    return c


def closing_line(cases: list[Case]) -> str:
    c = counts(cases)
    line = f"test-xen: {c['passed']} passed, {c['failed'] + c['error']} failed"
    if c["skipped"]:
        line += f", {c['skipped']} skipped"
    return line


def table(cases: list[Case]) -> str:
    width = max((len(c.test) for c in cases), default=10)
    rows = []
    for c in cases:
        msg = f"  {c.message[:100]}" if c.outcome != "passed" and c.message else ""
        line = f"  {c.outcome.upper():<8} {c.seconds:7.1f}s  {c.test:<{width}}{msg}"
        rows.append(line.rstrip())
    return "\n".join(rows)


def pytest_summary(log: Path, max_lines: int = 80) -> str:
    """pytest's failure report: from the FAILURES/ERRORS section, else the tail."""
    if not log.is_file():
        return "(no pytest log)"
    lines = log.read_text(errors="replace").splitlines()
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if line.startswith("=") and (" FAILURES " in line or " ERRORS " in line)
        ),
        max(0, len(lines) - max_lines),
    )
    chunk = lines[start:]
    if len(chunk) > max_lines:
        chunk = [*chunk[: max_lines // 2], "   [...]", *chunk[-max_lines // 2 :]]
    return "\n".join(chunk)

"""``python -X importtime`` output: parsed, summed by what the imports belong
to, and the slowest ones."""

from __future__ import annotations

from typing import Any

LIBRARIES = ("asyncio", "attrs", "pluggy", "pyxs", "cffi")


def parse(stderr: str) -> list[tuple[int, float, str]]:
    """``(depth, cumulative ms, module)`` of each import line in ``stderr``;
    depth 0 is a top-level import (each line's name follows ``| `` and two
    spaces a level)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        _self, cumulative, name = line[len("import time:") :].split("|")
        if not cumulative.strip().isdigit():
            continue  # the header
        name = name[1:]
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((depth, int(cumulative) / 1000, name.strip()))
    return rows


def group_imports(stderr: str, libraries: tuple[str, ...] = LIBRARIES) -> dict[str, float]:
    """The cumulative milliseconds of each top-level import in ``stderr``,
    grouped: ``torpor`` (every ``torpor*`` package), each of ``libraries``
    (``attr`` counts as ``attrs``), ``other``."""
    groups: dict[str, float] = {}
    for depth, ms, name in parse(stderr):
        if depth:
            continue
        top = name.split(".")[0]
        top = "attrs" if top == "attr" else top
        group = "torpor" if top.startswith("torpor") else top if top in libraries else "other"
        groups[group] = groups.get(group, 0.0) + ms
    return {k: round(v, 1) for k, v in sorted(groups.items())}


def slowest_imports(stderr: str, top: int = 15) -> dict[str, Any]:
    """The whole (top-level imports summed) and the ``top`` slowest top-level
    and second-level imports by cumulative ms; a second-level name is indented
    by two spaces."""
    rows = parse(stderr)
    slowest = sorted(((ms, f"{'  ' * d}{name}") for d, ms, name in rows if d <= 1), reverse=True)
    return {
        "whole_ms": round(sum(ms for d, ms, _ in rows if d == 0), 1),
        "slowest": [[name, round(ms, 1)] for ms, name in slowest[:top]],
    }

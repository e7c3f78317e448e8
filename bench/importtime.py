"""``python -X importtime`` output, summed by what the imports belong to."""

from __future__ import annotations

LIBRARIES = ("asyncio", "attrs", "pluggy", "pyxs", "cffi")


def group_imports(stderr: str, libraries: tuple[str, ...] = LIBRARIES) -> dict[str, float]:
    """The cumulative milliseconds of each top-level import in ``stderr``,
    grouped: ``torpor`` (every ``torpor*`` package), each of ``libraries``
    (``attr`` counts as ``attrs``), ``other``."""
    groups: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        _self, cumulative, name = line[len("import time:") :].split("|")
        if not cumulative.strip().isdigit() or name.startswith("  "):
            continue  # the header, or not a top-level import
        top = name.strip().split(".")[0]
        top = "attrs" if top == "attr" else top
        group = "torpor" if top.startswith("torpor") else top if top in libraries else "other"
        groups[group] = groups.get(group, 0.0) + int(cumulative) / 1000
    return {k: round(v, 1) for k, v in sorted(groups.items())}

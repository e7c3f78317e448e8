"""The figures of docs/performance.md, drawn from bench/results.json (matplotlib, SVG).

``python bench/plots.py bench/results.json docs/_static/bench`` -- run by
`make bench` after the measurements (bench/report.py embeds what it drew):

* ``cycle.svg``: one suspend + cooperative resume -- torpor against the bare
  protocol, before and after the fixed-cost work (``bench/before.json``: the
  results at commit 65d971d), on the simulated hosts; and on real Xen, step by
  step (torpor's phases, stacked, beside the raw C calls);
* ``hostwide.svg``: host-wide suspend + resume time and peak RSS against N;
* ``checkpoint.svg``: checkpoints per second by path (a session, separate
  calls, the bare protocol on the same simulated guest) with the targets.

Only numbers from the results files are drawn; a figure whose numbers are
missing is not drawn (and not embedded).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt

# Reproducible SVGs: no random ids, no date.
plt.rcParams["svg.hashsalt"] = "torpor"
plt.rcParams["svg.fonttype"] = "none"
METADATA = {"Date": None, "Creator": "bench/plots.py"}


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, metadata=METADATA)
    plt.close(fig)
    return name


def cycle(results: dict[str, Any], before: dict[str, Any], out: Path) -> str | None:
    sims = [k for k in ("overhead", "overhead_daemon") if k in results]
    real = results.get("real_xen")
    if not sims and not real:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    labels, series = [], {"bare protocol": [], "torpor before": [], "torpor after": []}
    for key in sims:
        labels.append({"overhead": "in process", "overhead_daemon": "sim daemon"}[key])
        now, then = results[key], before.get(key, {})
        series["bare protocol"].append(now["baseline_async_ms"]["median"])
        # before: torpor's ratio then, applied to today's baseline (machines differ)
        series["torpor before"].append(
            then.get("ratio", float("nan")) * now["baseline_async_ms"]["median"]
        )
        series["torpor after"].append(now["torpor_ms"]["median"])
    width = 0.25
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + (i - 1) * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("ms per cycle (median)")
    ax.set_title("Simulated host: one suspend + resume")
    ax.legend(fontsize=8)
    ax = axes[1]
    if real:
        rows: list[tuple[str, dict[str, float]]] = []
        then_real = before.get("real_xen")
        for label, data in (("torpor before", then_real), ("torpor after", real)):
            if data:
                phases = dict(data["torpor_phase_median_ms"])
                phases["outside any phase"] = data["ms"]["torpor"]["median"] - sum(phases.values())
                rows.append((label, phases))
        raw = dict(real.get("raw_step_median_ms") or {})
        raw["rest"] = real["ms"]["raw"]["median"] - sum(raw.values())
        rows.append(("raw C calls", raw))
        names = sorted({k for _, r in rows for k in r})
        bottoms = [0.0] * len(rows)
        cmap = plt.get_cmap("tab20")
        for j, name in enumerate(names):
            values = [max(r.get(name, 0.0), 0.0) for _, r in rows]
            ax.bar(range(len(rows)), values, 0.6, bottom=bottoms, label=name, color=cmap(j % 20))
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        ax.set_xticks(range(len(rows)), [label for label, _ in rows])
        ax.set_ylabel("ms per cycle (medians, stacked)")
        ax.set_title("Real Xen (lab, TCG): step by step")
        ax.legend(fontsize=6, ncol=2)
    else:
        ax.set_axis_off()
    return _save(fig, out, "cycle.svg")


def hostwide(results: dict[str, Any], out: Path) -> str | None:
    runs = sorted(
        (v for k, v in results.items() if k.startswith("hostwide_")), key=lambda v: v["guests"]
    )
    if len(runs) < 2:
        return None
    n = [r["guests"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, [r["bulk"]["total_s"] for r in runs], "o-", label="torpor, together (s)")
    seq = [(r["guests"], r["sequential"]["total_s"]) for r in runs if r.get("sequential")]
    if seq:
        ax.plot(*zip(*seq, strict=True), "s--", label="one by one (s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("guests (N)")
    ax.set_ylabel("suspend + resume, seconds")
    ax2 = ax.twinx()
    ax2.plot(n, [r["peak_rss_kb"] / 1024 for r in runs], "^:", color="grey", label="peak RSS")
    ax2.set_ylabel("torpor's peak RSS, MB")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title("Host-wide suspend + resume against N")
    return _save(fig, out, "hostwide.svg")


def checkpoint(results: dict[str, Any], out: Path) -> str | None:
    cps = [
        (k.removeprefix("checkpoint_"), v)
        for k, v in sorted(results.items())
        if k.startswith("checkpoint_") and isinstance(v, dict) and "per_second" in v
    ]
    if not cps:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.25
    for i, (label, key) in enumerate(
        (
            ("session", "per_second"),
            ("separate calls", "single_calls_per_second"),
            ("bare protocol", "bare_protocol_per_second"),
        )
    ):
        ax.bar(
            [x + (i - 1) * width for x in range(len(cps))],
            [c.get(key) or 0 for _, c in cps],
            width,
            label=label,
        )
    for x, (_, c) in enumerate(cps):
        ax.hlines(c["target_per_second"], x - 0.4, x + 0.4, colors="red", linestyles="dashed")
    ax.set_xticks(range(len(cps)), [p for p, _ in cps])
    ax.set_ylabel("checkpoints per second")
    ax.set_title("Checkpoint rate by path (dashed: target)")
    ax.legend(fontsize=8)
    return _save(fig, out, "checkpoint.svg")


def draw(results: dict[str, Any], before: dict[str, Any], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    drawn = [cycle(results, before, out), hostwide(results, out), checkpoint(results, out)]
    return [d for d in drawn if d]


def main(argv: list[str]) -> int:
    src = Path(argv[0] if argv else "bench/results.json")
    out = Path(argv[1] if len(argv) > 1 else "docs/_static/bench")
    results = json.loads(src.read_text())
    before_path = Path(os.path.dirname(src)) / "before.json"
    before = json.loads(before_path.read_text()) if before_path.is_file() else {}
    for name in draw(results, before, out):
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Render bench/results.json as docs/performance.md (``make bench`` runs it last).

Every comparison in the report is two things measured side by side in the
same run; the machine, date and versions are recorded with the numbers.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    qemu = shutil.which("qemu-system-x86_64")
    qemu_version = "not installed"
    if qemu:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
        qemu_version = out.stdout.splitlines()[0] if out.stdout else "unknown"
    from importlib.metadata import version

    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "torpor": version("torpor"),
        "pyxs": version("pyxs"),
        "qemu": qemu_version,
        "load average (1/5/15 min) at report time": load,
    }


def _ok(value: float | None, target: float, *, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**not met**"


def _derived(results: dict[str, Any]) -> list[str]:
    """Findings computed from this run's numbers (never typed in by hand)."""
    out: list[str] = []
    cli = results.get("cli")
    if cli and cli["ratio_floor_vs_python"] > cli["target"]:
        out.append(
            f"CLI target ({cli['target']}x `python -c pass`) is below the floor on this "
            f"machine: a process that only imports asyncio, attrs, pluggy and pyxs takes "
            f"{cli['ratio_floor_vs_python']}x. torpor's commands take "
            f"{cli['ratio_suspend_vs_python']}x (suspend) and {cli['ratio_list_vs_python']}x "
            f"(list): {cli['torpor_list_ms'] - cli['floor_imports_ms']:.0f} ms above the floor "
            "for `list` -- torpor's own modules (attrs classes are built at import: the "
            "model, the errors, the xenstore adapter), the argument parser, loading the "
            "plugins, connecting to xenstored and the hypervisor, the command."
        )
    for key, name in (("checkpoint_xenstore", "xenstore"),):
        c = results.get(key)
        if c and c.get("bare_protocol_per_second"):
            out.append(
                f"Checkpoint rate, {name}: torpor's session reaches {c['per_second']}/s; the "
                f"bare protocol on the same simulated guest {c['bare_protocol_per_second']}/s "
                f"(torpor / bare = {c['per_second'] / c['bare_protocol_per_second']:.2f}). "
                f"The target ({c['target_per_second']:g}/s) is above what this simulated "
                "host allows at all: its resume runs the guest kernel's resume path on the "
                "simulator's own thread before returning (as real Xen's guest runs at once), "
                "and its xenstored is a thread of the same process -- two thread hand-offs "
                "under one GIL per checkpoint."
            )
    prof = results.get("profile")
    if prof:
        w, wo = prof["with_intent"], prof["without_intent"]
        out.append(
            f"Per cycle torpor sends {w['xenstore_per_cycle']:g} xenstore requests "
            f"({wo['xenstore_per_cycle']:g} without intent records: intent records cost "
            f"{w['xenstore_per_cycle'] - wo['xenstore_per_cycle']:g}) and makes "
            f"{w['hypervisor_per_cycle']:g} hypervisor calls; its loop thread's own Python "
            f"is {prof['profile']['loop_thread']['own_ms_per_cycle']} ms per cycle under "
            "cProfile (inflated by the profiler), most of it waiting in epoll and sending."
        )
    return out


def _profile(prof: dict[str, Any] | None) -> list[str]:
    """bench/test_profile.py: requests per cycle and where the loop thread's time goes."""
    if not prof:
        return []
    w, wo = prof["with_intent"], prof["without_intent"]

    def ops(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in d.items())

    out = [
        "### What a cycle costs (the profile)",
        "",
        f"`bench/test_profile.py`, against a `torpor sim` daemon, {prof['cycles']} cycles: "
        "every request torpor sends per suspend + cooperative resume, counted at the two "
        "adapters, and cProfile on torpor's loop thread.",
        "",
        "| | xenstore requests | hypervisor calls |",
        "|---|---|---|",
        f"| intent records on | {w['xenstore_per_cycle']:g} ({ops(w['xenstore_ops'])}) | "
        f"{w['hypervisor_per_cycle']:g} ({ops(w['hypervisor_ops'])}) |",
        f"| intent records off | {wo['xenstore_per_cycle']:g} ({ops(wo['xenstore_ops'])}) | "
        f"{wo['hypervisor_per_cycle']:g} ({ops(wo['hypervisor_ops'])}) |",
        "",
    ]
    loop = prof["profile"]["loop_thread"]
    out += [
        f"Loop thread, own time under cProfile: {loop['own_ms_per_cycle']} ms per cycle; "
        "the largest items:",
        "",
        "| function | calls per cycle | us per cycle |",
        "|---|---|---|",
    ]
    for row in loop["top"][:10]:
        out.append(f"| `{row['func']}` | {row['calls_per_cycle']} | {row['us_per_cycle']} |")
    out.append("")
    return out


_CAPTIONS = {
    "cycle.svg": "One suspend + cooperative resume: torpor against the bare protocol on the "
    "simulated hosts, before (commit 65d971d, bench/before.json) and after the fixed-cost work; "
    "on real Xen, torpor's phases stacked beside the raw C calls",
    "hostwide.svg": "Host-wide suspend + resume time and torpor's peak RSS against N",
    "checkpoint.svg": "Checkpoints per second by path, with the targets (dashed)",
}


def render(results: dict[str, Any], figures: Sequence[str] = ()) -> str:
    out: list[str] = ["# Performance", ""]
    out += [
        "Generated by `make bench` (bench/, pytest) and `bench/report.py` from "
        "`bench/results.json`. The machines are shared and noisy: every comparison below",
        "is two things measured side by side in one run and is reported as a ratio;",
        "absolute times are for orientation only.",
        "",
        "| | |",
        "|---|---|",
    ]
    for k, v in _machine().items():
        out.append(f"| {k} | {v} |")
    out.append("")
    if figures:
        out += ["## Figures", ""]
        for name in figures:
            caption = _CAPTIONS.get(name, name)
            out += [f"![{caption}](_static/bench/{name})", "", f"*{caption}.*", ""]

    if results.get("overhead"):
        out += [
            "## Overhead: torpor vs. the bare protocol",
            "",
            "One simulated PV guest (no freeze time); a cycle is a suspend through the "
            "xenstore handshake and a cooperative resume. The baselines are the minimal "
            "protocol steps written by hand on the same xenstore connection and the same "
            "hypervisor backend (`bench/test_overhead.py`). Milliseconds per cycle, "
            "median (IQR). Measured against a simulated host in torpor's own process "
            "(one GIL for torpor, xenstored, the hypervisor model and the guest) and "
            "against a `torpor sim` daemon in another process (hypervisor calls are "
            "socket round trips, as libxenctrl's are ioctls).",
            "",
        ]
    for key_, title in (
        ("overhead", "in-process simulated host"),
        ("overhead_daemon", "`torpor sim` daemon"),
    ):
        ov = results.get(key_)
        if not ov:
            continue
        out += [
            f"### {title}",
            "",
            "| | median ms | IQR ms | ratio to async baseline |",
            "|---|---|---|---|",
        ]
        base = ov["baseline_async_ms"]["median"]
        for label, key in (
            ("bare protocol, asyncio on torpor's loop", "baseline_async_ms"),
            ("bare protocol, blocking calls", "baseline_sync_ms"),
            ("torpor (default: intent records on)", "torpor_ms"),
            ("torpor, `record_intent=False`", "torpor_no_intent_ms"),
        ):
            if key in ov:
                m = ov[key]
                out.append(f"| {label} | {m['median']} | {m['iqr']} | {m['median'] / base:.2f} |")
        out += [
            "",
            f"Target torpor / baseline <= {ov['target']}: "
            f"{_ok(ov['ratio'], ov['target'], higher_is_better=False)} ({ov['ratio']}"
            + (f", by {ov['ratio'] - ov['target']:.2f})." if ov["ratio"] > ov["target"] else ")."),
        ]
        if "target_no_intent" in ov:
            t, r = ov["target_no_intent"], ov["ratio_no_intent"]
            out[-1] += (
                f" Without intent records, target <= {t}: "
                f"{_ok(r, t, higher_is_better=False)} ({r}"
                + (f", by {r - t:.2f})." if r > t else ").")
            )
        out.append("")
    out += _profile(results.get("profile"))

    cli = results.get("cli")
    if cli:
        out += [
            "## CLI fixed cost",
            "",
            "A fresh process per command (the venv's `torpor` script) against a `torpor sim` "
            "daemon (`bench/test_cli.py`), medians. The *floor* is a process importing only "
            "the libraries an operation needs (`import asyncio, attrs, pluggy, pyxs`). "
            "Target: `torpor --json suspend` and `torpor list` <= 3x `python -c pass`.",
            "",
            "| command | ms | ratio to `python -c pass` |",
            "|---|---|---|",
            f"| `python -c pass` | {cli['python_pass_ms']} | 1.00 |",
            f"| floor: `python -c 'import asyncio, attrs, pluggy, pyxs'` | "
            f"{cli['floor_imports_ms']} | {cli['ratio_floor_vs_python']} |",
            f"| `torpor --help` | {cli['torpor_help_ms']} | {cli['ratio_help_vs_python']} |",
            f"| `torpor --json suspend 1` / `resume 1` | "
            f"{cli['torpor_json_suspend_or_resume_ms']} | {cli['ratio_suspend_vs_python']} "
            f"({_ok(cli['ratio_suspend_vs_python'], cli['target'], higher_is_better=False)}) |",
            f"| `torpor list` | {cli['torpor_list_ms']} | {cli['ratio_list_vs_python']} "
            f"({_ok(cli['ratio_list_vs_python'], cli['target'], higher_is_better=False)}) |",
            "",
            "Where `torpor --json list`'s imports go (`python -X importtime`, top-level "
            "imports, cumulative ms): "
            + ", ".join(f"{k} {v}" for k, v in cli["imports_ms_list"].items())
            + ".",
            "",
        ]

    cps = [
        (k.removeprefix("checkpoint_"), v)
        for k, v in sorted(results.items())
        if k.startswith("checkpoint_")
    ]
    if cps:
        out += [
            "## Checkpoint rate",
            "",
            "One simulated PV guest doing no work, checkpointed in one session "
            "(`Torpor.checkpoints`, as Remus does: claimed and classified once, a suspend "
            "event channel kept bound) and as separate `checkpoint()` calls "
            "(`bench/test_checkpoint.py`). Remus checkpoints up to 40 times a second.",
            "",
            "| path | per second (session) | target | separate calls per second | "
            "bare protocol per second | median ms | p90 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for path, c in cps:
            out.append(
                f"| {path} | {c['per_second']} | >= {c['target_per_second']:g} "
                f"({_ok(c['per_second'], c['target_per_second'], higher_is_better=True)}) | "
                f"{c['single_calls_per_second']} | {c.get('bare_protocol_per_second') or '-'} | "
                f"{c['median_ms']} | {c['p90_ms']} |"
            )
        phases = sorted({p for _, c in cps for p in c["phase_median_ms"]})
        out += [
            "",
            "Per-phase medians, ms:",
            "",
            "| phase | " + " | ".join(p for p, _ in cps) + " |",
            "|---|" + "---|" * len(cps),
        ]
        for ph in phases:
            out.append(
                f"| {ph} | "
                + " | ".join(str(c["phase_median_ms"].get(ph, "-")) for _, c in cps)
                + " |"
            )
        out.append("")

    hw = sorted(
        (v for k, v in results.items() if k.startswith("hostwide_")), key=lambda v: v["guests"]
    )
    if hw:
        out += [
            "## Host-wide suspend",
            "",
            f"N simulated PV guests, each taking {hw[0]['freeze_s'] * 1000:.0f} ms to freeze, "
            "in a `torpor sim` daemon; torpor suspends them all, then resumes them all "
            "(`suspend_many` / `resume_many`, bounded concurrency), against a sequential loop "
            "in the same run (`bench/test_hostwide.py`). Threads and memory are torpor's "
            "own process.",
            "",
            "| N | together: suspend s | resume s | total s | one by one: total s | "
            "speedup | peak threads | peak RSS MB | s per guest |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for h in hw:
            seq = h.get("sequential") or {}
            out.append(
                f"| {h['guests']} | {h['bulk']['suspend_s']} | {h['bulk']['resume_s']} | "
                f"{h['bulk']['total_s']} | {seq.get('total_s', 'not run')} | "
                f"{h.get('speedup') or '-'} | {h['peak_threads']} | "
                f"{h['peak_rss_kb'] / 1024:.1f} | "
                f"{h['bulk']['total_s'] / h['guests']:.4f} |"
            )
        big = next((h for h in hw if h["guests"] == 1000), None)
        if big:
            out += [
                "",
                f"Target N = 1000 in <= 3 s: "
                f"{_ok(big['bulk']['total_s'], 3.0, higher_is_better=False)} "
                f"({big['bulk']['total_s']} s).",
            ]
        if len(hw) >= 2:
            lo, hi = hw[0], hw[-1]
            per = (hi["peak_rss_kb"] - lo["peak_rss_kb"]) / max(hi["guests"] - lo["guests"], 1)
            threads = sorted({h["peak_threads"] for h in hw})
            out += [
                f"Memory per domain in flight: {per:.1f} kB "
                f"((peak RSS at N={hi['guests']} - at N={lo['guests']}) / "
                f"{hi['guests'] - lo['guests']}). Peak threads across N: {threads} "
                "(independent of N).",
            ]
        out.append("")

    real = results.get("real_xen")
    if real:
        ms = real["ms"]
        out += [
            "## Real Xen (the lab, under TCG)",
            "",
            "`make bench-xen` (`bench/xen/test_real_xen.py`, in the lab's dom0: Xen "
            f"{real.get('dom0', {}).get('xen', '4.17')}, nested under QEMU TCG, so only the "
            "ratios mean anything). One lab PV guest "
            f"({real['guest']}); a cycle is a suspend through the xenstore handshake and a "
            "cooperative resume, done three ways in alternating rounds "
            f"({real['rounds']} rounds of {real['cycles_per_round']} cycles, one `xl save -c` "
            "per round): torpor's API on its real backend; the same calls made raw from C "
            "through ctypes (libxenstore write + watch, `xc_domain_getinfolist`, "
            "`xc_domain_resume(fast=1)`, `xs_resume_domain`); and `xl save -c` to "
            "`/dev/null`, the same suspend and resume around a save of the guest's memory.",
            "",
            "| | median ms | IQR ms | n | ratio to raw |",
            "|---|---|---|---|---|",
        ]
        base = ms["raw"]["median"]
        for label, key in (
            ("raw calls (libxenstore, libxenctrl, libxenguest)", "raw"),
            ("torpor (`Torpor(Host.xen())`: suspend + resume)", "torpor"),
            ("`xl save -c DOMID /dev/null`", "xl_save_c"),
        ):
            m = ms[key]
            out.append(
                f"| {label} | {m['median']} | {m['iqr']} | {m['n']} | {m['median'] / base:.2f} |"
            )
        phase_ms = real.get("torpor_phase_median_ms") or {}
        out += [
            "",
            f"torpor / raw = {real['ratio_torpor_vs_raw']} (target <= 1.3: "
            f"{_ok(real['ratio_torpor_vs_raw'], 1.3, higher_is_better=False)}); "
            f"`xl save -c` / raw = {real['ratio_xl_save_c_vs_raw']}; `xl save -c` / torpor = "
            f"{real['ratio_xl_save_c_vs_torpor']}.",
            "",
        ]
        cli_dom0 = real.get("cli")
        if cli_dom0:
            out += [
                "CLI start in the lab's dom0 (torpor installed from its wheel; medians of "
                f"{cli_dom0['n']} runs, ms): `python3 -c pass` {cli_dom0['python_pass_ms']}, "
                f"`torpor --help` {cli_dom0['torpor_help_ms']}, `torpor --json list` "
                f"{cli_dom0['torpor_list_ms']} "
                f"({cli_dom0['torpor_list_ms'] / cli_dom0['python_pass_ms']:.1f}x).",
                "",
            ]
            if cli_dom0.get("imports_ms"):
                out += [
                    "Imports of one `torpor --json list` there (`-X importtime`, cumulative ms "
                    "by top-level package): "
                    + ", ".join(f"{k} {v}" for k, v in cli_dom0["imports_ms"].items())
                    + ".",
                    "",
                ]
        trips = real.get("xenstore_round_trip_ms")
        if trips:
            c, py = trips["libxenstore"]["median"], trips["torpor_adapter"]["median"]
            out += [
                f"One xenstore round trip (a read), medians: libxenstore {c} ms, torpor's "
                f"adapter (pyxs) {py} ms ({py / c:.1f}x).",
                "",
            ]
        if phase_ms:
            raw_steps = real.get("raw_step_median_ms") or {}
            out += [
                "Step by step, medians in ms (torpor's phases; the raw cycle timed at the "
                "same points; `-` where it has no such step):",
                "",
                "| phase | torpor | raw |",
                "|---|---|---|",
            ]
            for k, v in phase_ms.items():
                op, _, phase = k.partition(" ")
                twin = (
                    raw_steps.get(phase)
                    if op == "suspend"
                    or phase
                    in (
                        "resume",
                        "xs-resume",
                    )
                    else None
                )
                out.append(f"| {k} | {v} | {'-' if twin is None else twin} |")
            outside = ms["torpor"]["median"] - sum(phase_ms.values())
            out += [
                f"| (outside any phase: claim, classify, intent records, result) | "
                f"{outside:.1f} | - |",
                "",
                f"Outside any phase: {outside:.1f} ms per cycle (target <= 5 ms: "
                f"{_ok(outside, 5.0, higher_is_better=False)}).",
                "",
            ]
    out += _host_lifecycle(results)
    mig = results.get("real_xen_migration")
    if mig:
        out += _migration(mig)
    notes = list(results.get("notes") or []) + _derived(results)
    if notes:
        out += ["## Findings", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def _host_lifecycle(results: dict[str, Any]) -> list[str]:
    """`torpor host save-all` / `restore-all`: the sim bench, the concurrency
    measurements, and the lab's real-Xen run (key host_lifecycle_real)."""
    out: list[str] = []
    runs = sorted(
        (v for k, v in results.items() if re.fullmatch(r"host_lifecycle_\d+", k)),
        key=lambda v: v["guests"],
    )
    real = results.get("host_lifecycle_real")
    if not runs and not real:
        return out
    out += ["## Host-wide save and restore", ""]
    if runs:
        out += [
            f"N simulated PV guests ({runs[0]['freeze_s'] * 1000:.0f} ms to freeze each) in a "
            "`torpor sim` daemon: `Torpor.save_all` / `restore_all` (what `torpor host "
            f"save-all` / `restore-all` run; concurrency {runs[0]['concurrency']}, manifest "
            "fsynced after each guest, each image's SHA-256 computed and checked) against a "
            "loop of `Torpor.save` then one of `Torpor.restore`, one guest after another, as "
            "xendomains runs `xl save` / `xl restore` (`bench/test_host_lifecycle.py`; "
            f"measured {runs[0].get('measured', 'with the rest of this report')}).",
            "",
            "| N | save-all s | restore-all s | one by one: save s | restore s | "
            "speedup (both ways) | image bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            out.append(
                f"| {r['guests']} | {r['save_all_s']} | {r['restore_all_s']} | "
                f"{r['sequential_save_s']} | {r['sequential_restore_s']} | {r['speedup']} | "
                f"{r['bytes']:,} |"
            )
        out.append("")
    sweep = results.get("host_lifecycle_sweep")
    disk = results.get("host_lifecycle_disk")
    if sweep or disk:
        out += ["### Choosing the default concurrency", ""]
    if sweep:
        cols = sorted(sweep["save_all_s"], key=int)
        out += [
            f"save-all of {sweep['guests']} simulated guests at each concurrency (s):",
            "",
            "| concurrency | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|",
            "| save-all s | " + " | ".join(str(sweep["save_all_s"][c]) for c in cols) + " |",
            "",
        ]
    if disk:
        cols = sorted(disk["mib_per_s"], key=int)
        out += [
            f"This machine's disk: {disk['files']} files of {disk['mib_each']} MiB, each "
            "written and fsynced, by that many writers at a time (MiB/s):",
            "",
            "| writers | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|",
            "| MiB/s | " + " | ".join(str(disk["mib_per_s"][c]) for c in cols) + " |",
            "",
        ]
    if real:
        out += _host_lifecycle_real(real)
    if sweep:
        out += [_concurrency_choice(sweep, disk, real), ""]
    return out


def _host_lifecycle_real(real: dict[str, Any]) -> list[str]:
    """The lab's tests/xen/test_hostwide_real.py (its hostwide.json, as collected)."""
    c4, c1 = real["torpor_default_concurrency"], real["torpor_concurrency_1"]
    xl = real["xendomains_sequential_xl"]
    kinds = ", ".join(sorted(g["kind"].upper() for g in real.get("guests", {}).values()))
    out = [
        "### Real Xen (the lab, under TCG)",
        "",
        "`python3 lab/run -- tests/xen/test_hostwide_real.py` (its `out/hostwide.json`, "
        "collected by `bench/xen/collect.py ... host_lifecycle_real`): three guests "
        f"({kinds}; {c4['bytes']:,} octets of images) in Xen 4.17 under QEMU/TCG on 2 host "
        "cores, saved into a tmpfs and restored, each counting on from its last tick (no "
        "second boot), three ways in a row on the same guests. Wall time of each command "
        "as run (torpor's: the `torpor` script dom0 installed from the wheel, start-up "
        "included).",
        "",
        "| | save, wall s | restore, wall s | total s |",
        "|---|---|---|---|",
    ]
    rows = {
        f"`torpor host save-all` / `restore-all`, default concurrency ({c4['concurrency']})": (
            c4["save_all_wall"],
            c4["restore_all_wall"],
        ),
        "`torpor host save-all` / `restore-all --concurrency 1`": (
            c1["save_all_wall"],
            c1["restore_all_wall"],
        ),
        "xendomains' way: `xl save` of each, one after another; then `xl restore` of each": (
            xl["save_wall"],
            xl["restore_wall"],
        ),
    }
    for label, (save, restore) in rows.items():
        out.append(f"| {label} | {save} | {restore} | {round(save + restore, 1)} |")

    def inside(run: dict[str, Any], key: str) -> float:
        return round(sum(run[key].values()), 1)

    out += [
        "",
        f"One at a time, the guests' own saves (as each save's result times them) add up "
        f"to {inside(c1, 'save_per_guest')} s of save-all's {c1['save_all_wall']} s, and "
        f"their restores (each with its image's SHA-256 check) to "
        f"{inside(c1, 'restore_per_guest')} s of restore-all's {c1['restore_all_wall']} s; "
        f"xl's own saves and restores: {inside(xl, 'save_per_guest')} s and "
        f"{inside(xl, 'restore_per_guest')} s. The rest of torpor's wall time lies outside "
        "every guest's own save and restore; there run the command's Python start-up on an "
        "emulated CPU, the SHA-256 of each image that save-all records in the manifest, "
        "and the manifest's fsyncs (not timed apart here).",
        "",
    ]
    paused = real.get("paused_guest")
    if paused:
        r = paused["refused"]
        out += [
            f"A paused guest among them ({r['name']}): save-all reported it "
            f"`{r['error']['error']}` in phase {r['error']['phase']}, {r['outcome']} "
            f"(state read back: {r['state']}), and saved the others "
            f"({paused['save_all_wall']} s in all).",
            "",
        ]
    return out


def _concurrency_choice(
    sweep: dict[str, Any], disk: dict[str, Any] | None, real: dict[str, Any] | None
) -> str:
    """Why ``--concurrency`` defaults to 4, from the numbers above."""
    at = {int(k): v for k, v in sweep["save_all_s"].items()}
    text = (
        "**Default concurrency: 4.** A guest's save is a freeze (the guest's own time: "
        "overlapping freezes is pure gain -- on the simulated host save-all of "
        f"{sweep['guests']} guests goes from {at[1]} s at 1 to {at[4]} s at 4), then a "
        "stream of its memory through one CPU (`xc_domain_save`) to the disk."
    )
    if disk:
        rates = {int(k): v for k, v in disk["mib_per_s"].items()}
        text += (
            f" Four writers reached {rates[4] / max(rates.values()):.0%} of the best "
            "fsynced write throughput measured above."
        )
    text += " Four saves keep a dom0 of 2-4 vCPUs busy without oversubscribing it."
    if real:
        c4, c1 = real["torpor_default_concurrency"], real["torpor_concurrency_1"]

        def verdict(many: float, one: float) -> str:
            return "faster" if many < one else "slower"

        text += (
            " In the lab, on 2 emulated vCPUs, all three guests at once were "
            f"{verdict(c4['save_all_wall'], c1['save_all_wall'])} than one at a time to save "
            f"({c4['save_all_wall']} s against {c1['save_all_wall']} s) and "
            f"{verdict(c4['restore_all_wall'], c1['restore_all_wall'])} to restore "
            f"({c4['restore_all_wall']} s against {c1['restore_all_wall']} s)."
        )
    more = [c for c in sorted(at) if c > 4]
    if more:
        gains = ", ".join(f"{at[c]} s at {c}" for c in dict.fromkeys([more[0], more[-1]]))
        text += (
            f" Beyond 4 the simulated host still gains ({gains}), but its guests have no "
            "memory worth writing; "
            "a real disk with spinning heads or a shared array is better served by "
            "`--max-rate` or a lower `--concurrency` than by more streams."
        )
    return text


def _migration(mig: dict[str, Any]) -> list[str]:
    """The real-Xen live migration section (bench/xen/test_migrate_downtime.py)."""
    tick = mig.get("machine", {}).get("tick_s", 0.05)
    out = [
        "## Live migration on real Xen (the lab, under TCG)",
        "",
        "`make bench-xen` (`bench/xen/test_migrate_downtime.py`, in the lab's dom0). A lab "
        f"guest ticks every {tick * 1000:.0f} ms on its console; dom0 timestamps each tick line "
        "as it arrives (inotify on xenconsoled's logs). *Downtime*: the largest gap between "
        "two consecutive ticks while the migration ran -- the last tick from the source "
        "domain to the first from the new one -- as dom0 saw them arrive (and, in brackets, "
        "as the guest's own uptime counts it); *total*: the command's wall clock. Each guest "
        "moves to `localhost`: `torpor migrate --to localhost` to xl's `migrate-receive` "
        "(the same receiver as xl's), `xl migrate NAME localhost`, and torpor to `torpor "
        "migrate-receive`, alternated; medians, seconds.",
        "",
        *([f"Runs: {mig['provenance']}.", ""] if mig.get("provenance") else []),
        "| guest | sender -> receiver | downtime | total | n |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "torpor": "torpor -> xl",
        "xl": "xl -> xl",
        "torpor_to_torpor": "torpor -> torpor",
    }
    ratios = []
    for kind in ("pvh", "pvhvm"):
        data = mig.get(kind)
        if not data:
            continue
        for key, label in labels.items():
            m = data.get(key)
            if m:
                out.append(
                    f"| {kind} ({data.get('memory_mib')} MiB) | {label} | "
                    f"{m['downtime_median']} ({m['guest_downtime_median']}) | "
                    f"{m['total_median']} | {m['n']} |"
                )
        gap = ""
        if data.get("torpor") and data.get("xl"):
            diff = data["torpor"]["downtime_median"] - data["xl"]["downtime_median"]
            gap = f" ({diff * 1000:+.0f} ms, {diff / tick:+.1f} ticks)"
        ratios.append(
            f"{kind}: torpor / xl downtime {data['downtime_ratio_torpor_vs_xl']}{gap} "
            f"(target <= 1), total {data['total_ratio_torpor_vs_xl']} (target <= 1.2)"
        )
        outside = _outside_phases(data.get("torpor", {}).get("runs", []))
        if outside is not None:
            ratios.append(
                f"{kind}: torpor -> xl spends a median {outside} s of its total outside "
                "every phase it reports (the process's start, imports, setup and exit)"
            )
    out += ["", "; ".join(ratios) + ".", ""]
    out += _guest_crashes(mig, labels | {"torpor_live": "torpor, live", "xl_live": "xl, live"})
    out += _anatomy(mig.get("anatomy_pvh"))
    dirty = mig.get("dirty_pvh")
    if dirty:
        out += [
            f"A PVH guest ({dirty['memory_mib']} MiB) rewriting {dirty['dirty_mib']} MiB of its "
            "memory in a loop, so that precopy should not converge but stop at its "
            "iteration bound (5 rounds), the guest stopping only for the last dirty pages. "
            "The last column counts how each of torpor's live runs ended its precopy, as "
            "torpor reported it (a run whose loop stalled under TCG may converge).",
            "",
            "| how | downtime | total | n | precopy |",
            "|---|---|---|---|---|",
        ]
        for key, label in (
            ("torpor_live", "torpor, live"),
            ("xl_live", "xl migrate (live)"),
            ("torpor_non_live", "torpor --no-live"),
        ):
            m = dirty.get(key)
            if not m:
                continue
            ended = collections.Counter(
                str((r.get("torpor") or {}).get("precopy") or "-") for r in m["runs"]
            )
            how = ", ".join(f"{k}: {n}" for k, n in sorted(ended.items()))
            out.append(
                f"| {label} | {m['downtime_median']} ({m['guest_downtime_median']}) | "
                f"{m['total_median']} | {m['n']} | {how} |"
            )
        out.append("")
    return out


def _outside_phases(runs: list[dict[str, Any]]) -> float | None:
    """Median seconds of a torpor command's wall clock not in any phase it reported."""
    left = [
        r["total"] - sum(t for _name, t in r["torpor"]["phases"])
        for r in runs
        if (r.get("torpor") or {}).get("phases")
    ]
    return round(statistics.median(left), 2) if left else None


def _anatomy(a: dict[str, Any] | None) -> list[str]:
    """One torpor migration of the PVH guest taken apart: phases, imports, profile."""
    if not a:
        return []
    imports = a.get("imports_ms", {})
    out = [
        "### Where a torpor migration's time goes",
        "",
        f"One `torpor --json migrate DOMID --to localhost` of the PVH guest: {a['total_s']} s "
        f"in all, {a['in_phases_s']} s in the phases it reports, {a['outside_phases_s']} s "
        f"outside them. The same command under `-X importtime` spent "
        f"{imports.get('whole_ms')} ms importing; the slowest imports (ms, cumulative; "
        "indented: imported by the one above):",
        "",
        "| import | ms |",
        "|---|---|",
        *(
            f"| {'↳ ' if n.startswith(' ') else ''}{n.strip()} | {ms} |"
            for n, ms in imports.get("slowest", [])[:10]
        ),
        "",
    ]
    rows = a.get("profile", [])
    whole = max((r["cumulative_ms"] for r in rows), default=0.0)
    inner: list[dict[str, Any]] = []
    for r in rows:  # below the command's frames; one row per call chain
        if r["cumulative_ms"] < 0.9 * whole and (
            not inner or r["cumulative_ms"] < 0.98 * inner[-1]["cumulative_ms"]
        ):
            inner.append(r)
    inner = inner[:12]
    if inner:
        out += [
            f"Under cProfile ({a.get('profile_total_s')} s wall clock with the profiler), "
            "the functions with the most cumulative time below the command's own frames:",
            "",
            "| function | calls | own ms | cumulative ms |",
            "|---|---|---|---|",
            *(
                f"| `{r['function']}` | {r['calls']} | {r['own_ms']} | {r['cumulative_ms']} |"
                for r in inner
            ),
            "",
        ]
    return out


def _guest_crashes(mig: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Guests that crashed on their own mid-series (the hypervisor's word: shut
    down for reboot or crash, its log kept), each replaced and its run repeated."""
    lines = []
    for kind in ("pvh", "pvhvm", "dirty_pvh"):
        for c in (mig.get(kind) or {}).get("guest_crashes", []):
            into = c.get("last_tick_into_command_s")
            when = (
                "before the command began"
                if into is not None and into < 0
                else f"{into} s into the command"
                if into is not None
                else "-"
            )
            if c.get("after_success"):
                when += " (the migration itself succeeded)"
            fault = next((x for x in c.get("hypervisor_log", []) if "fault" in x.lower()), "")
            lines.append(
                f"| {kind} | {labels.get(c['sender'], c['sender'])} | {c.get('run')} | "
                f"d{c['domid']}: {c['reason']} | {when} | {fault.strip() or '-'} |"
            )
    if not lines:
        return []
    return [
        "Guests that crashed during a series (the sender then refused to suspend a "
        "domain already shut down, or the guest fell silent in its new domain); each was "
        "replaced and the run repeated. Judged "
        "from the hypervisor (shutdown reason, `xl dmesg`), not from the sender's report; "
        "the sender named is the one running when the guest's last tick came:",
        "",
        "| series | sender | round | domain | guest's last tick | hypervisor log |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def main() -> int:
    src = sys.argv[1] if len(sys.argv) > 1 else "bench/results.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else "docs/performance.md"
    with open(src) as f:
        results = json.load(f)
    notes_path = os.path.join(os.path.dirname(src), "findings.json")
    if os.path.exists(notes_path):
        with open(notes_path) as f:
            results["notes"] = json.load(f)
    figures: list[str] = []
    try:
        import plots  # bench/plots.py: matplotlib (make bench installs it)
    except ImportError as e:
        print(f"no figures: {e}")
    else:
        before_path = os.path.join(os.path.dirname(src), "before.json")
        before = {}
        if os.path.exists(before_path):
            with open(before_path) as f:
                before = json.load(f)
        fig_dir = os.path.join(os.path.dirname(dst), "_static", "bench")
        figures = plots.draw(results, before, Path(fig_dir))
    with open(dst, "w") as f:
        f.write(render(results, figures))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""torpor vs. the raw calls vs. `xl save -c`, on real Xen in the lab (issue 8 item 5).

One PV guest of the lab (tests/xen); a *cycle* is a suspend through the
xenstore handshake and a cooperative resume, done three ways, alternated
round by round so the host's load hits them alike:

* ``torpor``: ``Torpor(Host.xen()).suspend(d)`` then ``.resume(d)`` -- the
  public API on the real backend (cffi libxenctrl, pyxs), one Torpor kept for
  the whole run as a toolstack would;
* ``raw``: the minimal calls from C, through ctypes: libxenstore's
  ``xs_write`` of ``control/shutdown`` and ``xs_read_watch`` until the guest
  acks, then until ``@releaseDomain`` shows it shut down for suspend
  (``xc_domain_getinfolist``), ``xc_domain_resume(fast=1)`` (libxenguest),
  ``xs_resume_domain`` (XS_RESUME);  watches set up once, outside the cycle;
* ``xl save -c``: xl's checkpoint to ``/dev/null`` -- the same suspend and
  fast resume around a full save of the guest's memory (libxl's stream), so
  not the same work: it says what a real toolstack's checkpoint costs.

TCG makes absolute times meaningless; the report gives ratios (medians).
Nothing here asserts a time.  The numbers go to ``<results>/bench-xen.json``;
`make bench-xen` copies them into bench/results.json (key ``real_xen``) and
renders docs/performance.md.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import select
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xenlab
from importtime import group_imports  # bench/, on sys.path by bench/xen/conftest.py

from torpor import Host, Torpor

ROUNDS = int(os.environ.get("TORPOR_BENCH_XEN_ROUNDS", "8"))
CYCLES_PER_ROUND = int(os.environ.get("TORPOR_BENCH_XEN_CYCLES", "4"))
TIMEOUT = 60.0


class RawXenstore:
    """libxenstore.so.4 through ctypes: the C client xl itself uses."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libxenstore.so.4", use_errno=True)
        self.libc = ctypes.CDLL(None)
        self.libc.free.argtypes = [ctypes.c_void_p]
        lib.xs_open.restype = ctypes.c_void_p
        lib.xs_open.argtypes = [ctypes.c_ulong]
        lib.xs_close.argtypes = [ctypes.c_void_p]
        lib.xs_write.restype = ctypes.c_bool
        lib.xs_write.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_uint,
        ]
        lib.xs_read.restype = ctypes.c_void_p
        lib.xs_read.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_uint),
        ]
        lib.xs_watch.restype = ctypes.c_bool
        lib.xs_watch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.xs_unwatch.restype = ctypes.c_bool
        lib.xs_unwatch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.xs_fileno.restype = ctypes.c_int
        lib.xs_fileno.argtypes = [ctypes.c_void_p]
        lib.xs_read_watch.restype = ctypes.c_void_p
        lib.xs_read_watch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
        lib.xs_resume_domain.restype = ctypes.c_bool
        lib.xs_resume_domain.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self.lib = lib
        self.h = lib.xs_open(0)
        if not self.h:
            raise OSError(ctypes.get_errno(), "xs_open")
        self.fd = lib.xs_fileno(self.h)

    def close(self) -> None:
        self.lib.xs_close(self.h)

    def write(self, path: str, value: str) -> None:
        data = value.encode()
        if not self.lib.xs_write(self.h, 0, path.encode(), data, len(data)):
            raise OSError(ctypes.get_errno(), f"xs_write {path}")

    def read(self, path: str) -> str | None:
        n = ctypes.c_uint()
        p = self.lib.xs_read(self.h, 0, path.encode(), ctypes.byref(n))
        if not p:
            return None
        try:
            return ctypes.string_at(p, n.value).decode()
        finally:
            self.libc.free(p)

    def watch(self, path: str, token: str) -> None:
        if not self.lib.xs_watch(self.h, path.encode(), token.encode()):
            raise OSError(ctypes.get_errno(), f"xs_watch {path}")

    def unwatch(self, path: str, token: str) -> None:
        self.lib.xs_unwatch(self.h, path.encode(), token.encode())

    def wait_event(self, deadline: float) -> None:
        """Block until a watch event (select on xs_fileno, then xs_read_watch)."""
        left = deadline - time.monotonic()
        r, _, _ = select.select([self.fd], [], [], max(left, 0.0))
        if not r:
            raise TimeoutError("no xenstore watch event before the deadline")
        n = ctypes.c_uint()
        p = self.lib.xs_read_watch(self.h, ctypes.byref(n))
        if p:
            self.libc.free(p)

    def resume_domain(self, domid: int) -> None:
        if not self.lib.xs_resume_domain(self.h, domid):
            raise OSError(ctypes.get_errno(), "xs_resume_domain")


def raw_cycle(
    xs: RawXenstore, xc: xenlab.XenCtrl, domid: int, steps: dict[str, list[float]]
) -> None:
    """The bare protocol; each step's time is added to ``steps`` (torpor's phase names)."""
    ctl = f"/local/domain/{domid}/control/shutdown"
    deadline = time.monotonic() + TIMEOUT
    t = [time.perf_counter()]

    def step(name: str) -> None:
        now = time.perf_counter()
        steps.setdefault(name, []).append(now - t[0])
        t[0] = now

    xs.write(ctl, "suspend")
    step("request")
    while xs.read(ctl) == "suspend":
        xs.wait_event(deadline)
    step("ack")
    while True:
        info = xc.info(domid)
        assert info is not None
        if info.shutdown:
            assert info.shutdown_reason == xenlab.SHUTDOWN_SUSPEND, info
            break
        xs.wait_event(deadline)
    step("shutdown")
    xc.resume(domid, fast=True)
    step("resume")
    xs.resume_domain(domid)
    step("xs-resume")


def xl_save_checkpoint(domid: int) -> None:
    subprocess.run(
        ["xl", "save", "-c", str(domid), "/dev/null"],
        check=True,
        capture_output=True,
        timeout=300,
    )


def _stats(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0], ms[0], ms[0]]
    return {
        "median": round(statistics.median(ms), 1),
        "iqr": round(q[2] - q[0], 1),
        "min": round(ms[0], 1),
        "n": len(ms),
    }


@pytest.mark.timeout(1800)
def test_suspend_resume_torpor_vs_raw_vs_xl_save(
    make_guest: Callable[..., xenlab.Guest], xc: xenlab.XenCtrl, lab_results: Path
) -> None:
    g = make_guest("pv")
    d = g.domid
    first = g.wait_tick()
    xs = RawXenstore()
    ctl = f"/local/domain/{d}/control/shutdown"
    xs.watch(ctl, "ctl")
    xs.watch("@releaseDomain", "rel")
    samples: dict[str, list[float]] = {"torpor": [], "raw": [], "xl_save_c": []}
    phases: dict[str, list[float]] = {}
    raw_steps: dict[str, list[float]] = {}
    # Where a difference comes from: one xenstore round trip (a read of the
    # domain's name) by libxenstore and by torpor's adapter (pyxs underneath).
    trips: dict[str, list[float]] = {"libxenstore": [], "torpor_adapter": []}
    name_path = f"/local/domain/{d}/name"
    try:
        with Torpor(Host.xen(), own_host=True) as t:

            def torpor_cycle() -> None:
                for r in (t.suspend(d), t.resume(d)):
                    for p in r.timings:
                        phases.setdefault(f"{r.operation} {p.phase}", []).append(p.seconds)

            ways: list[tuple[str, Callable[[], None], int]] = [
                ("torpor", torpor_cycle, CYCLES_PER_ROUND),
                ("raw", lambda: raw_cycle(xs, xc, d, raw_steps), CYCLES_PER_ROUND),
                ("xl_save_c", lambda: xl_save_checkpoint(d), 1),
            ]
            # A warm-up cycle each (imports, first QMP/xenstore connections).
            for _, run, _ in ways:
                run()
            for rnd in range(ROUNDS):
                order = ways[rnd % 3 :] + ways[: rnd % 3]
                for name, run, n in order:
                    for _ in range(n):
                        t0 = time.perf_counter()
                        run()
                        samples[name].append(time.perf_counter() - t0)
            adapter = t.host.xenstore
            for _ in range(ROUNDS * 5):
                for key, read in (
                    ("libxenstore", lambda: xs.read(name_path)),
                    ("torpor_adapter", lambda: adapter.read(name_path)),
                ):
                    t0 = time.perf_counter()
                    assert read() == g.name
                    trips[key].append(time.perf_counter() - t0)
    finally:
        xs.close()
    # Not a timing check: the guest must have survived every cycle as itself.
    last = g.wait_tick(after=first.n, timeout=120)
    assert g.console().count("TORPOR-GUEST boot") == 1
    assert last.uptime > first.uptime

    stats = {k: _stats(v) for k, v in samples.items()}
    raw = stats["raw"]["median"]
    result: dict[str, Any] = {
        "guest": "pv (lab guest: Debian 6.1 kernel, busybox initramfs, 256 MiB)",
        "rounds": ROUNDS,
        "cycles_per_round": CYCLES_PER_ROUND,
        "ms": stats,
        "ratio_torpor_vs_raw": round(stats["torpor"]["median"] / raw, 2),
        "ratio_xl_save_c_vs_raw": round(stats["xl_save_c"]["median"] / raw, 2),
        "ratio_xl_save_c_vs_torpor": round(
            stats["xl_save_c"]["median"] / stats["torpor"]["median"], 2
        ),
        "samples_ms": {k: [round(x * 1000, 1) for x in v] for k, v in samples.items()},
        "xenstore_round_trip_ms": {k: _stats(v) for k, v in trips.items()},
        "torpor_phase_median_ms": {
            k: round(statistics.median(v) * 1000, 2) for k, v in sorted(phases.items())
        },
        "raw_step_median_ms": {
            k: round(statistics.median(v) * 1000, 2) for k, v in raw_steps.items()
        },
        "dom0": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "xen": xenlab.sh("xl", "info").split("xen_version", 1)[1].split("\n")[0].strip(" :"),
        },
    }
    result["cli"] = cli_start()
    print(json.dumps(result, indent=1))
    (lab_results / "bench-xen.json").write_text(json.dumps(result, indent=1) + "\n")


def cli_start(runs: int = 7) -> dict[str, Any]:
    """Whole processes in dom0, alternated: ``python3 -c pass``, ``torpor --help``,
    ``torpor --json list`` (the ``torpor`` script the wheel installed)."""
    import shutil
    import sys

    script = shutil.which("torpor")
    torpor = [script] if script else [sys.executable, "-m", "torpor.cli"]
    ways = {
        "python_pass_ms": [sys.executable, "-c", "pass"],
        "torpor_help_ms": [*torpor, "--help"],
        "torpor_list_ms": [*torpor, "--json", "list"],
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(runs):
        for key, argv in ways.items():
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            times[key].append(time.perf_counter() - t0)
    out: dict[str, Any] = {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}
    out["n"] = runs
    listing = ways["torpor_list_ms"]
    argv = [sys.executable, "-X", "importtime", *listing]
    out["imports_ms"] = group_imports(
        subprocess.run(argv, capture_output=True, text=True, check=True).stderr
    )
    return out

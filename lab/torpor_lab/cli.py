"""`lab/run`: build (cached), boot, run the dom0 pytest session, report."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from . import hostdeps, image, qemu, report, vendor
from .util import LabError, Phases, fmt_s, log

LAB_DIR = Path(__file__).resolve().parent.parent
REPO = LAB_DIR.parent

DEFAULT_PYTEST_ARGS = ["-v", "-m", "xen"]
DEFAULT_TESTS = "tests/xen"


def cache_dir() -> Path:
    env = os.environ.get("TORPOR_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "torpor-lab"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lab/run",
        description="torpor's real-Xen lab: Xen 4.17 + Debian 12 dom0 under QEMU (TCG).",
        epilog="Arguments after `--` go to pytest inside dom0 "
        "(default: -v -m xen tests/xen). Cache: $TORPOR_LAB_CACHE or ~/.cache/torpor-lab.",
    )
    p.add_argument(
        "command",
        nargs="?",
        default="test",
        choices=["test", "build", "shell", "info", "clean"],
        help="test (default): build if needed, boot, run tests/xen in dom0; "
        "build: only build/refresh the cached image and dependencies; "
        "shell: boot dom0 with its console on this terminal; "
        "info: show the cache; clean: delete the cache",
    )
    p.add_argument("--results", type=Path, help="run directory (default: <cache>/run)")
    p.add_argument("--boot-timeout", type=float, default=240.0, help="seconds to dom0 ready")
    p.add_argument("--test-timeout", type=float, default=3600.0, help="seconds for pytest")
    p.add_argument("--cpu", default=qemu.CPU, help=f"QEMU -cpu model (default: {qemu.CPU})")
    p.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    # Unwind like Ctrl-C, so the QEMU we started is stopped on the way out.
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    else:
        extra = []
    args = parse(argv)
    args.pytest_args = [*args.pytest_args, *extra]
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if args.command == "info":
            return info(cache)
        with _lock(cache):
            if args.command == "clean":
                for p in cache.iterdir():
                    if p.name != ".lock":
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                log(f"emptied {cache}")
                return 0
            return run(args, cache)
    except LabError as e:
        print(f"\n[lab] ERROR: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\n[lab] interrupted", file=sys.stderr)
        return 130


class _lock:
    """One lab run per cache at a time (a build or a QEMU both own it)."""

    def __init__(self, cache: Path) -> None:
        self.path = cache / ".lock"

    def __enter__(self) -> None:
        self.f = self.path.open("a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            holder = self.f.read().strip() or "?"
            raise LabError(
                f"another lab run (pid {holder}) is using {self.path.parent}; "
                "wait for it or set TORPOR_LAB_CACHE to another directory"
            ) from None
        self.f.truncate(0)
        self.f.write(str(os.getpid()))
        self.f.flush()

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def info(cache: Path) -> int:
    key = image.recipe_hash(LAB_DIR)
    img = image.cached(cache, LAB_DIR)
    print(f"cache:   {cache}")
    print(f"recipe:  {key} ({'built' if img else 'not built'})")
    if img:
        print(json.dumps(img.manifest, indent=2))
    for v in sorted(cache.glob("vendor-*")):
        print(f"vendor:  {v.name}")
    return 0


def _prepare_image(phases: Phases, cache: Path) -> tuple[image.Image, Path]:
    with phases.phase("build", "dom0 image (Xen 4.17 + Debian 12)") as note:
        img = image.cached(cache, LAB_DIR)
        if img is not None:
            note["result"] = f"cached {img.dir.name}"
        else:
            img = image.build(cache, LAB_DIR, cache / "build.log")
            note["result"] = f"built {img.dir.name}"
    with phases.phase("vendor", "torpor's Python dependencies for dom0") as note:
        vdir, was_cached = vendor.vendor(cache, REPO, cache / "vendor.log")
        note["result"] = f"{'cached' if was_cached else 'installed'} {vdir.name}"
    return img, vdir


def _pytest_args(user: list[str]) -> list[str]:
    def is_path(a: str) -> bool:
        return not a.startswith("-") and (REPO / a.split("::", maxsplit=1)[0]).exists()

    paths = [a for a in user if is_path(a)]
    return [*DEFAULT_PYTEST_ARGS, *user, *([] if paths else [DEFAULT_TESTS])]


def _prepare_run(rundir: Path, pytest_args: list[str], timeout: float) -> list[qemu.Share]:
    if rundir.exists():
        shutil.rmtree(rundir)
    (rundir / "out").mkdir(parents=True)
    wheels = vendor.install_wheels(REPO, rundir / "in", rundir / "wheels.log")
    log(f"dom0 installs torpor from its wheels: {' '.join(wheels)}")
    job = {
        "pythonpath": vendor.dom0_pythonpath(),
        "torpor_tar": f"{vendor.DOM0_RUN}/in/torpor.tar",
        "torpor_dir": vendor.DOM0_TORPOR,
        "pytest_args": pytest_args,
        "timeout": timeout,
        "cwd": vendor.DOM0_REPO,
        "site_tar": f"{vendor.DOM0_VENDOR}/site.tar",
        "site_dir": vendor.DOM0_SITE,
    }
    (rundir / "in" / "job.json").write_text(json.dumps(job, indent=2) + "\n")
    return [
        qemu.Share("torpor-repo", REPO, readonly=True),
        qemu.Share("torpor-run", rundir, readonly=False),
    ]


def run(args: argparse.Namespace, cache: Path) -> int:
    phases = Phases()
    with phases.phase("host", "host packages"):
        hostdeps.ensure(hostdeps.BOOT, "booting the lab", cache / "host.log")
    img, vdir = _prepare_image(phases, cache)
    if args.command == "build":
        log(phases.table())
        return 0

    rundir = (args.results or cache / "run").resolve()
    pytest_args = _pytest_args(args.pytest_args)
    shares = _prepare_run(rundir, pytest_args, args.test_timeout)
    shares.append(qemu.Share("torpor-vendor", vdir, readonly=True))
    if args.command == "shell":
        log("booting dom0 with its console here (Ctrl-A x quits QEMU)")
        return qemu.interactive(img, shares, cpu=args.cpu)

    log(f"pytest in dom0: {' '.join(pytest_args)}")
    log(f"console log: {rundir / 'console.log'}")
    boot = _boot(args, img, shares, rundir, phases)
    return _report(boot, rundir, phases)


def _boot(
    args: argparse.Namespace,
    img: image.Image,
    shares: list[qemu.Share],
    rundir: Path,
    phases: Phases,
) -> qemu.Boot:
    running: dict[str, str] = {}

    def on_line(event: str) -> None:
        kind, _, rest = event.partition(" ")
        if kind == "ready":
            log(f"boot: dom0 ready ({rest})")
        elif kind == "collected":
            log(f"tests: {rest.removeprefix('n=')} collected")
        elif kind == "start":
            running["test"] = rest
        elif kind == "test":
            outcome, secs, nodeid = ([*rest.split(" ", 2), "", ""])[:3]
            log(f"  {outcome.upper():<8} {float(secs or 0):6.1f}s  {nodeid}")
            running.pop("test", None)
        elif kind in ("fail", "timeout"):
            log(f"dom0: {event}")

    log("boot: starting QEMU (Xen 4.17, dom0 1536M/2 vCPUs, TCG)")
    boot = qemu.run(
        img,
        shares,
        rundir / "console.log",
        boot_timeout=args.boot_timeout,
        run_timeout=args.test_timeout + 120,
        on_line=on_line,
        cpu=args.cpu,
    )
    if boot.ready_after is not None:
        phases.record("boot", boot.ready_after, "QEMU start -> dom0 ready")
        end = boot.done_after if boot.done_after is not None else boot.exit_after or 0.0
        phases.record("tests", end - boot.ready_after, "dom0 ready -> pytest done")
        if boot.done_after is not None and boot.exit_after is not None:
            phases.record("poweroff", boot.exit_after - boot.done_after, "-> QEMU exit")
    else:
        phases.record("boot", boot.exit_after or 0.0, "FAILED")
    if boot.failure and "test" in running:
        boot.failure += f" (test running: {running['test']})"
    for note in boot.notes:
        log(f"note: {note}")
    return boot


def _report(boot: qemu.Boot, rundir: Path, phases: Phases) -> int:
    out = rundir / "out"
    junit = out / "junit.xml"
    cases = report.read_junit(junit, REPO) if junit.is_file() else []
    rc_file = out / "exit-code"
    pytest_rc = int(rc_file.read_text().strip()) if rc_file.is_file() else boot.job_rc

    if cases:
        print("\nresults (in dom0):")
        print(report.table(cases))
    ok = boot.failure is None and pytest_rc == 0 and bool(cases)
    if not ok:
        print()
        if boot.failure:
            print(f"[lab] FAILED: {boot.failure}")
        if boot.failure or not junit.is_file():
            print("[lab] last console lines:")
            print("\n".join(f"    {line}" for line in boot.last_lines[-30:]))
        if pytest_rc not in (None, 0):
            print(f"[lab] pytest in dom0 exited with status {pytest_rc}")
            print(report.pytest_summary(out / "pytest.log"))
        if pytest_rc == 0 and not cases:
            print("[lab] pytest ran no test in dom0")
    print()
    print(phases.table())
    timings = {**phases.as_dict(), "pytest_rc": pytest_rc, "failure": boot.failure}
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\nartefacts: {rundir}  (console.log, out/pytest.log, out/junit.xml, out/xen-logs/)")
    if cases:
        print(report.closing_line(cases))
    log(f"{'PASSED' if ok else 'FAILED'} in {fmt_s(phases.total())}")
    if ok:
        return 0
    return 1 if cases else 2  # tests failed / the lab could not run them

"""torpor's Python dependencies for dom0, and torpor's own metadata there.

dom0 runs Debian 12's python3 (3.11).  torpor's runtime and test requirements
are read from pyproject.toml and installed on the host with
`pip install --target` for CPython 3.11 / manylinux x86_64, binary wheels only
(cffi and hypothesis ship cp311 manylinux wheels; the rest are pure Python).
The result is cached per requirement set as one tar, shared read-only into
dom0 and unpacked there into tmpfs before pytest starts.

torpor itself is installed from its wheels, built from the working tree on
every run (`make dist`'s `python -m build`): torpor, torpor-sim and the
example third-party plugin (examples/torpor-pvh) are `pip install --target`ed
into the run directory, packed as one tar, and unpacked by dom0 into tmpfs;
nothing of the repository's sources is on dom0's path, so a file a wheel
leaves out fails in the lab as it would on a real host.  Entry points (the
`torpor` plugin group, pytest11) and the `torpor` script come from the
wheels' own metadata.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

from . import hostdeps
from .util import log, run

#: dom0's interpreter and platform
PYTHON_VERSION = "3.11"
ABI = "cp311"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
#: developer tools from the test extra that never run in dom0
EXCLUDE = frozenset({"ruff", "mypy"})

#: where the shares appear in dom0 (see dom0/init), and where dom0/runtests.py
#: unpacks the vendored site.tar
DOM0_REPO = "/mnt/repo"
DOM0_VENDOR = "/mnt/vendor"
DOM0_RUN = "/mnt/run"
DOM0_SITE = "/run/torpor-lab/site"


def _name(req: str) -> str:
    m = re.match(r"[A-Za-z0-9._-]+", req)
    return m.group(0).lower() if m else req


def requirements(repo: Path) -> list[str]:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    reqs += project.get("optional-dependencies", {}).get("test", [])
    return [r for r in reqs if _name(r) not in EXCLUDE]


def vendor(cache: Path, repo: Path, logfile: Path) -> tuple[Path, bool]:
    """The cached site directory for the current requirements; (dir, was_cached)."""
    reqs = requirements(repo)
    h = hashlib.sha256()
    h.update(json.dumps([reqs, PYTHON_VERSION, ABI, PLATFORMS]).encode())
    h.update(Path(__file__).read_bytes())
    key = h.hexdigest()[:16]
    final = cache / f"vendor-{key}"
    if (final / "manifest.json").is_file():
        return final, True

    tmp = cache / f"vendor-{key}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    site = tmp / "site"
    pip = hostdeps.pip_command(logfile)
    cmd = [
        *pip,
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--target",
        str(site),
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--abi",
        ABI,
    ]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    log(f"pip install --target (cp311 manylinux): {' '.join(reqs)}")
    run([*cmd, *reqs], timeout=900, logfile=logfile, what="pip install (dom0 dependencies)")
    # One tar that dom0 unpacks into its tmpfs: imports from 9p under TCG
    # cost a round trip per stat, and pytest + hypothesis make thousands.
    with tarfile.open(tmp / "site.tar", "w") as tar:
        tar.add(site, arcname="site")
    shutil.rmtree(site)
    dists = sorted(p.name for p in _dist_infos(tmp / "site.tar"))
    (tmp / "manifest.json").write_text(
        json.dumps({"requirements": reqs, "installed": dists}, indent=2) + "\n"
    )
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in cache.glob("vendor-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final, False


def _dist_infos(tar_path: Path) -> list[Path]:
    with tarfile.open(tar_path) as tar:
        names = [Path(n) for n in tar.getnames()]
    return [n for n in names if len(n.parts) == 2 and n.name.endswith(".dist-info")]


#: What dom0 installs from wheels built from the working tree on every run:
#: torpor, the simulated host (torpor-sim: the sim-vs-real tests use it) and
#: the example third-party plugin, so torpor finds the PVH plugin in dom0 as it
#: would an installed third party's.
PROJECTS = (".", "sim", "examples/torpor-pvh")

#: where dom0/runtests.py unpacks torpor's installed wheels (tmpfs, like DOM0_SITE)
DOM0_TORPOR = "/run/torpor-lab/torpor"


def _builder(repo: Path, logfile: Path) -> list[str]:
    """How to build a wheel: ``make dist``'s ``python -m build`` with the
    project venv's setuptools when there is one (nothing downloaded), else the
    host's ``pip wheel`` (an isolated build that fetches setuptools)."""
    venv_py = repo / ".venv" / "bin" / "python"
    if venv_py.exists():
        probe = subprocess.run(
            [str(venv_py), "-m", "build", "--version"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if probe.returncode == 0:
            return [str(venv_py), "-m", "build", "--no-isolation", "--outdir"]
    return [*hostdeps.pip_command(logfile), "wheel", "--no-deps", "--quiet", "--wheel-dir"]


def install_wheels(repo: Path, dest: Path, logfile: Path) -> list[str]:
    """Build the wheels of :data:`PROJECTS` from the working tree into
    ``dest/wheels`` and install them (``pip install --target``, no
    dependencies: those are vendored) into ``dest/site`` -- packages,
    metadata with the entry points, and the ``torpor`` script in
    ``dest/site/bin`` -- then pack that as ``dest/torpor.tar`` for dom0 to
    unpack into its tmpfs.  Returns the wheels' names."""
    wheels = dest / "wheels"
    wheels.mkdir(parents=True)
    build = _builder(repo, logfile)
    for project in PROJECTS:
        run([*build, str(wheels), str(repo / project)], timeout=600, logfile=logfile,
            what=f"building the wheel of {project}")  # fmt: skip
    built = sorted(wheels.glob("*.whl"))
    site = dest / "site"
    pip = hostdeps.pip_command(logfile)
    run(
        [*pip, "install", "--quiet", "--disable-pip-version-check", "--no-warn-script-location",
         "--no-deps", "--no-index", "--no-compile", "--target", str(site), *map(str, built)],
        timeout=600,
        logfile=logfile,
        what="pip install --target (torpor's wheels)",
    )  # fmt: skip
    # dom0's interpreter runs the scripts, whatever python pip ran under here.
    for script in (site / "bin").glob("*"):
        text = script.read_text()
        if text.startswith("#!"):
            script.write_text("#!/usr/bin/python3\n" + text.split("\n", 1)[1])
    with tarfile.open(dest / "torpor.tar", "w") as tar:
        tar.add(site, arcname="torpor")
    shutil.rmtree(site)
    return [w.name for w in built]


def dom0_pythonpath() -> list[str]:
    """PYTHONPATH inside dom0: torpor as installed from its wheels, the vendored
    deps, and the lab's pytest plugin.  Nothing of the repository's sources."""
    return [DOM0_TORPOR, DOM0_SITE, f"{DOM0_REPO}/lab/dom0"]

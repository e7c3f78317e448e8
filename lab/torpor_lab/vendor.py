"""torpor's Python dependencies for dom0, and torpor's own metadata there.

dom0 runs Debian 12's python3 (3.11).  torpor's runtime and test requirements
are read from pyproject.toml and installed on the host with
`pip install --target` for CPython 3.11 / manylinux x86_64, binary wheels only
(cffi and hypothesis ship cp311 manylinux wheels; the rest are pure Python).
The result is cached per requirement set as one tar, shared read-only into
dom0 and unpacked there into tmpfs before pytest starts.

torpor itself is not installed: dom0 imports it straight from the repo share
(core/ and plugins/*/ on PYTHONPATH), so the tests always see the working
tree.  Its entry points (the `torpor` plugin group, pytest11, ...) are made
visible to importlib.metadata by a generated `torpor-<version>.dist-info`
holding METADATA and entry_points.txt, written into the run directory on every
run, so an edit of pyproject.toml is picked up without a rebuild.  The
example third-party plugin (examples/torpor-pvh, its own pyproject.toml and
`src/` layout) gets the same treatment: its sources on PYTHONPATH and a
generated `torpor_pvh-<version>.dist-info`, so torpor finds its `torpor`
entry point in dom0 exactly as it would an installed third party's.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
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


#: third-party plugin projects shipped as examples: (project dir, import root)
EXAMPLES = (("examples/torpor-pvh", "examples/torpor-pvh/src"),)


def source_roots(repo: Path) -> list[Path]:
    """core/, every plugins/<name>/ directory and sim/ (the simulated host,
    its own distribution): torpor's import roots."""
    roots = [repo / "core"]
    if (repo / "sim").is_dir():
        roots.append(repo / "sim")
    plugins = repo / "plugins"
    if plugins.is_dir():
        roots += sorted(p for p in plugins.iterdir() if p.is_dir())
    return roots


def example_roots(repo: Path) -> list[tuple[Path, Path]]:
    """(project dir, import root) of each example plugin present in the tree."""
    return [
        (repo / proj, repo / src)
        for proj, src in EXAMPLES
        if (repo / proj / "pyproject.toml").is_file() and (repo / src).is_dir()
    ]


def _module_exists(module: str, roots: list[Path]) -> bool:
    rel = Path(*module.split("."))
    return any(
        (r / rel).with_suffix(".py").is_file() or (r / rel / "__init__.py").is_file() for r in roots
    )


def write_metadata(repo: Path, dest: Path) -> list[str]:
    """Write torpor's dist-info (and `bin/` wrappers for its scripts) into dest,
    and one dist-info per example plugin project.

    Entry points whose module is not in the tree yet are left out, so that
    pytest can start while others' modules are still being written; they are
    returned so the caller can say so.
    """
    dropped = _write_dist_info(repo, source_roots(repo), dest)
    for project_dir, src in example_roots(repo):
        dropped += _write_dist_info(project_dir, [src], dest)
    return dropped


def _write_dist_info(project_dir: Path, roots: list[Path], dest: Path) -> list[str]:
    project = tomllib.loads((project_dir / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    groups: dict[str, dict[str, str]] = dict(project.get("entry-points", {}))
    if project.get("scripts"):
        groups["console_scripts"] = project["scripts"]
    dropped: list[str] = []
    lines: list[str] = []
    scripts: dict[str, str] = {}
    for group, entries in groups.items():
        kept = []
        for ep_name, value in entries.items():
            module = value.split(":")[0].strip()
            if not _module_exists(module, roots):
                dropped.append(f"{group}:{ep_name} = {value}")
                continue
            kept.append(f"{ep_name} = {value}")
            if group == "console_scripts":
                scripts[ep_name] = value
        if kept:
            lines += [f"[{group}]", *kept, ""]
    # The dist-info directory name normalises the project name (PEP 427/503).
    info = dest / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("\n".join(lines))
    (info / "INSTALLER").write_text("torpor-lab\n")
    bindir = dest / "bin"
    bindir.mkdir(exist_ok=True)
    for script, value in scripts.items():
        module, _, attr = value.partition(":")
        wrapper = bindir / script
        wrapper.write_text(
            "#!/usr/bin/python3\nimport sys\n"
            f"from {module.strip()} import {attr.strip()} as main\n"
            "sys.exit(main())\n"
        )
        wrapper.chmod(0o755)
    return dropped


def dom0_pythonpath(repo: Path) -> list[str]:
    """PYTHONPATH inside dom0: torpor's metadata, its sources (and the example
    plugins'), the vendored deps."""
    here = [*source_roots(repo), *(src for _, src in example_roots(repo))]
    roots = [f"{DOM0_REPO}/{r.relative_to(repo).as_posix()}" for r in here]
    return [f"{DOM0_RUN}/in/meta", *roots, DOM0_SITE, f"{DOM0_REPO}/lab/dom0"]

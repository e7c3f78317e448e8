"""torpor installs the way Python software is installed, and works from there (issue 16).

``make dist`` builds an sdist and a wheel (``python -m build``: the sdist
first, then the wheel *from the sdist*, so a file the sdist forgets fails
here too) for torpor and for the simulated host (torpor-sim).  This test
builds them the same way, plus the example third-party plugin's, installs
the wheels into a fresh venv -- not editable, nothing of the source tree
on its path -- and runs from there what a user runs first: ``torpor
--version``, ``torpor plugins``, ``torpor demo`` (HVM guests on real QEMU
where it is installed: the simulated HVM guest image must be in the
wheel), and the example plugin's conformance suite (torpor's pytest plugin,
found through its entry point).  A module, ``py.typed`` or cffi
declaration left out of a wheel fails one of these.

The venv borrows this test run's third-party dependencies (pluggy, attrs,
pytest...) through links in a directory its ``.pth`` names, leaving out
everything of torpor's own (the editable installs and their metadata), so
nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import torpor

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = {"torpor": ROOT, "torpor_sim": ROOT / "sim", "torpor_pvh": ROOT / "examples/torpor-pvh"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make dist``'s command for each project (and the example plugin)."""
    out = tmp_path_factory.mktemp("dist")
    for project in PROJECTS.values():
        r = subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(project)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _wheel(dist: Path, dist_name: str) -> Path:
    return next(dist.glob(f"{dist_name}-*-py3-none-any.whl"))


def _lend(venv: Path, tmp: Path) -> None:
    """Links to this run's dependencies, none of torpor's own, on the venv's path."""
    import site

    lent = tmp / "lent"
    lent.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            name = entry.name.lower()
            if name.startswith(("torpor", "__editable__", "_torpor")) or name.endswith(".pth"):
                continue
            if not (lent / entry.name).exists():
                (lent / entry.name).symlink_to(entry)
    sp = next(venv.glob("lib/python*/site-packages"))
    (sp / "lent.pth").write_text(f"{lent}\n")


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("wheelvenv")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    _lend(venv, tmp)
    wheels = [str(_wheel(dist, name)) for name in PROJECTS]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--no-index", "-q", *wheels],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    yield venv


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TORPOR_"))}
    env["HOME"] = str(tmp)
    return env


def _run(
    venv: Path, tmp: Path, *argv: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        cwd=tmp,  # not the repository: nothing of the tree is importable from here
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_sdist_carries_the_sources_and_the_wheel_every_package_file(dist: Path) -> None:
    with tarfile.open(next(dist.glob("torpor-*.tar.gz"))) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "core/torpor/py.typed"} <= names
    in_tree = {
        str(p.relative_to(ROOT))
        for base in ("core", "plugins")
        for p in (ROOT / base).rglob("*")
        if p.suffix in (".py", ".typed") and "__pycache__" not in p.parts
    }
    assert in_tree <= names, sorted(in_tree - names)
    with zipfile.ZipFile(_wheel(dist, "torpor")) as whl:
        files = set(whl.namelist())
    for pkg, src in (
        ("torpor", ROOT / "core/torpor"),
        ("torpor_pv", ROOT / "plugins/pv/torpor_pv"),
        ("torpor_pvhvm", ROOT / "plugins/pvhvm/torpor_pvhvm"),
        ("torpor_hvm", ROOT / "plugins/hvm/torpor_hvm"),
    ):
        want = {
            f"{pkg}/{p.relative_to(src)}"
            for p in src.rglob("*")
            if p.suffix in (".py", ".typed") and "__pycache__" not in p.parts
        }
        assert want <= files, sorted(want - files)
    with zipfile.ZipFile(_wheel(dist, "torpor_sim")) as whl:
        sim_files = set(whl.namelist())
    want = {f"torpor_sim/{p.name}" for p in (ROOT / "sim/torpor_sim").iterdir() if p.is_file()}
    assert want <= sim_files, sorted(want - sim_files)


def test_one_version_everywhere(dist: Path) -> None:
    v = torpor.__version__
    assert _wheel(dist, "torpor").name == f"torpor-{v}-py3-none-any.whl"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in pyproject and pyproject["dynamic"] == ["version"]
    assert f"torpor-sim=={v}" in pyproject["optional-dependencies"]["sim"]
    sim = tomllib.loads((ROOT / "sim/pyproject.toml").read_text())["project"]
    assert sim["version"] == v and f"torpor=={v}" in sim["dependencies"]


def test_the_installed_wheel_runs_torpor_from_its_own_files(venv: Path, tmp_path: Path) -> None:
    py = str(venv / "bin" / "python")
    where = _run(venv, tmp_path, py, "-c",
                 "import torpor, torpor_sim, torpor_pv, torpor.testing; "
                 "print(torpor.__file__); print(torpor_sim.__file__)")  # fmt: skip
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert line.startswith(str(venv)) and "site-packages" in line, line
        assert not line.startswith(str(ROOT) + "/core")

    torpor_cmd = str(venv / "bin" / "torpor")
    r = _run(venv, tmp_path, torpor_cmd, "--version")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"torpor {torpor.__version__} ")
    assert "libxenctrl.so.4.17: " in r.stdout and "Xen hypervisor: " in r.stdout

    r = _run(venv, tmp_path, torpor_cmd, "plugins")
    assert r.returncode == 0, r.stderr
    for plugin in ("pv", "pvhvm", "hvm", "pvh"):
        assert plugin in r.stdout.split(), r.stdout

    r = _run(venv, tmp_path, torpor_cmd, "demo")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo passed" in r.stdout


def test_the_example_plugins_conformance_suite_passes_from_the_wheels(
    venv: Path, tmp_path: Path
) -> None:
    # The suite's tests, outside the tree (their own directory only on the path).
    tests = tmp_path / "tests"
    tests.mkdir()
    for f in (ROOT / "examples/torpor-pvh/tests").glob("*.py"):
        (tests / f.name).write_text(f.read_text())
    r = _run(
        venv,
        tmp_path,
        str(venv / "bin" / "python"),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-o",
        "addopts=",
        "--rootdir",
        str(tmp_path),
        str(tests),
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "error" not in r.stdout.splitlines()[-1]


def test_version_says_which_xen_libraries_it_found_and_prints_nothing_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from torpor import versions

    monkeypatch.setattr(
        versions, "XEN_LIBRARIES", ("libxenctrl.so.4.17", "libxen-no-such-thing.so.9")
    )
    libs = versions.xen_libraries()
    assert libs["libxen-no-such-thing.so.9"] == "not found"
    # libxen-dev (check_system) brings the runtime libraries: the file loaded is named.
    assert os.path.basename(libs["libxenctrl.so.4.17"]).startswith("libxenctrl.so.4.17")
    text = versions.version_text()
    assert text.splitlines()[0].startswith(f"torpor {torpor.__version__} (Python ")
    if not any(os.path.exists(p) for p in ("/dev/xen/privcmd", "/proc/xen/privcmd")):
        assert "Xen hypervisor: not found (no Xen hypervisor here" in text
    assert capfd.readouterr().err == ""

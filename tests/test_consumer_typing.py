"""A consumer's ``mypy --strict`` sees torpor's types, however torpor is installed.

A small consumer module (the embedding example of docs/embedding.md, typed)
is checked by mypy against a fresh environment holding torpor:

* installed from its wheel, as ``pip install torpor`` would;
* installed editable in setuptools' ``strict`` mode (a tree of links to the
  sources, on a path a ``.pth`` names), as docs/embedding.md tells a consumer
  to do;

and a second module with a misspelt keyword (``ack_timout``) must fail in
both.  The default editable mode (an import hook type checkers cannot
follow) is shown to hide torpor, which is why the docs say ``strict``.

Each environment is a venv without pip whose ``.pth`` lends it this test
run's dependencies (pluggy, attrs...), so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
from torpor import AckTimeout, Host, OperationError, Result, SuspendMethod, Timeouts, Torpor


def cycle(spec: str, domid: int) -> Result | None:
    with Torpor(Host.open(spec), own_host=True, timeouts=Timeouts(ack=5.0)) as t:
        try:
            res = t.suspend(domid, ack_timeout=5)
        except AckTimeout as e:
            state: str | None = e.state
            print(state)
            return None
        except OperationError:
            return None
        assert res.method is None or isinstance(res.method, SuspendMethod)
        return t.resume(domid, cooperative=True)
"""

BAD = """
from torpor import Host, Torpor

with Torpor(Host.open("sim:/tmp/h"), own_host=True) as t:
    t.suspend(1, ack_timout=5)
"""


def _site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


def _venv(tmp: Path, name: str) -> Path:
    venv = tmp / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The test run's own dependencies, lent (nothing downloaded); torpor is
    # not among them: each environment gets its own.
    lent = [p for p in site.getsitepackages() if Path(p).exists()]
    (_site_packages(venv) / "lent.pth").write_text("\n".join(lent) + "\n")
    return venv


def _pip(venv: Path, *args: str) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--no-build-isolation", "-q", *args],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )  # fmt: skip


def _mypy(venv: Path, source: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    work = tmp / f"consumer-{venv.name}"
    work.mkdir(exist_ok=True)
    (work / "consumer.py").write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--python-executable", str(venv / "bin" / "python"), "consumer.py"],
        cwd=work,  # not the repository: its mypy_path would find torpor's sources
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("consumer")
    yield d
    # the strict editable install's link tree lives in the repository's build/
    for tree in (ROOT / "build").glob("__editable__.torpor-*"):
        shutil.rmtree(tree, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(tmp: Path) -> Path:
    out = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return next(out.glob("torpor-*.whl"))


def test_a_consumer_type_checks_against_the_installed_wheel(wheel: Path, tmp: Path) -> None:
    venv = _venv(tmp, "wheel")
    _pip(venv, str(wheel))
    good = _mypy(venv, GOOD, tmp)
    assert good.returncode == 0, good.stdout
    bad = _mypy(venv, BAD, tmp)
    assert bad.returncode == 1 and 'Unexpected keyword argument "ack_timout"' in bad.stdout, (
        bad.stdout
    )


def test_a_consumer_type_checks_against_a_strict_editable_install(tmp: Path) -> None:
    venv = _venv(tmp, "editable")
    _pip(venv, "-e", str(ROOT), "--config-settings", "editable_mode=strict")
    good = _mypy(venv, GOOD, tmp)
    assert good.returncode == 0, good.stdout
    bad = _mypy(venv, BAD, tmp)
    assert bad.returncode == 1 and 'Unexpected keyword argument "ack_timout"' in bad.stdout, (
        bad.stdout
    )


def test_the_default_editable_install_hides_torpor_from_type_checkers(tmp: Path) -> None:
    """Why the docs say ``strict``: setuptools' default editable install for
    torpor's layout is an import hook, which mypy cannot follow."""
    venv = _venv(tmp, "hook")
    _pip(venv, "-e", str(ROOT))
    res = _mypy(venv, GOOD, tmp)
    assert (
        res.returncode != 0
        and 'Cannot find implementation or library stub for module named "torpor"' in res.stdout
    ), res.stdout

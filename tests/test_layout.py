"""The test tree itself: pytest's default ("prepend") import mode names a test
module after its file's basename when its folder is no package, so two such
files with one basename break collection of the whole run ("import file
mismatch") -- which CI met once with tests/test_xl_save.py and
tests/xen/test_xl_save.py."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    # What prepend mode imports the file as: its basename, prefixed by every
    # enclosing folder that is a package (has __init__.py).
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts)


def test_every_test_module_imports_under_a_name_of_its_own() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for tree in (ROOT / "tests", ROOT / "examples"):
        for path in tree.rglob("test_*.py"):
            seen[_module_name(path)].append(str(path.relative_to(ROOT)))
    clashes = {name: files for name, files in seen.items() if len(files) > 1}
    assert not clashes, f"test modules that pytest would import under one name: {clashes}"


def test_what_a_dom0_runs_does_not_import_the_simulator() -> None:
    """The simulated host is test and demo equipment (sim/, its own distribution):
    the core and the built-in plugins load without it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torpor_sim'] = None  # as if torpor-sim were not installed\n"
        "import torpor, torpor.cli, torpor.facade, torpor.orchestrator, torpor.engine\n"
        "import torpor.operations.save, torpor.operations.restore, torpor.operations.migrate\n"
        "import torpor.operations.recover, torpor.operations.checkpoint, torpor.xl\n"
        "import torpor_pv.plugin, torpor_pvhvm.plugin, torpor_hvm.plugin\n"
        "from torpor.plugins import get_plugin_manager\n"
        "get_plugin_manager()\n"
        "from torpor.cli import main\n"
        "sys.exit(main(['sim', 'start', '--dir', '/tmp/torpor-no-sim-here']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "pip install 'torpor[sim]'" in r.stderr and "Traceback" not in r.stderr, r.stderr

"""torpor's entry-point reader (torpor.plugins.entry_points) against importlib.metadata."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor.plugins import ENTRY_POINT_GROUP, entry_points, get_plugin_manager, plugin_names


def _dist(where: Path, name: str, version: str, eps: dict[str, str], module: str) -> None:
    meta = where / f"{name}-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n")
    lines = "".join(f"{k} = {v}\n" for k, v in eps.items())
    (meta / "entry_points.txt").write_text(
        f"[console_scripts]\nnot-ours = x:y\n\n[{ENTRY_POINT_GROUP}]\n{lines}"
    )
    (where / f"{module}.py").write_text(
        "from torpor import hookimpl\n\n"
        "@hookimpl\n"
        "def torpor_phase_started(ctx, phase):\n"
        "    pass\n"
    )


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "site"
    d.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(d))
    yield d
    for m in [m for m in sys.modules if m.startswith("tp_plugin")]:
        del sys.modules[m]


def test_the_same_entry_points_as_importlib_metadata() -> None:
    ours = [(e.name, e.value) for e in entry_points(ENTRY_POINT_GROUP)]
    theirs = [(e.name, e.value) for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    assert ours == theirs


def test_a_distribution_installed_later_is_found_and_loaded(site: Path, tmp_path: Path) -> None:
    before = {e.name for e in entry_points(ENTRY_POINT_GROUP)}
    assert "tp-one" not in before
    assert list((tmp_path / "cache" / "torpor").iterdir())  # the answer was cached
    _dist(site, "tp_one", "1.2", {"tp-one": "tp_plugin_one"}, "tp_plugin_one")
    # A new *.dist-info changes the directory's mtime: the cache is not believed.
    found = {e.name: e for e in entry_points(ENTRY_POINT_GROUP)}
    assert found["tp-one"].value == "tp_plugin_one"
    pm = get_plugin_manager()
    assert pm.get_plugin("tp-one") is not None
    assert ("tp-one", "tp_one 1.2") in plugin_names(pm)


def test_a_stale_or_corrupt_cache_is_not_believed(site: Path, tmp_path: Path) -> None:
    _dist(site, "tp_two", "0.1", {"tp-two": "tp_plugin_two:torpor_phase_started"}, "tp_plugin_two")
    assert "tp-two" in {e.name for e in entry_points(ENTRY_POINT_GROUP)}
    (cache,) = (tmp_path / "cache" / "torpor").iterdir()
    cache.write_text("{not json")
    assert "tp-two" in {e.name for e in entry_points(ENTRY_POINT_GROUP)}
    data = json.loads(cache.read_text())  # rewritten
    # A cache that says otherwise under the same key is believed -- that is the
    # point of it -- so the key must change with what is installed: removing
    # the distribution (its directory) changes it.
    (site / "tp_two-0.1.dist-info" / "entry_points.txt").unlink()
    (site / "tp_two-0.1.dist-info" / "METADATA").unlink()
    os.rmdir(site / "tp_two-0.1.dist-info")
    assert "tp-two" not in {e.name for e in entry_points(ENTRY_POINT_GROUP)}
    assert json.loads(cache.read_text())["key"] != data["key"]


def test_no_cache_where_none_can_be_written(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: not used
    _dist(site, "tp_three", "3", {"tp-three": "tp_plugin_three"}, "tp_plugin_three")
    assert "tp-three" in {e.name for e in entry_points(ENTRY_POINT_GROUP)}
    assert not Path("relative").exists()

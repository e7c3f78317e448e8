"""The documentation keeps up with the code.

* every hook in :mod:`torpor.hookspecs` has a docstring that describes each of
  its parameters with ``:param name:``, and the hook reference
  (``docs/hooks.rst``) generates its entry (``.. autofunction::``);
* every ``torpor_*`` hook name the docs mention (any ``.rst`` / ``.md`` under
  ``docs/``) exists in :mod:`torpor.hookspecs`;
* every ``torpor`` subcommand of :func:`torpor.cli.build_parser`, and every
  option of each, is in the CLI reference (``docs/cli.md``).

The Sphinx build itself (``make docs``, warnings as errors) is part of
``make test``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import torpor.hookspecs
from torpor.cli import build_parser
from torpor.testing import pytest_plugin

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CLI_PAGE = DOCS / "cli.md"
HOOKS_PAGE = DOCS / "hooks.rst"

#: A lower-case ``torpor_...`` identifier (not part of a longer name or of
#: ``TORPOR_...``); a trailing ``*`` makes it a prefix (``torpor_check_*``).
HOOKISH = re.compile(r"(?<![\w.])torpor_[a-z0-9_]+\*?")


def hook_names() -> dict[str, object]:
    """Every hook specification: the functions marked with ``hookspec``."""
    marker = f"{torpor.hookspecs.hookspec.project_name}_spec"
    return {
        name: obj
        for name, obj in vars(torpor.hookspecs).items()
        if inspect.isfunction(obj) and hasattr(obj, marker)
    }


def doc_files() -> list[Path]:
    skip = DOCS / "_build"
    return sorted(
        p for p in DOCS.rglob("*") if p.suffix in (".rst", ".md") and skip not in p.parents
    )


def not_hooks() -> set[str]:
    """``torpor_*`` names that are not hooks: packages, modules, pytest fixtures."""
    names = set(pytest_plugin.__all__)
    for top in ("core", "plugins", "sim", "examples", "lab", "tests"):
        for here, dirs, files in os.walk(ROOT / top):
            # not into caches (lab/cache may hold a dom0 image) or build output
            dirs[:] = [d for d in dirs if "cache" not in d and not d.endswith(".egg-info")]
            for name in (*dirs, *files):
                if name.startswith("torpor_"):
                    names.add(Path(here, name).stem)
    return names


def test_hooks_are_found() -> None:
    hooks = hook_names()
    assert "torpor_classify_domain" in hooks and "torpor_operation_failed" in hooks
    assert len(hooks) >= 15


@pytest.mark.parametrize("name", sorted(hook_names()))
def test_hook_is_documented(name: str) -> None:
    func = hook_names()[name]
    doc = inspect.getdoc(func)
    assert doc and doc.strip(), f"hook {name} has no docstring"
    params = list(inspect.signature(func).parameters)  # type: ignore[arg-type]
    missing = [p for p in params if not re.search(rf"^:param {re.escape(p)}:", doc, re.M)]
    assert not missing, f"hook {name}: parameters not described with ':param NAME:': {missing}"


@pytest.mark.parametrize("name", sorted(hook_names()))
def test_hook_is_in_the_reference(name: str) -> None:
    text = HOOKS_PAGE.read_text()
    assert f".. autofunction:: torpor.hookspecs.{name}\n" in text, (
        f"docs/hooks.rst does not generate the entry of hook {name}"
    )


def test_docs_name_only_existing_hooks() -> None:
    hooks = set(hook_names())
    others = not_hooks()
    files = doc_files()
    assert files, "no documentation pages found"
    bad = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in HOOKISH.finditer(line):
                word = m.group()
                if word.endswith("*"):
                    ok = any(h.startswith(word[:-1]) for h in hooks)
                else:
                    ok = word in hooks or word in others
                if not ok:
                    bad.append(f"{path.relative_to(DOCS.parent)}:{n}: {word}")
    assert not bad, "the docs name hooks that torpor.hookspecs does not have:\n" + "\n".join(bad)


def commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command path of the parser and its own parser, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = (*prefix, name)
                yield path, sub
                yield from commands(sub, path)


def test_cli_commands_are_found() -> None:
    paths = {" ".join(p) for p, _ in commands(build_parser())}
    assert {"suspend", "resume", "sim", "sim start", "sim stop"} <= paths


@pytest.mark.parametrize("path", [" ".join(p) for p, _ in commands(build_parser())])
def test_cli_command_in_reference(path: str) -> None:
    text = CLI_PAGE.read_text()
    assert f"torpor {path}" in text, f"docs/cli.md does not document `torpor {path}`"


def test_cli_options_in_reference() -> None:
    text = CLI_PAGE.read_text()
    missing = []
    parsers = [(("",), build_parser()), *commands(build_parser())]
    for path, parser in parsers:
        for action in parser._actions:
            for opt in action.option_strings:
                if opt in ("-h", "--help"):
                    continue
                if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                    missing.append(f"torpor {' '.join(path)}: {opt}".replace("  ", " "))
    assert not missing, "docs/cli.md does not mention these options:\n" + "\n".join(missing)


# --------------------------------------------------------------------------- public API

DOC_TEXT_CACHE: list[str] = []


def docs_text() -> str:
    if not DOC_TEXT_CACHE:
        DOC_TEXT_CACHE.append(
            "\n".join(
                p.read_text()
                for p in DOCS.rglob("*")
                if p.suffix in (".md", ".rst") and "_build" not in p.parts
            )
        )
    return DOC_TEXT_CACHE[0]


PUBLIC = sorted(n for n in __import__("torpor").__all__ if n != "__version__")


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring_and_is_in_the_docs(name: str) -> None:
    import torpor

    obj = getattr(torpor, name)
    doc = (
        inspect.getdoc(obj)
        if not isinstance(obj, torpor.hookspecs.pluggy.HookimplMarker)
        else ("marker")
    )
    assert doc and doc.strip(), f"torpor.{name} has no docstring"
    assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", docs_text()), (
        f"torpor.{name} is public (torpor.__all__) but no page under docs/ names it"
    )


def test_public_names_import_from_torpor() -> None:
    """Everything a plugin or embedder needs, from one place, typed."""
    import torpor

    assert set(torpor.__all__) <= set(dir(torpor))
    for name in torpor.__all__:
        getattr(torpor, name)


def test_hookspecs_list_every_hook_in_all() -> None:
    assert set(hook_names()) <= set(torpor.hookspecs.__all__)


@pytest.mark.parametrize(
    "method",
    sorted(
        m
        for m, f in vars(__import__("torpor.facade", fromlist=["Torpor"]).Torpor).items()
        if callable(f) and not m.startswith("_")
    ),
)
def test_facade_method_is_documented_and_takes_no_catch_all_keywords(method: str) -> None:
    from torpor.facade import Torpor

    fn = getattr(Torpor, method)
    assert inspect.getdoc(fn), f"Torpor.{method} has no docstring"
    params = inspect.signature(fn).parameters.values()
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), (
        f"Torpor.{method} takes **kwargs: a misspelt keyword would pass unseen"
    )

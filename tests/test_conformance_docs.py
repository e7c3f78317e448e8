"""docs/conformance.md keeps up with the suite: every test says what plugin bug it
catches, every class attribute is in the table of what a subclass sets, every
mixin is in the table of mixins."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from torpor.testing import suite

PAGE = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"


def section(title: str) -> str:
    text = PAGE.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def first_column(table_text: str) -> list[str]:
    """The first cell of each row of the Markdown tables in the text, backticks off."""
    cells = []
    for line in table_text.splitlines():
        m = re.match(r"\|\s*`([^`|]+)`[^|]*\|", line)
        if m:
            cells.append(m.group(1))
    return cells


def test_every_suite_test_says_what_it_guards_against() -> None:
    tests = {n for n in dir(suite.ConformanceSuite) if n.startswith("test_")}
    documented = first_column(section("What each test guards against"))
    assert sorted(documented) == sorted(set(documented)), "a test listed twice"
    assert set(documented) == tests


def test_every_class_attribute_is_documented() -> None:
    hints = typing.get_type_hints(suite.ConformanceBase)
    attributes = {n for n, h in hints.items() if not n.startswith("_") and "ClassVar" in str(h)}
    rows = section("What a subclass sets")
    documented = set()
    for line in rows.splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
    assert attributes and attributes == documented


def test_every_mixin_is_in_the_table() -> None:
    mixins = {n for n in suite.__all__ if n.endswith("Suite") and n != "ConformanceSuite"}
    assert set(first_column(section("The mixins"))) == mixins
    assert all(issubclass(suite.ConformanceSuite, getattr(suite, n)) for n in mixins)

"""docs/security.md names, for each threat, the tests that cover it: they exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "security.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def test_every_test_the_security_page_names_exists() -> None:
    refs = REF.findall(PAGE.read_text())
    assert len(refs) > 40
    missing = []
    for file, name in refs:
        path = ROOT / file
        defined = (
            {
                n.name
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            if path.exists()
            else set()
        )
        if name not in defined:
            missing.append(f"{file}::{name}")
    assert missing == []

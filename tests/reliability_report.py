"""docs/reliability.md is written by more than one test module: each owns a section.

A section sits between ``<!-- NAME -->`` and ``<!-- /NAME -->``; writing it
replaces only that section (appending it if the file lacks it), so the fault
matrix and the signal matrix can each be regenerated from their own run.
"""

from __future__ import annotations

import os
import re


def write_section(path: str, name: str, markdown: str) -> None:
    """Put ``markdown`` in section ``name`` of ``path``."""
    block = f"<!-- {name} -->\n{markdown.rstrip()}\n<!-- /{name} -->"
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)

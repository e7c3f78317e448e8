"""``python -m torpor`` is the ``torpor`` command (what works where no script is installed)."""

from __future__ import annotations

import subprocess
import sys


def test_python_m_torpor_runs_the_cli() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "torpor", "--host", "bogus", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r  # the CLI's usage error, not Python's "no __main__"
    assert "unknown host 'bogus'" in r.stderr

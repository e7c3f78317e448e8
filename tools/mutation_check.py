"""Mutation check: the lines that bring a guest back each fail a test named for them.

For each mutant below, a copy of torpor is made with one line changed (the
rollback's cooperative resume deleted, the recover's withdrawal of a pending
request replaced by ``False``, XS_RESUME after a resume deleted), and the test
named for that line runs against the copy.  The test must fail; a mutant that
survives means that line is not really tested.  The unmutated tree must pass
the same tests first (so a failure is the mutant's doing).

    python tools/mutation_check.py          # make test runs it

Each line is found by the function it is in and its text, so moving code
around does not silently turn a mutant into a no-op: a line that cannot be
found is an error.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # path under core/
    function: str  # the function (or method) holding the line
    text: str  # the line's code, stripped
    replacement: str  # what the line becomes (same indentation)
    test: str  # pytest node id that must fail


MUTANTS = (
    Mutant(
        "the rollback's cooperative resume deleted",
        "torpor/operations/suspend.py",
        "rollback",
        "orch.host.hypervisor.resume(ctx.domid, fast=fast)",
        "pass",
        "tests/test_rollback.py::test_rollback_resumes_a_guest_whose_device_model_suspend_failed",
    ),
    Mutant(
        "recover's withdrawal of a pending request replaced by False",
        "torpor/operations/recover.py",
        "bring_back",
        "if await cancel_request(orch, ctx, path):",
        "if False:",
        "tests/test_recovery.py::test_recover_withdraws_a_pending_suspend_request",
    ),
    Mutant(
        "XS_RESUME after a resume deleted",
        "torpor/operations/resume.py",
        "resume_domain",
        "await ctx.xenstore.resume(ctx.domid)",
        "pass",
        "tests/test_rollback.py::test_resume_sends_xs_resume_so_the_next_suspend_is_noticed",
    ),
)


def mutate(source: str, m: Mutant) -> str:
    """``source`` with the mutant's line replaced; ValueError if it is not there once."""
    tree = ast.parse(source)
    funcs = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == m.function
    ]
    if len(funcs) != 1:
        raise ValueError(f"{m.module}: {len(funcs)} functions named {m.function}")
    lines = source.splitlines(keepends=True)
    f = funcs[0]
    assert f.end_lineno is not None
    hits = [i for i in range(f.lineno - 1, f.end_lineno) if lines[i].strip() == m.text]
    if len(hits) != 1:
        raise ValueError(f"{m.module}:{m.function}: {len(hits)} lines are {m.text!r}")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = f"{indent}{m.replacement}\n"
    return "".join(lines)


def run_test(core: Path, test: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(core), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def main() -> int:
    failures = 0
    with tempfile.TemporaryDirectory(prefix="torpor-mutants-") as tmp:
        core = Path(tmp) / "core"
        shutil.copytree(ROOT / "core" / "torpor", core / "torpor")
        # The copy, not the editable install, must be what the tests import.
        probe = subprocess.run(
            [sys.executable, "-c", "import torpor; print(torpor.__file__)"],
            env=dict(os.environ, PYTHONPATH=str(core)),
            capture_output=True,
            text=True,
            check=True,
        )
        if not probe.stdout.strip().startswith(str(core)):
            print(f"mutation check: the copy is not imported ({probe.stdout.strip()})")
            return 2
        for m in MUTANTS:
            target = core / m.module
            original = target.read_text()
            mutated = mutate(original, m)  # raises if the line is gone: fix the table
            baseline = run_test(core, m.test)
            if baseline.returncode != 0:
                print(f"FAIL  {m.test} fails without the mutant:\n{baseline.stdout[-2000:]}")
                failures += 1
                continue
            target.write_text(mutated)
            try:
                res = run_test(core, m.test)
            finally:
                target.write_text(original)
            if res.returncode == 0:
                print(f"FAIL  survived: {m.name} ({m.function}); {m.test} still passes")
                failures += 1
            elif res.returncode != 1:  # 1: tests failed; anything else: it did not run
                print(f"FAIL  {m.test} did not run under the mutant:\n{res.stdout[-2000:]}")
                failures += 1
            else:
                print(f"ok    killed: {m.name} -- {m.test} fails")
    print(f"mutation check: {len(MUTANTS) - failures}/{len(MUTANTS)} mutants killed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

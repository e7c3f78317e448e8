"""Why two runs of the conformance suite died with a pytest INTERNALERROR (issue 13).

``SystemError: AST constructor recursion depth mismatch``: CPython 3.11 before
3.11.8 (and 3.12 before 3.12.2) keeps the AST constructor's recursion depth in
state shared by every call (gh-106905, fixed by gh-113035).  A garbage
collection that starts inside ``ast.parse`` -- pytest parses source files to
render a failure and to rewrite asserts -- and runs a finalizer that itself
formats a traceback (3.11's ``traceback`` calls ``ast.parse`` for its ``^^^``
carets) leaves the outer parse with a wrong depth, and it raises.

The finalizer in the suite's runs: a coroutine left pending on an event loop
that was then closed -- the reader of a QMP client a plugin never closed, on a
``Torpor`` client's loop.  The collector closes it; its clean-up fails ("no
running event loop"), and Python reports that through ``sys.unraisablehook``,
whose pytest implementation formats the traceback at once.  The fix:
``Torpor.close`` cancels whatever is left running on its loop before closing
it (as ``asyncio.run`` does), and the suite shuts a QMP connection a plugin
left open (``tests/test_conformance_catches_bugs.py`` runs the whole suite
against such a plugin).
"""

from __future__ import annotations

import ast
import asyncio
import gc
import sys
import traceback
from typing import Any

import pytest

import torpor_pv.plugin
from torpor.facade import Torpor
from torpor.hookspecs import hookimpl
from torpor.plugins import get_plugin_manager
from torpor_sim.host import SimHost

AFFECTED = (3, 11) <= sys.version_info < (3, 11, 8) or (3, 12) <= sys.version_info < (3, 12, 2)

SOURCE = "\n".join(
    f"def f{i}(a, b):\n    return [a + b * {i} for _ in range(3)]" for i in range(300)
)


def _schedule_cleanup() -> None:
    # What qemu.qmp's reader does when it ends: schedule its disconnect on the loop.
    asyncio.get_running_loop().call_soon(lambda: None)


async def _reader() -> None:
    try:
        await asyncio.Event().wait()
    finally:
        _schedule_cleanup()


def _formatting_hook(reported: list[Any]) -> Any:
    def hook(unraisable: Any) -> None:  # as pytest's unraisableexception plugin does
        reported.append(unraisable.exc_value)
        traceback.format_exception(
            unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback
        )

    return hook


@pytest.mark.skipif(not AFFECTED, reason="CPython fixed gh-106905 in 3.11.8 and 3.12.2")
def test_a_reader_left_on_a_closed_loop_crashes_a_later_ast_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mechanism, without torpor: what the INTERNALERROR was."""
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", _formatting_hook(reported))
    threshold = gc.get_threshold()
    gc.collect()
    gc.disable()  # the garbage below stays young: the first collection finds it
    try:
        loop = asyncio.new_event_loop()
        tasks = [loop.create_task(_reader()) for _ in range(3)]
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()  # the readers still pending: what Torpor.close used to do
        for t in tasks:
            t.cycle = t  # type: ignore[attr-defined]  # for the collector, not refcounting
        del t, tasks, loop
        gc.set_threshold(1)  # the next allocation collects: inside the AST constructor
        with pytest.raises(SystemError, match="AST constructor recursion depth mismatch"):
            gc.enable()
            compile(SOURCE, "<pytest's parse>", "exec", ast.PyCF_ONLY_AST)
    finally:
        gc.enable()
        gc.set_threshold(*threshold)
        gc.collect()
    assert any("no running event loop" in str(e) for e in reported), reported


class _LeavesAReader:
    """A plugin that starts a reader on the orchestrator's loop and never stops it."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    @hookimpl
    def torpor_before_suspend(self, ctx: Any) -> None:
        self.tasks.append(asyncio.ensure_future(_reader()))


def test_torpor_close_leaves_nothing_for_the_garbage_collector(
    sim_host: SimHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    domid = sim_host.create_guest("pv")
    plugin = _LeavesAReader()
    t = Torpor(
        sim_host.toolstack_host(),
        own_host=True,
        plugin_manager=get_plugin_manager(plugins=[torpor_pv.plugin, plugin], autoload=False),
    )
    t.suspend(domid)
    t.resume(domid)
    task = plugin.tasks[0]
    assert not task.done()
    t.close()
    assert task.cancelled(), "a task left pending on the closed loop"
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", _formatting_hook(reported))
    del task, t
    plugin.tasks.clear()
    gc.collect()
    assert reported == []

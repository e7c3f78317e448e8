"""Threads and domain builders for save, restore and migrate.

A domain builder's calls (``xc_domain_save``, a domain build, a destroy)
block, so they run in worker threads; a thread cannot be stopped, so a
cancelled operation waits for its thread before anything is rolled back
(:func:`in_thread`), and the last step of a save or migration whose product
already exists runs to its end (:func:`completing`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from torpor.errors import BackendUnavailable, Interrupted

if TYPE_CHECKING:
    from torpor.builder import DomainBuilder
    from torpor.engine import Engine
    from torpor.host import Host

__all__ = ["builder_of", "completing", "in_thread", "interruption"]

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread``, except that a cancellation waits for the thread.

    A thread cannot be stopped; whatever it touches (a domain being saved,
    built or destroyed) must be settled before a rollback looks at it.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


def interruption(orch: Engine, message: str, *, state: str) -> Interrupted | None:
    """A cancellation outside any domain's operation: the Interrupted to raise
    if :meth:`Engine.interrupt` caused it (the task's cancel request is consumed),
    or ``None`` for a caller's own cancellation (re-raise CancelledError)."""
    task = asyncio.current_task()
    if orch._interrupted is None or task is None:
        return None
    task.uncancel()
    return Interrupted(message, reason=orch._interrupted, clean=True, state=state)


async def completing(orch: Engine, fn: Callable[..., T], *args: Any) -> T:
    """The last step of a save or migration whose product exists (the
    verified file, the guest running at the destination): it runs to its
    end even if interrupted, and the operation then completes -- undoing
    it would leave two copies of the guest, or none."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # whoever cancelled: finishing is the only safe end
        return fut.result()


def builder_of(host: Host, what: str) -> DomainBuilder:
    if host.builder is None:
        raise BackendUnavailable(f"host {host.name} cannot {what} domains (no domain builder)")
    return host.builder

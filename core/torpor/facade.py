"""The synchronous face of torpor: :class:`Torpor`, for toolstacks without asyncio.

It runs one :class:`~torpor.orchestrator.Orchestrator` on a private
event-loop thread; every method blocks until its operation ends and returns
the same results and raises the same errors as the orchestrator's.  The
methods' parameters are the orchestrator's, spelled out (a misspelt keyword
is a type error, not a silent default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from torpor.orchestrator import Orchestrator

if TYPE_CHECKING:
    from collections.abc import Awaitable

    import pluggy

    from torpor.errors import TorporError
    from torpor.host import Host
    from torpor.image import SavedDomain
    from torpor.livesave import IncomingImage
    from torpor.model import PrecopyPolicy, Result, Timeouts
    from torpor.operations.hostwide import GuestFilter, HostReport, OnGuest

__all__ = ["Torpor"]

log = logging.getLogger("torpor")

T = TypeVar("T")


class Torpor:
    """Suspend and resume domains of one host, synchronously.

    Thread-safe: operations on different domains may be started from
    different threads and run concurrently (on the one loop).  Use it as a
    context manager, or call :meth:`close`.

    :param host: the host (closed by :meth:`close` if ``own_host``).
    :param plugin_manager: from :func:`torpor.plugins.get_plugin_manager` (default: a new one).
    :param timeouts: the deadlines (:class:`~torpor.model.Timeouts`).
    :param concurrency: at most this many domains in flight in a bulk operation.
    :param own_host: close ``host`` with this object.
    :param record_intent: keep intent records in the domains' lock files (see :mod:`torpor.intent`).
    """

    def __init__(
        self,
        host: Host,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        timeouts: Timeouts | None = None,
        concurrency: int = 256,
        own_host: bool = False,
        record_intent: bool = True,
    ) -> None:
        self.host = host
        self._own_host = own_host
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="torpor", daemon=True)
        self._thread.start()
        #: the asyncio orchestrator this object drives (bound to :attr:`loop`)
        self.orchestrator = Orchestrator(
            host,
            plugin_manager=plugin_manager,
            timeouts=timeouts,
            concurrency=concurrency,
            record_intent=record_intent,
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            # Ctrl-C in a program that installed no handler of its own: roll
            # back what is in flight (as interrupt() does), then let it go on.
            self.interrupt("SIGINT")
            with contextlib.suppress(Exception):
                fut.result()
            raise

    # -- operations --------------------------------------------------------------

    def suspend(
        self,
        domid: int,
        *,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> Result:
        """Suspend a domain: it ends shut down with reason suspend (or asleep in S3).

        :param ack_timeout: / :param suspend_timeout: override
            :class:`~torpor.model.Timeouts` ``ack`` / ``suspend`` for this call.
        :raises torpor.errors.OperationError: a subclass saying what failed; its
            ``state`` is what the domain was observed in afterwards.
        """
        return self._run(
            self.orchestrator.suspend(
                domid, ack_timeout=ack_timeout, suspend_timeout=suspend_timeout
            )
        )

    def resume(self, domid: int, *, cooperative: bool = True, force: bool = False) -> Result:
        """Resume a suspended domain (or wake one asleep in S3).

        :param cooperative: fast (the guest's hypercall returns 1 and it reuses
            what it saved); ``False`` is for a guest in a new domain, and is
            refused in place (UnsafeResume) unless the guest type survives it.
        :param force: do an unsafe in-place non-cooperative resume anyway; the
            outcome is reported as seen.
        """
        return self._run(self.orchestrator.resume(domid, cooperative=cooperative, force=force))

    def checkpoint(
        self,
        domid: int,
        callback: Callable[[Result], Any] | None = None,
        *,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> Result:
        """Suspend, run ``callback(suspend_result)`` while suspended, resume cooperatively.

        The guest is resumed even if the callback fails; the callback's error
        is then raised as an OperationError in phase ``callback``.
        """
        return self._run(
            self.orchestrator.checkpoint(
                domid, callback, ack_timeout=ack_timeout, suspend_timeout=suspend_timeout
            )
        )

    def checkpoints(
        self,
        domid: int,
        count: int,
        *,
        interval: float = 0.0,
        callback: Callable[[Result], Any] | None = None,
        on_result: Callable[[Result], None] | None = None,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> list[Result]:
        """``count`` checkpoints in one session (claimed, classified, bound once).

        :param interval: seconds between checkpoints.
        :param callback: run while the guest is suspended, each time.
        :param on_result: sees each checkpoint's result as it comes (on the
            orchestrator's thread).
        """
        return self._run(
            self.orchestrator.checkpoints(
                domid,
                count,
                interval=interval,
                callback=callback,
                on_result=on_result,
                ack_timeout=ack_timeout,
                suspend_timeout=suspend_timeout,
            )
        )

    def suspend_many(
        self,
        domids: Sequence[int],
        *,
        ack_timeout: float | None = None,
        suspend_timeout: float | None = None,
    ) -> list[Result | TorporError]:
        """Suspend many domains at once (bounded concurrency); a result or an error each,
        in the order of ``domids``."""
        return self._run(
            self.orchestrator.suspend_many(
                domids, ack_timeout=ack_timeout, suspend_timeout=suspend_timeout
            )
        )

    def resume_many(
        self, domids: Sequence[int], *, cooperative: bool = True, force: bool = False
    ) -> list[Result | TorporError]:
        """Resume many domains at once (bounded concurrency); a result or an error each."""
        return self._run(
            self.orchestrator.resume_many(domids, cooperative=cooperative, force=force)
        )

    def save(self, domid: int, path: str | os.PathLike[str]) -> Result:
        """Suspend a domain, write its state to ``path``, then destroy it.

        The domain is destroyed only once the file is complete and verified;
        any earlier failure resumes the guest cooperatively where it was.
        """
        return self._run(self.orchestrator.save(domid, path))

    def restore(
        self, source: str | os.PathLike[str] | SavedDomain, *, name: str | None = None
    ) -> Result:
        """Build a new domain from a save image and start it (non-cooperatively).

        :param name: restore a copy under this name (new UUID); without it, a
            domain already holding the saved guest's name refuses the restore
            (:class:`~torpor.errors.NameInUse`).
        """
        return self._run(self.orchestrator.restore(source, name=name))

    def migrate(
        self,
        domid: int,
        to: Torpor | str,
        *,
        live: bool | None = None,
        precopy: PrecopyPolicy | None = None,
        ssh_command: str = "ssh",
    ) -> Result:
        """Move a domain to another host: ``to`` is the :class:`Torpor` of that host
        (its loop restores there), its name (``sim:DIR``: opened for this call,
        with the installed plugins and this object's deadlines), or ``xl://HOST``
        (or a bare host name, ``localhost``): xl's migration protocol to
        ``xl migrate-receive`` -- or ``torpor migrate-receive`` -- run there by
        ``sh -c "exec SSH HOST xl migrate-receive"`` (``ssh_command``, xl's
        ``-s``; empty: ``HOST`` is the whole command).

        The source is destroyed only after the guest runs at the destination;
        any earlier failure resumes the source (a live migration's may never
        have stopped) and destroys a half-built copy.

        :param live: ``None`` (default): live -- memory copied while the guest
            runs, in precopy rounds -- where the guest's dirty pages can be
            tracked, else non-live, saying why (``live_refusal`` in the
            result); ``True``: live, or :class:`~torpor.errors.LiveUnavailable`
            with the guest untouched; ``False``: suspend first, then copy.
        :param precopy: when to stop copying while the guest runs
            (:class:`~torpor.model.PrecopyPolicy`; default libxl's).
        """
        if isinstance(to, str):
            from torpor.host import Host
            from torpor.xlmigrate import parse_target

            host = parse_target(to)
            if host is not None:
                return self._run(
                    self.orchestrator.migrate_xl(
                        domid, host, ssh_command=ssh_command, live=live, precopy=precopy
                    )
                )

            with Torpor(Host.open(to), timeouts=self.orchestrator.timeouts, own_host=True) as there:
                return self.migrate(domid, there, live=live, precopy=precopy)
        destination = to

        async def restore_there(
            saved: SavedDomain | IncomingImage, *, expect_kind: str | None = None
        ) -> Result:
            fut = asyncio.run_coroutine_threadsafe(
                destination.orchestrator.restore(saved, expect_kind=expect_kind), destination.loop
            )
            return await asyncio.wrap_future(fut)

        async def named_there(name: str) -> int | None:
            fut = asyncio.run_coroutine_threadsafe(
                destination.orchestrator.domain_named(name), destination.loop
            )
            return await asyncio.wrap_future(fut)

        proxy = _RemoteOrchestrator(destination.orchestrator.host, restore_there, named_there)
        return self._run(
            self.orchestrator.migrate(domid, proxy, live=live, precopy=precopy)  # type: ignore[arg-type]
        )

    def migrate_receive(
        self,
        *,
        recv_fd: int = 0,
        send_fd: int = 1,
        pause_after: bool = False,
        go_timeout: float | None = None,
    ) -> Result:
        """Receive one domain over xl's migration protocol (``xl migrate``'s
        other end): the stream on ``recv_fd`` (stdin), the answers on
        ``send_fd`` (stdout).

        :param pause_after: leave it paused (xl ``migrate-receive -p``).
        :param go_timeout: how long to wait for the sender's permission to
            start the guest (default: for ever, as xl).
        """
        from torpor.xlmigrate import Channel

        channel = Channel(send_fd, recv_fd, peer="migration sender")
        return self._run(
            self.orchestrator.migrate_receive(
                channel, pause_after=pause_after, go_timeout=go_timeout
            )
        )

    # -- the whole host ----------------------------------------------------------

    def save_all(
        self,
        directory: str | os.PathLike[str],
        *,
        select: GuestFilter | None = None,
        concurrency: int | None = None,
        max_rate: float | None = None,
        shutdown_fallback: bool = False,
        shutdown_timeout: float = 300.0,
        on_guest: OnGuest | None = None,
    ) -> HostReport:
        """Save every running guest (or those ``select`` picks) into ``directory``,
        concurrently, with ``directory/manifest.json`` (see :meth:`Orchestrator.save_all
        <torpor.orchestrator.Orchestrator.save_all>`).  ``on_guest`` runs on the
        orchestrator's thread."""
        return self._run(
            self.orchestrator.save_all(
                directory,
                select=select,
                concurrency=concurrency,
                max_rate=max_rate,
                shutdown_fallback=shutdown_fallback,
                shutdown_timeout=shutdown_timeout,
                on_guest=on_guest,
            )
        )

    def restore_all(
        self,
        directory: str | os.PathLike[str],
        *,
        select: GuestFilter | None = None,
        concurrency: int | None = None,
        on_guest: OnGuest | None = None,
    ) -> HostReport:
        """Restore what :meth:`save_all` saved in ``directory``, in the saved order (see
        :meth:`Orchestrator.restore_all <torpor.orchestrator.Orchestrator.restore_all>`)."""
        return self._run(
            self.orchestrator.restore_all(
                directory, select=select, concurrency=concurrency, on_guest=on_guest
            )
        )

    # -- inspection and recovery ---------------------------------------------------

    def list_domains(self) -> list[dict[str, Any]]:
        """Every guest domain: ``{"domid", "name", "guest_type", "state"}`` (dom0 left out)."""
        return self._run(self.orchestrator.list_domains())

    def status(self, domid: int) -> dict[str, Any]:
        """The truth about a domain, observed, and any torpor intent record
        (see :meth:`Orchestrator.status <torpor.orchestrator.Orchestrator.status>`)."""
        return self._run(self.orchestrator.status(domid))

    def recover(self, domid: int) -> Result:
        """Bring a domain a killed or interrupted torpor left behind back to running."""
        return self._run(self.orchestrator.recover(domid))

    # -- interruption and life cycle ---------------------------------------------

    def interrupt(self, reason: str = "interrupted") -> None:
        """Stop every operation in flight and refuse new ones; safe from any thread
        and from a signal handler (see :meth:`Orchestrator.interrupt
        <torpor.orchestrator.Orchestrator.interrupt>`).

        Returns at once; each operation's caller then gets
        :class:`~torpor.errors.Interrupted` once its rollback is done.
        """
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self.loop.call_soon_threadsafe(self.orchestrator.interrupt, reason)

    def in_flight(self) -> list[tuple[int, str, str]]:
        """``(domid, operation, phase)`` of every operation now holding a domain."""
        return self.orchestrator.in_flight()

    def close(self) -> None:
        """Interrupt what is in flight (it is rolled back), then release everything."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(self.orchestrator.close())
            with contextlib.suppress(Exception):
                self._run(_cancel_leftovers())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
        if self._own_host:
            self.host.close()

    def __enter__(self) -> Torpor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_leftovers(timeout: float = 2.0) -> None:
    """Cancel the tasks still running on this loop (what a plugin left: the reader of a
    QMP connection it never closed...) and let them end, as ``asyncio.run`` does.

    A task left pending on a closed loop is finalized by the garbage collector at some
    later moment, in whatever code happens to allocate then; its clean-up fails ("Event
    loop is closed") and Python reports that through ``sys.unraisablehook``.  Under
    pytest on Python 3.11 before 3.11.8 that report, made in the middle of pytest's own
    ``ast.parse``, crashed the session (INTERNALERROR ``SystemError: AST constructor
    recursion depth mismatch``; CPython gh-106905).
    """
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    if not left:
        return
    log.warning(
        "closing torpor: cancelling %d task(s) left running (a plugin's?): %s",
        len(left),
        ", ".join(sorted({getattr(t.get_coro(), "__qualname__", t.get_name()) for t in left})),
    )
    for t in left:
        t.cancel()
    await asyncio.wait(left, timeout=timeout)


class _RemoteOrchestrator:
    """The destination of a migration when it runs on another Torpor's loop."""

    def __init__(
        self,
        host: Host,
        restore: Callable[..., Awaitable[Result]],
        domain_named: Callable[[str], Awaitable[int | None]],
    ) -> None:
        self.host = host
        self.restore = restore
        self.domain_named = domain_named

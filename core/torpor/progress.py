"""The CLI's reports and progress: a torpor plugin that watches operations go by.

:class:`Reporter` prints each domain's result **once**, on stdout, as that
domain finishes (from ``torpor_after_suspend``, ``torpor_after_resume`` and
``torpor_operation_failed``), and shows progress on stderr only where it adds
something:

* ``--json``: nothing on stderr; one JSON object per finished domain on stdout.
* stderr not a terminal: a line when a phase is still running after a second,
  saying what it waits for (``domain 2: suspend: waiting up to 30s for the guest
  to acknowledge the suspend request``).
* stderr a terminal, one domain: a line as each phase starts, a line for a
  phase that fails, and the same waiting lines.
* stderr a terminal, several domains: one live line per domain in flight with
  its current phase (and what it waits for), rewritten in place by ``rich``,
  which is imported only then (start-up stays cheap otherwise).

Hook implementations run on the orchestrator's event-loop thread; the
waiting lines are timers on that loop (``loop.call_later``), cancelled when
the phase ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torpor.hookspecs import hookimpl
from torpor.model import Phase, SuspendMethod

if TYPE_CHECKING:
    from torpor.context import OperationContext
    from torpor.errors import TorporError
    from torpor.model import PrecopyRound, Result

__all__ = ["NOTICE_AFTER", "Reporter", "describe", "describe_failure", "failure_dict"]

#: A phase still running after this many seconds says what it waits for.
NOTICE_AFTER = 1.0


def describe(res: Result) -> str:
    """One line for a successful operation (``domain 1: suspend ok via xenstore: ...``)."""
    phases = ", ".join(f"{t.phase} {t.seconds * 1000:.1f}ms" for t in res.timings)
    how = f" via {res.method}" if res.method else ""
    coop = (
        ""
        if res.cooperative is None
        else (" (cooperative)" if res.cooperative else " (non-cooperative)")
    )
    details = dict(res.details)
    who: object = res.domid
    where = ""
    if "source_domid" in details:  # a migration: the guest has a new domid there
        who = details["source_domid"]
        there = details.get("destination_domid", res.domid)
        where = (
            f" as domain {there} on {details.get('destination')}"
            if there is not None
            else f" on {details.get('destination')}"
        )
        where += "; " + _migration_summary(details)
    return (
        f"domain {who}: {res.operation} ok{how}{coop}: {res.outcome}, now {res.state}{where}"
        f" in {res.seconds * 1000:.1f} ms [{phases}]"
    )


def _migration_summary(details: dict[str, object]) -> str:
    """``live, downtime 12.3 ms, 3 precopy rounds (converged)`` or why it was not live."""
    downtime = details.get("downtime")
    down = f"downtime {float(downtime) * 1000:.1f} ms" if isinstance(downtime, float) else ""
    if not details.get("live"):
        why = details.get("live_refusal") or "not live"
        return ", ".join(filter(None, ("non-live", down, str(why))))
    rounds = details.get("rounds")
    n = len(rounds) if isinstance(rounds, list) else 0
    how = details.get("precopy")
    if how == "converged":
        pre = f"{n} precopy round{'s' * (n != 1)} (converged)"
    else:
        pre = (
            f"{n} precopy round{'s' * (n != 1)}: did not converge, stopped at the "
            f"iteration bound, {details.get('final_pages')} pages sent after the suspend"
        )
    return ", ".join(filter(None, ("live", down, pre)))


def describe_failure(domid: int, op: str, err: TorporError) -> str:
    """One line for a failed operation, with the state the domain was left in."""
    left = getattr(err, "state", None)
    state = f" (domain state: {left})" if left else ""
    return f"domain {domid}: {op} FAILED: {err}{state}"


def failure_dict(domid: int, op: str, err: TorporError) -> dict[str, Any]:
    """The JSON object for a failed operation."""
    out: dict[str, Any] = {"domid": domid, "operation": op, "ok": False}
    out.update(err.to_dict())
    return out


def waiting_for(ctx: OperationContext, phase: Phase) -> str | None:
    """What a phase that takes long is waiting for, with its deadline; None: nothing to say."""
    t = ctx.timeouts
    if phase == Phase.ACK:
        return f"waiting up to {t.ack:g}s for the guest to acknowledge the suspend request"
    if phase == Phase.SHUTDOWN:
        if ctx.facts.get("settling"):  # recover, or a rollback: a suspend it did not start
            return f"waiting up to {t.settle:g}s for a suspend already under way"
        if ctx.method == SuspendMethod.ACPI_S3:
            return f"waiting up to {t.suspend:g}s for the guest to go to sleep in ACPI S3"
        return f"waiting up to {t.suspend:g}s for the domain to shut down with reason suspend"
    if phase in (Phase.DEVICE_MODEL_SUSPEND, Phase.DEVICE_MODEL_RESUME):
        return f"waiting up to {t.device_model:g}s for the device model (QMP)"
    if phase == Phase.GUEST_RESUME and ctx.facts.get("s3"):
        return f"waiting up to {t.wake:g}s for the guest to wake from ACPI S3"
    if phase == Phase.VERIFY:
        return f"waiting up to {t.resume:g}s for the resumed guest to run"
    return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _same_file(a: Any, b: Any) -> bool:
    try:
        return os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, ValueError, OSError):
        return False


class _Row:
    """One domain in flight, for the live display."""

    __slots__ = ("domid", "notice", "operation", "phase", "since")

    def __init__(self, domid: int, operation: str, phase: Phase) -> None:
        self.domid = domid
        self.operation = operation
        self.phase = phase
        self.since = time.monotonic()
        self.notice: str | None = None


class Reporter:
    """A torpor plugin that reports results as domains finish, and shows progress.

    :param operation: print the result of each domain's ``operation``
        (``suspend`` or ``resume``) on stdout as it finishes; ``None``: the
        caller prints results itself (progress only).
    :param json: results as JSON objects; nothing on stderr.
    :param err: the progress stream (default: ``sys.stderr`` as it is now).
    :param out: the results stream (default: ``sys.stdout`` as it is now).
    """

    def __init__(
        self,
        *,
        operation: str | None = None,
        json: bool = False,
        err: Any = None,
        out: Any = None,
        notice_after: float = NOTICE_AFTER,
    ) -> None:
        self.operation = operation
        self.json = json
        self.err = sys.stderr if err is None else err
        self.out = sys.stdout if out is None else out
        self.tty = _isatty(self.err)
        self.notice_after = notice_after
        #: domid -> whether its result, printed as it finished, was a success
        self.reported: dict[int, bool] = {}
        self.total = 0
        self.done = 0
        self.failed = 0
        #: a write failed with EPIPE (the reader went away): nothing more is written
        self.broken_pipe = False
        self._phase_lines = False
        self._rows: dict[int, _Row] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._lock = threading.RLock()
        self._live: Any = None
        self._results_above_live = False

    # -- the display's life ------------------------------------------------------

    @contextlib.contextmanager
    def showing(self, domids: Sequence[int], *, phase_lines: bool = True) -> Iterator[Reporter]:
        """Show progress while the operations on ``domids`` run (a live display on a
        terminal for several domains); stop it, cleanly, however they end.

        :param phase_lines: for one domain on a terminal, a line as each phase starts.
        """
        self.total = len(domids)
        self._phase_lines = phase_lines and self.tty and not self.json and self.total <= 1
        if self.tty and not self.json and self.total > 1:
            self._start_live()
        try:
            yield self
        finally:
            self._stop_live()

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.err, highlight=False)
        if not console.is_interactive:  # a dumb terminal: plain lines, as for a pipe
            return
        live = Live(
            get_renderable=self._render,
            console=console,
            refresh_per_second=4,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        # Results go to stdout; on the live display's own terminal they are
        # printed above it (through it), elsewhere straight to stdout.
        self._results_above_live = _same_file(self.out, self.err)
        live.start()
        self._live = live

    def _stop_live(self) -> None:
        with self._lock:
            live, self._live = self._live, None
        if live is not None:
            with contextlib.suppress(OSError):
                live.stop()

    def _render(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        now = time.monotonic()
        with self._lock:
            rows = [
                (r.domid, r.operation, r.phase, now - r.since, r.notice)
                for r in self._rows.values()
            ]
            summary = f"{self.done}/{self.total} done, {self.failed} failed, {len(rows)} in flight"
        lines = []
        for domid, op, phase, seconds, notice in rows:
            text = f"domain {domid}: {op}: {phase} ({seconds:.1f}s)"
            if notice:
                text += f" -- {notice}"
            lines.append(Text(text, no_wrap=True, overflow="ellipsis"))
        lines.append(Text(summary, no_wrap=True, overflow="ellipsis"))
        return Group(*lines)

    # -- writing -------------------------------------------------------------------

    def _write(self, stream: Any, text: str) -> None:
        if self.broken_pipe:
            return
        try:
            print(text, file=stream, flush=True)
        except BrokenPipeError:
            self.broken_pipe = True

    # rich's auto-refresh thread holds the live display's lock while it calls
    # _render, which takes ours: never call into rich while holding ours.

    def _above_live(self, live: Any, text: str, *, refresh: bool = False) -> None:
        if refresh:
            live.refresh()  # the display as it is now, before the line goes above it
        try:
            live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        except BrokenPipeError:
            self.broken_pipe = True

    def _progress(self, text: str) -> None:
        """A progress line on stderr (above the live display if there is one)."""
        if self.json:
            return
        with self._lock:
            live = self._live
        if live is not None:
            self._above_live(live, text)
        else:
            self._write(self.err, text)

    def _result(self, domid: int, ok: bool, text: str, obj: dict[str, Any]) -> None:
        """A domain's result on stdout, once."""
        with self._lock:
            if domid in self.reported:
                return
            self.reported[domid] = ok
            self.done += 1
            self.failed += 0 if ok else 1
            self._rows.pop(domid, None)
            live = self._live if self._results_above_live else None
        line = json.dumps(obj) if self.json else text
        if live is not None:
            self._above_live(live, line, refresh=True)
        else:
            self._write(self.out, line)

    # -- timers (on the orchestrator's loop) ------------------------------------------

    def _cancel_timer(self, domid: int) -> None:
        timer = self._timers.pop(domid, None)
        if timer is not None:
            timer.cancel()

    def _waiting(self, ctx: OperationContext, text: str) -> None:
        self._timers.pop(ctx.domid, None)
        with self._lock:
            live = self._live
            row = self._rows.get(ctx.domid)
            if row is not None:
                row.notice = text
        if live is not None and row is not None:
            live.refresh()  # shown in its live line at once
        else:
            self._progress(f"domain {ctx.domid}: {ctx.operation}: {text}")

    # -- hooks -------------------------------------------------------------------------

    @hookimpl
    def torpor_phase_started(self, ctx: OperationContext, phase: Phase) -> None:
        with self._lock:
            self._rows[ctx.domid] = _Row(ctx.domid, ctx.operation, phase)
        if self._phase_lines:
            self._progress(f"domain {ctx.domid}: {ctx.operation}: {phase} ...")
        self._cancel_timer(ctx.domid)
        text = None if self.json else waiting_for(ctx, phase)
        if text is not None:
            loop = asyncio.get_running_loop()
            self._timers[ctx.domid] = loop.call_later(self.notice_after, self._waiting, ctx, text)

    @hookimpl
    def torpor_phase_finished(
        self, ctx: OperationContext, phase: Phase, seconds: float, error: TorporError | None
    ) -> None:
        self._cancel_timer(ctx.domid)
        if self._phase_lines and error is not None:
            self._progress(
                f"domain {ctx.domid}: {ctx.operation}: {phase} failed after {seconds * 1000:.1f} ms"
            )

    @hookimpl
    def torpor_precopy_round(self, ctx: OperationContext, precopy: PrecopyRound) -> None:
        dirty = (
            f"{precopy.dirty} dirtied meanwhile ({precopy.dirty_rate:.0f} pages/s)"
            if precopy.dirty >= 0
            else "then the stop-and-copy"
        )
        text = (
            f"precopy round {precopy.iteration}: {precopy.pages} pages sent in "
            f"{precopy.seconds * 1000:.1f} ms, {dirty}"
        )
        with self._lock:
            live = self._live
            row = self._rows.get(ctx.domid)
            if row is not None:
                row.notice = text
        if live is not None and row is not None:
            live.refresh()
        elif self._phase_lines or not self.tty:
            self._progress(f"domain {ctx.domid}: {ctx.operation}: {text}")

    @hookimpl
    def torpor_after_suspend(self, ctx: OperationContext, result: Result) -> None:
        if ctx.operation == self.operation:
            self._result(ctx.domid, True, describe(result), result.to_dict())

    @hookimpl
    def torpor_after_resume(self, ctx: OperationContext, result: Result) -> None:
        if ctx.operation == self.operation:
            self._result(ctx.domid, True, describe(result), result.to_dict())

    @hookimpl
    def torpor_operation_failed(self, ctx: OperationContext, error: TorporError) -> None:
        self._cancel_timer(ctx.domid)
        with self._lock:
            self._rows.pop(ctx.domid, None)
        if ctx.operation == self.operation:
            op = ctx.operation
            self._result(
                ctx.domid,
                False,
                describe_failure(ctx.domid, op, error),
                failure_dict(ctx.domid, op, error),
            )

"""Progress display for the CLI: a torpor plugin that watches the phases go by."""

from __future__ import annotations

import sys
import time
from typing import Any

from torpor.context import OperationContext
from torpor.errors import TorporError
from torpor.hookspecs import hookimpl
from torpor.model import Phase

__all__ = ["Reporter"]


class Reporter:
    """A torpor plugin that shows phases as they happen (registered by the CLI).

    One domain: one line per phase.  Many domains on a terminal: one status
    line rewritten in place.  Many domains elsewhere: one line per domain.
    """

    def __init__(self, *, quiet: bool, total: int, stream: Any = None) -> None:
        self.quiet = quiet
        self.total = total
        # sys.stderr as it is now, not as it was at import (it may have been replaced)
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.done = 0
        self.failed = 0
        self.in_flight: set[int] = set()
        self.t0 = time.monotonic()

    def _line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def _status(self) -> None:
        if self.quiet or not self.tty:
            return
        elapsed = time.monotonic() - self.t0
        text = (
            f"\r{self.done}/{self.total} done, {self.failed} failed, "
            f"{len(self.in_flight)} in flight  ({elapsed:.1f}s)"
        )
        print(text, end="", file=self.stream, flush=True)

    @hookimpl
    def torpor_phase_started(self, ctx: OperationContext, phase: Phase) -> None:
        self.in_flight.add(ctx.domid)
        if self.total == 1:
            self._line(f"domain {ctx.domid}: {ctx.operation}: {phase} ...")
        else:
            self._status()

    @hookimpl
    def torpor_phase_finished(
        self, ctx: OperationContext, phase: Phase, seconds: float, error: TorporError | None
    ) -> None:
        if self.total == 1 and error is not None:
            self._line(
                f"domain {ctx.domid}: {ctx.operation}: {phase} failed after {seconds * 1000:.1f} ms"
            )

    def finished(self, domid: int, ok: bool, text: str) -> None:
        self.in_flight.discard(domid)
        self.done += 1
        self.failed += 0 if ok else 1
        if self.total == 1:
            return
        if self.tty:
            self._status()
            if self.done == self.total:
                print(file=self.stream)
        else:
            self._line(text)

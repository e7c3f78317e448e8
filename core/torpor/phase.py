"""One phase of an operation: announced, timed, and named on the errors it ends with.

``async with engine._phase(ctx, Phase.ACK, timings)``: ``torpor_phase_started``
before, ``torpor_phase_finished`` after (with the error the phase ended with,
whether it raised one or set :attr:`PhaseScope.error`), the phase's
:class:`~torpor.model.PhaseTiming` appended, and an error leaving it given the
phase and the domain if it has none.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from torpor.errors import Interrupted, TorporError
from torpor.model import Phase, PhaseTiming

if TYPE_CHECKING:
    from torpor.context import OperationContext
    from torpor.engine import Engine

__all__ = ["PhaseScope"]


class PhaseScope:
    """One phase: notifications around it, its timing, its name on errors."""

    __slots__ = ("ctx", "error", "orch", "phase", "t0", "timings")

    def __init__(
        self,
        orch: Engine,
        ctx: OperationContext,
        phase: Phase,
        timings: list[PhaseTiming],
    ) -> None:
        self.orch = orch
        self.ctx = ctx
        self.phase = phase
        self.timings = timings
        self.t0 = 0.0
        #: set by the phase's body when it fails without raising (an ack that timed out)
        self.error: TorporError | None = None

    async def __aenter__(self) -> PhaseScope:
        self.ctx.phase = self.phase
        await self.orch._notify("torpor_phase_started", ctx=self.ctx, phase=self.phase)
        self.t0 = time.perf_counter()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        seconds = time.perf_counter() - self.t0
        error = exc if isinstance(exc, TorporError) else self.error
        if isinstance(exc, asyncio.CancelledError):
            reason = self.orch.interrupted or "cancelled"
            error = Interrupted(
                f"interrupted ({reason})", reason=reason, domid=self.ctx.domid, phase=self.phase
            )
        if error is not None:
            if error.phase is None:
                error.phase = self.phase
            if error.domid is None:
                error.domid = self.ctx.domid
        self.timings.append(PhaseTiming(self.phase, seconds))
        await self.orch._notify(
            "torpor_phase_finished",
            ctx=self.ctx,
            phase=self.phase,
            seconds=seconds,
            error=error,
        )

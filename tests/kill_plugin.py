"""A torpor plugin that kills its own process with SIGKILL at a chosen point.

``TORPOR_TEST_KILL_AT=<operation>:<started|finished>:<phase>`` -- loaded with
``torpor -p kill_plugin`` (tests put this directory on PYTHONPATH) to prove
that torpor killed in any phase leaves a domain ``torpor status`` describes
truthfully and ``torpor recover`` brings back.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from torpor import hookimpl

_AT = os.environ.get("TORPOR_TEST_KILL_AT", "")


def _maybe_die(ctx: Any, when: str, phase: Any) -> None:
    if _AT == f"{ctx.operation}:{when}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


@hookimpl
def torpor_phase_started(ctx: Any, phase: Any) -> None:
    _maybe_die(ctx, "started", phase)


@hookimpl
def torpor_phase_finished(ctx: Any, phase: Any, seconds: float, error: Any) -> None:
    _maybe_die(ctx, "finished", phase)

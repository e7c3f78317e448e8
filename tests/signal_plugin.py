"""A torpor plugin that marks (and can hold) one phase, for the signal tests.

``TORPOR_TEST_MARK_AT=<operation>:<phase>`` -- loaded with ``torpor -p
signal_plugin`` (tests put this directory on PYTHONPATH): when that phase
starts, ``MARK <operation>:<phase>`` is written to stderr, so a test driving
the CLI through a terminal knows the moment to send its signal without
sleeping (the first time only).  With ``TORPOR_TEST_HOLD=1`` the phase is then held (the hook
awaits a future nothing sets) until the operation is cancelled -- the only
way to be *in* a phase that is otherwise over in microseconds.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from torpor import hookimpl

_AT = os.environ.get("TORPOR_TEST_MARK_AT", "")
_HOLD = os.environ.get("TORPOR_TEST_HOLD") == "1"
_state = {"held": False}


@hookimpl
async def torpor_phase_started(ctx: Any, phase: Any) -> None:
    if _state["held"] or _AT != f"{ctx.operation}:{phase}":
        return  # once: the rollback may go through the same phase again
    _state["held"] = True
    print(f"MARK {_AT}", file=sys.stderr, flush=True)
    if _HOLD:
        await asyncio.get_running_loop().create_future()  # until cancelled

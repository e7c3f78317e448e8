"""The fuzzers' budget: small and deterministic in CI, as large as asked for on demand.

``make test`` runs every fuzzer with its CI budget: a fixed number of
hypothesis examples, derandomized (the same inputs on every run), and a
few seconds for the time-boxed loops.  ``make fuzz`` (or the environment
variables below) raises the budget and lets hypothesis pick fresh inputs:

``TORPOR_FUZZ_EXAMPLES``  hypothesis examples per property (default: each test's CI budget)
``TORPOR_FUZZ_SECONDS``   seconds per time-boxed random-stream loop (default: CI budget)
``TORPOR_FUZZ_SEED``      seed of the time-boxed loops and, when set, of hypothesis

A failure prints the seed or hypothesis's reproduction blob.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import seed as hyp_seed

F = TypeVar("F", bound=Callable[..., Any])

EXAMPLES = int(os.environ.get("TORPOR_FUZZ_EXAMPLES") or 0)
SECONDS = float(os.environ.get("TORPOR_FUZZ_SECONDS") or 0)
SEED = os.environ.get("TORPOR_FUZZ_SEED")
#: On demand (a budget or seed given): fresh inputs; in CI: the same inputs every run.
ON_DEMAND = bool(EXAMPLES or SECONDS or SEED)

#: What each fuzzer tried, printed at the end of the session (conftest.py).
STATS: Counter[str] = Counter()


def examples(ci: int) -> int:
    return EXAMPLES or ci


def seconds(ci: float) -> float:
    return SECONDS or ci


def rng() -> random.Random:
    """The time-boxed loops' generator: fixed in CI, TORPOR_FUZZ_SEED or fresh on demand."""
    if SEED is not None:
        return random.Random(int(SEED))
    return random.Random(random.randrange(2**32) if ON_DEMAND else 20240917)


def fuzz(ci_examples: int) -> Callable[[F], F]:
    """hypothesis settings for a fuzzer: its budget, no per-example deadline (sockets)."""

    def wrap(fn: F) -> F:
        fn = settings(
            max_examples=examples(ci_examples),
            deadline=None,
            derandomize=not ON_DEMAND,
            database=None,
            print_blob=True,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.large_base_example,
                HealthCheck.function_scoped_fixture,
            ],
        )(fn)
        if SEED is not None:
            fn = hyp_seed(int(SEED))(fn)
        return fn

    return wrap

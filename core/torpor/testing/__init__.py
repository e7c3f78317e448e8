"""Testing support for guest-type plugin authors: the conformance suite and fixtures.

See :mod:`torpor.testing.suite` for the suite and its stability promise, and
:mod:`torpor.testing.pytest_plugin` for the fixtures (registered with pytest
through the ``pytest11`` entry point when torpor is installed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

# The suite's asserts are what a plugin author reads when a test fails: have
# pytest rewrite them.  (It does so by itself for the files of a distribution
# that registers a pytest11 plugin -- but an editable install lists none.)
pytest.register_assert_rewrite("torpor.testing.suite")

__all__ = [
    "Capability",
    "CapabilitySuite",
    "CheckpointSuite",
    "ConformanceBase",
    "ConformanceSuite",
    "DeclarationSuite",
    "Expected",
    "HookSuite",
    "LeakSuite",
    "MisbehaviourSuite",
    "RefusalSuite",
    "SuspendResumeSuite",
    "capabilities_of",
    "expected_failure",
    "requires",
]


def __getattr__(name: str) -> Any:
    # Lazy: pytest loads torpor.testing.pytest_plugin in every session of a
    # machine where torpor is installed; the suite loads when a test uses it.
    if name in __all__:
        from torpor.testing import suite

        return getattr(suite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from torpor.testing.suite import (
        Capability,
        CapabilitySuite,
        CheckpointSuite,
        ConformanceBase,
        ConformanceSuite,
        DeclarationSuite,
        Expected,
        HookSuite,
        LeakSuite,
        MisbehaviourSuite,
        RefusalSuite,
        SuspendResumeSuite,
        capabilities_of,
        expected_failure,
        requires,
    )

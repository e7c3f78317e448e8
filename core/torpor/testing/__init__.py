"""Testing support for guest-type plugin authors: the conformance suite and fixtures.

See :mod:`torpor.testing.suite` for the suite and its stability promise, and
:mod:`torpor.testing.pytest_plugin` for the fixtures (registered with pytest
through the ``pytest11`` entry point when torpor is installed).
"""

from torpor.testing.suite import (
    Capability,
    CheckpointSuite,
    ConformanceBase,
    ConformanceSuite,
    Expected,
    HookSuite,
    LeakSuite,
    MisbehaviourSuite,
    RefusalSuite,
    SuspendResumeSuite,
    expected_failure,
    requires,
)

__all__ = [
    "Capability",
    "CheckpointSuite",
    "ConformanceBase",
    "ConformanceSuite",
    "Expected",
    "HookSuite",
    "LeakSuite",
    "MisbehaviourSuite",
    "RefusalSuite",
    "SuspendResumeSuite",
    "expected_failure",
    "requires",
]

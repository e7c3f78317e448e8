"""torpor's conformance suite, run against the PVH plugin on the simulated host."""

from __future__ import annotations

import torpor_pvh.plugin
from torpor.model import SuspendMethod
from torpor.testing import ConformanceSuite


class TestPvhConformance(ConformanceSuite):
    guest_kind = "pvh"  # what the simulated host builds for each test
    plugins = (torpor_pvh.plugin,)  # exactly the plugins under test
    suspend_method = SuspendMethod.XENSTORE
    entry_point = "pvh"  # its name in the `torpor` entry-point group (pyproject.toml)
    # What it can do is read from its GuestType: the handshake and a cooperative
    # resume; no event channel, device model, S3 or in-place fast=0 resume.

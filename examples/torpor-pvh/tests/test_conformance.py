"""torpor's conformance suite, run against the PVH plugin on the simulated host."""

from __future__ import annotations

import torpor_pvh.plugin
from torpor.model import SuspendMethod
from torpor.plugins import get_plugin_manager
from torpor.testing import Capability, ConformanceSuite


class TestPvhConformance(ConformanceSuite):
    guest_kind = "pvh"
    plugins = (torpor_pvh.plugin,)
    capabilities = frozenset({Capability.XENSTORE_HANDSHAKE, Capability.COOPERATIVE_RESUME})
    suspend_method = SuspendMethod.XENSTORE


def test_found_through_its_entry_point() -> None:
    pm = get_plugin_manager()
    assert pm.get_plugin("pvh") is torpor_pvh.plugin

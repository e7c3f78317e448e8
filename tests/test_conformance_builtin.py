"""The conformance suite, run against each built-in guest-type plugin."""

from __future__ import annotations

import shutil

import pytest

import torpor_hvm.plugin
import torpor_pv.plugin
import torpor_pvhvm.plugin
from torpor.model import SuspendMethod
from torpor.testing import Capability, ConformanceSuite


class TestPvConformance(ConformanceSuite):
    guest_kind = "pv"
    plugins = (torpor_pv.plugin,)
    entry_point = "pv"
    suspend_method = SuspendMethod.XENSTORE


class TestPvhvmConformance(ConformanceSuite):
    guest_kind = "pvhvm"
    plugins = (torpor_pvhvm.plugin,)
    entry_point = "pvhvm"
    suspend_method = SuspendMethod.XENSTORE


class TestHvmConformance(ConformanceSuite):
    guest_kind = "hvm"
    plugins = (torpor_hvm.plugin,)
    entry_point = "hvm"
    # Declared as well as read from its GuestType: the two must agree.
    capabilities = frozenset(
        {
            Capability.ACPI_S3,
            Capability.DEVICE_MODEL,
            Capability.HARD_SUSPEND,
            Capability.COOPERATIVE_RESUME,
            Capability.INPLACE_NONCOOPERATIVE,
        }
    )
    suspend_method = SuspendMethod.ACPI_S3
    use_qemu = False  # the real-QEMU runs are tests/test_orchestrator_hvm.py's


@pytest.mark.qemu
@pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
)
class TestHvmConformanceOnQemu(TestHvmConformance):
    """The HVM guest type again, its device model a real QEMU running the boot-sector guest."""

    use_qemu = True
    device_model_timeout = 5.0  # QMP to a QEMU under TCG, on a machine that may be busy

"""torpor's conformance suite for the HVM guest type, with this plugin loaded.

The suite's guests include some without an agent (``lose_xenstore``, the hard
suspend test), which the protocol suspends the hard way; with
``require_agent=True`` the plugin would veto those suspends -- its documented
refusal, tested in test_fsfreeze.py -- so the suite runs it with
``require_agent=False``.  The suite's HVM guests sleep in S3, which the plugin
leaves unfrozen (qemu-ga refuses ``guest-suspend-ram`` once frozen): what the
suite proves here is that loading the plugin changes nothing the protocol
promises, every thaw check after every resume included.
"""

from __future__ import annotations

import torpor_hvm.plugin
from torpor.model import SuspendMethod
from torpor.testing import ConformanceSuite
from torpor_fsfreeze import FsFreeze


class TestHvmWithFsfreezeConformance(ConformanceSuite):
    guest_kind = "hvm"
    plugins = (torpor_hvm.plugin, FsFreeze(require_agent=False))
    # What the HVM type can do comes from its GuestType; this plugin adds none.
    # Its entry point registers an instance configured from the environment
    # (TORPOR_FSFREEZE), not this one: tests/test_fsfreeze.py checks it.
    entry_point = False
    suspend_method = SuspendMethod.ACPI_S3
    use_qemu = False

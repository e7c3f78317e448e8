"""The conformance suite fails a plugin for the right reasons (issue 6's check).

A plugin author's test module is written to a temporary folder -- a PVH
plugin and a subclass of ``ConformanceSuite``, exactly as the docs show -- and
run by a separate ``pytest``.  The correct plugin passes; each mutant (one
lie or bug a plugin author could make) fails the suite tests that guard
against it, with the error that says why, and nothing else fails.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

PLUGIN = """
from torpor import hookimpl
from torpor.model import X86_EMU_LAPIC, GuestType, SuspendMethod, Verdict
from torpor.testing import Capability, ConformanceSuite

MUTANT = {mutant!r}

GUEST_TYPE = GuestType(
    name="pvh-typo" if MUTANT == "wrong_name" else "pvh",
    plugin="pvh",
    xenstore_handshake=True,
    event_channel=False,
    device_model=False,
    acpi_s3=False,
    cooperative_resume=True,
    survives_inplace_noncooperative=MUTANT == "claims_inplace_fast0_is_safe",
)


class PvhPlugin:
    @hookimpl
    def torpor_classify_domain(self, domain, host):
        lapic_only = domain.emulation_flags == X86_EMU_LAPIC
        if MUTANT == "claims_nothing":
            lapic_only = domain.emulation_flags == 0  # PVH read as "no emulation at all"
        if domain.hvm and lapic_only:
            return GUEST_TYPE
        return None

    @hookimpl
    async def torpor_check_resumed(self, ctx):
        if MUTANT == "never_satisfied" and ctx.guest_type is GUEST_TYPE:
            return Verdict.fail("running", "frontends did not reconnect (a broken check)")
        return None


CAPS = {{Capability.XENSTORE_HANDSHAKE, Capability.COOPERATIVE_RESUME}}
if MUTANT == "claims_inplace_fast0_is_safe":
    CAPS.add(Capability.INPLACE_NONCOOPERATIVE)


class TestPvh(ConformanceSuite):
    guest_kind = "pvh"
    plugins = (PvhPlugin(),)
    capabilities = frozenset(CAPS)
    suspend_method = SuspendMethod.XENSTORE
"""

#: The suite tests these checks run (the whole suite for the correct plugin
#: is run by examples/torpor-pvh); enough to see each mutant caught.
SELECTED = (
    "test_classified_as_its_guest_type or test_suspend_then_cooperative_resume"
    " or test_inplace_noncooperative_resume_refused_unless_safe or test_checkpoint_repeatedly"
)


def run_suite(tmp_path: Path, mutant: str) -> dict[str, str]:
    """Run the selected suite tests against the plugin; {test name: failure text or ''}."""
    (tmp_path / "test_pvh_plugin.py").write_text(textwrap.dedent(PLUGIN.format(mutant=mutant)))
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", SELECTED,
         f"--junitxml={junit}", "test_pvh_plugin.py"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert junit.exists(), proc.stdout + proc.stderr
    out: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        out[case.attrib["name"]] = "" if failure is None else failure.attrib.get("message", "?")
    assert len(out) == 4, proc.stdout
    return out


def test_the_correct_plugin_passes(tmp_path: Path) -> None:
    assert run_suite(tmp_path, "none") == dict.fromkeys(
        [
            "test_classified_as_its_guest_type",
            "test_suspend_then_cooperative_resume",
            "test_inplace_noncooperative_resume_refused_unless_safe",
            "test_checkpoint_repeatedly",
        ],
        "",
    )


@pytest.mark.parametrize(
    ("mutant", "failing", "why"),
    [
        # Says Linux survives an in-place fast=0 resume: the guest panics.
        (
            "claims_inplace_fast0_is_safe",
            {"test_inplace_noncooperative_resume_refused_unless_safe"},
            "ResumeFailed",
        ),
        # Names its guest type wrongly: classification and results disagree.
        (
            "wrong_name",
            {"test_classified_as_its_guest_type", "test_suspend_then_cooperative_resume"},
            "pvh-typo",
        ),
        # Claims no PVH domain: nothing can be suspended.
        (
            "claims_nothing",
            {
                "test_classified_as_its_guest_type",
                "test_suspend_then_cooperative_resume",
                "test_inplace_noncooperative_resume_refused_unless_safe",
                "test_checkpoint_repeatedly",
            },
            "",  # each for its own reason: checked below
        ),
        # A resume check that never accepts a running guest.
        (
            "never_satisfied",
            {
                "test_suspend_then_cooperative_resume",
                "test_inplace_noncooperative_resume_refused_unless_safe",
                "test_checkpoint_repeatedly",
            },
            "ResumeFailed",
        ),
    ],
)
def test_a_broken_plugin_fails_the_tests_that_guard_against_it(
    tmp_path: Path, mutant: str, failing: set[str], why: str
) -> None:
    outcome = run_suite(tmp_path, mutant)
    assert {name for name, failure in outcome.items() if failure} == failing, outcome
    for name in failing:
        reason = why or (
            "'?' == 'pvh'" if name == "test_classified_as_its_guest_type" else "UnsupportedGuest"
        )
        assert reason in outcome[name], (name, outcome[name])


def test_the_pytest_plugin_is_light() -> None:
    """pytest loads torpor's plugin in every session wherever torpor is
    installed: it must not load the suite, the simulator or the orchestrator."""
    code = (
        "import sys; import torpor.testing.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.startswith('torpor')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == str(
        ["torpor", "torpor.hookspecs", "torpor.testing", "torpor.testing.pytest_plugin"]
    )

"""Live migration on simulated hosts: precopy rounds while the guest runs, then
the stop-and-copy (issue 15).

What must hold: the guest keeps its memory (every page it wrote, checked
word by word), its tick counter and its boot; its own downtime (the gap it
saw) is within what torpor measured; the precopy policy is libxl's and
bounds a guest that never converges; where the hypervisor cannot track the
guest's dirty pages it migrates non-live, saying why, and ``live=True`` is
refused with the guest untouched; and every failure leaves one copy running.
"""

from __future__ import annotations

import io
import shutil
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from torpor.errors import ImageError, LiveUnavailable, MigrationFailed, Vetoed
from torpor.facade import Torpor
from torpor.hookspecs import hookimpl
from torpor.image import PAGE_SIZE, RecordType, StreamWriter, decode
from torpor.livesave import PrecopyTracker
from torpor.model import PrecopyPolicy, PrecopyRound, PrecopyStats
from torpor.plugins import get_plugin_manager
from torpor_sim.guest import Behaviour
from torpor_sim.host import SimHost

KINDS = ("pv", "pvhvm", "pvh")


@pytest.fixture
def dest_host() -> Iterator[SimHost]:
    d = tempfile.mkdtemp(prefix="tl", dir="/tmp")
    host = SimHost(d, qemu=False, name="destination")
    host.start()
    host.create_guest("pv", name="destination-guest")  # domids differ from the source's
    yield host
    host.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def dest(dest_host: SimHost) -> Iterator[Torpor]:
    t = Torpor(dest_host.toolstack_host(), own_host=True)
    yield t
    t.close()


@pytest.fixture
def plain_host() -> Iterator[SimHost]:
    """A hypervisor without shadow paging, as Debian's Xen 4.17."""
    d = tempfile.mkdtemp(prefix="tn", dir="/tmp")
    host = SimHost(d, qemu=False, name="no-shadow", shadow=False)
    host.start()
    yield host
    host.stop()
    shutil.rmtree(d, ignore_errors=True)


def report(host: SimHost, domid: int) -> dict[str, Any]:
    return host.run(host.guest_report(domid))


def guests_running(host: SimHost) -> list[int]:
    return [d for d in sorted(host.guests) if host.xen.domain_info(d).running]


def never_stopped(
    error: MigrationFailed, host: SimHost, domid: int, dest_host: SimHost, before: list[int]
) -> None:
    """A migration that failed before the stop-and-copy: the guest was never
    suspended and runs here, log-dirty off again, nothing built there."""
    assert error.state == "running"
    counters = report(host, domid)["counters"]
    assert counters["suspends"] == 0 and counters["cooperative_resumes"] == 0
    assert host.xen.domains[domid].logdirty is None
    assert sorted(dest_host.xen.domains) == before
    assert guests_running(host) == [domid]


class Rounds:
    """A plugin recording the precopy rounds (and what the source's QEMU was told)."""

    def __init__(self, host: SimHost | None = None) -> None:
        self.host = host
        self.rounds: list[PrecopyRound] = []
        self.dm_dirty_log: list[bool] = []

    @hookimpl
    def torpor_precopy_round(self, ctx: Any, precopy: PrecopyRound) -> None:
        self.rounds.append(precopy)
        if self.host is not None and ctx.domid in self.host.device_models:
            self.dm_dirty_log.append(self.host.device_models[ctx.domid].global_dirty_log)


# ---------------------------------------------------------------------------
# the policy, as libxenguest asks it


def test_policy_defaults_are_libxls_simple_precopy_policy() -> None:
    p = PrecopyPolicy()
    assert (p.max_iterations, p.dirty_threshold) == (5, 50)  # SPP_MAX_ITERATIONS, ..._DIRTY_COUNT
    assert p.stop_and_copy(PrecopyStats(0, 0, 49))  # fewer than 50 dirty: stop
    assert not p.stop_and_copy(PrecopyStats(0, 0, 50))
    assert not p.stop_and_copy(PrecopyStats(4, 1000, -1))  # unknown count: go on...
    assert p.stop_and_copy(PrecopyStats(5, 1000, -1))  # ...until the bound
    assert p.why_stopped(PrecopyStats(5, 1000, 3000)) == "iteration bound"
    assert p.why_stopped(PrecopyStats(2, 1000, 3)) == "converged"
    for bad in ({"max_iterations": 0}, {"max_iterations": 1001}, {"dirty_threshold": -1}):
        with pytest.raises(ValueError):
            PrecopyPolicy(**bad)


def test_tracker_reports_each_round_once_its_dirty_count_is_known() -> None:
    now = [0.0]
    seen: list[PrecopyRound] = []
    t = PrecopyTracker(PrecopyPolicy(), seen.append, clock=lambda: now[0])
    # libxenguest's questions for a guest of 1000 pages that converges in 3 rounds
    for stats, stop in (
        (PrecopyStats(0, 0, 1000), False),
        (PrecopyStats(1, 1000, -1), False),
        (PrecopyStats(1, 1000, 400), False),
        (PrecopyStats(2, 1400, -1), False),
        (PrecopyStats(2, 1400, 30), True),
    ):
        now[0] += 1.0
        assert t(stats) is stop
    t.stopping()  # the 30 pages go while the guest runs; then the suspend
    assert [(r.iteration, r.pages, r.total_pages, r.dirty) for r in seen] == [
        (1, 1000, 1000, 400),
        (2, 400, 1400, 30),
        (3, 30, 1430, -1),
    ]
    assert t.stopped == "converged"
    assert seen[0].dirty_rate == pytest.approx(400 / 2.0)  # two ticks since the start


# ---------------------------------------------------------------------------
# the migration


@pytest.mark.parametrize("kind", KINDS)
def test_live_migration_keeps_the_guest_whole(
    sim_host: SimHost, dest_host: SimHost, torpor: Torpor, dest: Torpor, kind: str
) -> None:
    domid = sim_host.create_guest(kind, behaviour=Behaviour(dirty_rate=2000, dirty_pages=128))
    before = report(sim_host, domid)["counters"]
    res = torpor.migrate(domid, dest, live=True)
    details = dict(res.details)
    assert res.outcome == "migrated" and res.state == "running"
    assert details["live"] is True and details["source_domid"] == domid
    assert domid not in sim_host.xen.domains  # the source is gone, after the copy ran
    after = report(dest_host, res.domid)
    assert after["last_hypercall_return"] == 0  # a new domain: the full rebuild path
    # What arrived is what the guest found when it ran again, and every word the
    # guest (its ticks and its dirtier) wrote is where it belongs.
    assert after["checksum_at_resume"] == details["memory_checksum"]
    assert after["memory_consistent"] is True
    counters = after["counters"]
    assert counters["ticks"] >= before["ticks"] and counters["boots"] == before["boots"] == 1
    assert counters["new_domain_resumes"] == 1 and counters["suspends"] == 1
    assert counters["dirty_writes"] >= before["dirty_writes"] and counters["dirty_writes"] > 0
    assert after["frontends"] == {"vif/0": 4, "vbd/51712": 4}
    # The guest's own downtime (the gap in its timeline) is within torpor's.
    assert 0 < counters["last_gap_ns"] / 1e9 <= details["downtime"]
    assert details["rounds"] and details["precopy"] in ("converged", "iteration bound")
    assert details["precopy_pages"] >= 128 + 16  # round 1 sent every page


def test_rounds_reach_the_hook_in_order_and_agree_with_the_result(
    sim_host: SimHost, dest: Torpor
) -> None:
    rec = Rounds(sim_host)
    domid = sim_host.create_guest("pvhvm", behaviour=Behaviour(dirty_rate=3000, dirty_pages=256))
    with Torpor(
        sim_host.toolstack_host(), own_host=True, plugin_manager=get_plugin_manager(plugins=[rec])
    ) as t:
        res = t.migrate(domid, dest)
    details = dict(res.details)
    assert [r.to_dict() for r in rec.rounds] == details["rounds"]
    assert [r.iteration for r in rec.rounds] == list(range(1, len(rec.rounds) + 1))
    assert rec.rounds[0].pages == 256 + 16  # every page first
    # libxl's switch_qemu_logdirty: QEMU logged dirty pages while precopy ran.
    assert rec.dm_dirty_log and all(rec.dm_dirty_log)


def test_a_guest_dirtying_faster_than_precopy_copies_stops_at_the_bound_and_says_so(
    sim_host: SimHost, dest_host: SimHost, torpor: Torpor, dest: Torpor
) -> None:
    # 10^7 pages/s over 200 pages: every round finds the whole region dirty again.
    domid = sim_host.create_guest("pv", behaviour=Behaviour(dirty_rate=1e7, dirty_pages=200))
    res = torpor.migrate(domid, dest, precopy=PrecopyPolicy(max_iterations=3))
    details = dict(res.details)
    assert details["precopy"] == "iteration bound"
    assert [r["iteration"] for r in details["rounds"]] == [1, 2, 3]
    assert all(r["dirty"] >= 200 for r in details["rounds"][:-1])  # never under 50
    assert details["final_pages"] >= 200  # the working set went with the guest stopped
    assert report(dest_host, res.domid)["memory_consistent"] is True
    line = __import__("torpor.progress", fromlist=["describe"]).describe(res)
    assert "did not converge, stopped at the iteration bound" in line


def test_precopy_bounds_the_downtime_to_the_working_set_not_the_memory(
    sim_host: SimHost, dest_host: SimHost, torpor: Torpor, dest: Torpor
) -> None:
    """A big guest that keeps rewriting a small region: live, only that region
    (and its tick work) is sent while it is stopped; non-live, all of it."""
    beh = Behaviour(dirty_rate=1e7, dirty_pages=64)
    live_one = sim_host.create_guest("pv", behaviour=beh, memory_pages=4096)
    res = torpor.migrate(live_one, dest)
    details = dict(res.details)
    assert details["precopy"] == "iteration bound"
    assert 64 <= details["final_pages"] <= 64 + 16
    assert details["precopy_pages"] >= 4096 + 64
    stopped_one = sim_host.create_guest("pv", behaviour=beh, memory_pages=4096, name="other")
    non_live = dict(torpor.migrate(stopped_one, dest, live=False).details)
    assert non_live["live"] is False and non_live["live_refusal"] == "non-live migration requested"
    for domid in (res.domid,):
        assert report(dest_host, domid)["memory_consistent"] is True


def test_a_guest_that_converges_stops_early(
    sim_host: SimHost, torpor: Torpor, dest: Torpor
) -> None:
    domid = sim_host.create_guest("pvh", behaviour=Behaviour(dirty_rate=200, dirty_pages=512))
    details = dict(torpor.migrate(domid, dest).details)
    assert details["precopy"] == "converged"
    known = [r["dirty"] for r in details["rounds"] if r["dirty"] >= 0]
    assert known and known[-1] < 50
    assert details["final_pages"] < 50 + 16


def test_same_host_live_migration_renames_the_copy(sim_host: SimHost, torpor: Torpor) -> None:
    domid = sim_host.create_guest("pv", name="web")
    res = torpor.migrate(domid, torpor, live=True)
    assert dict(res.details)["live"] is True
    assert domid not in sim_host.xen.domains
    xs = sim_host.toolstack_host().xenstore
    try:
        assert xs.read(f"/local/domain/{res.domid}/name") == "web"
    finally:
        xs.close()


# ---------------------------------------------------------------------------
# when the hypervisor cannot track the guest's dirty pages


def test_pv_without_shadow_paging_migrates_non_live_and_says_why(
    plain_host: SimHost, dest_host: SimHost, dest: Torpor
) -> None:
    assert "shadow" not in plain_host.xen.virt_caps
    pv = plain_host.create_guest("pv")
    pvh = plain_host.create_guest("pvh")
    with Torpor(plain_host.toolstack_host(), own_host=True) as t:
        res = t.migrate(pv, dest)
        other = t.migrate(pvh, dest)  # HAP log-dirty: live there
    details = dict(res.details)
    assert details["live"] is False and "shadow paging" in details["live_refusal"]
    assert [str(p.phase) for p in res.timings][:2] == ["validate", "request"]
    assert report(dest_host, res.domid)["memory_consistent"] is True
    assert dict(other.details)["live"] is True


def test_live_demanded_without_shadow_paging_is_refused_untouched(
    plain_host: SimHost, dest_host: SimHost, dest: Torpor
) -> None:
    domid = plain_host.create_guest("pv")
    before = sorted(dest_host.xen.domains)
    with (
        Torpor(plain_host.toolstack_host(), own_host=True) as t,
        pytest.raises(LiveUnavailable) as e,
    ):
        t.migrate(domid, dest, live=True)
    assert "shadow paging" in e.value.reason and e.value.state == "running"
    assert plain_host.xen.domain_info(domid).running
    assert report(plain_host, domid)["counters"]["suspends"] == 0  # never asked
    assert plain_host.xen.domains[domid].logdirty is None
    assert sorted(dest_host.xen.domains) == before
    assert e.value.to_dict()["reason"] == e.value.reason


def test_logdirty_of_a_pv_guest_without_shadow_is_eopnotsupp(plain_host: SimHost) -> None:
    import errno

    from torpor.errors import HypervisorError

    domid = plain_host.create_guest("pv")
    with pytest.raises(HypervisorError) as e:
        plain_host.xen.logdirty_enable(domid)
    assert e.value.errno == errno.EOPNOTSUPP


def test_a_simulated_plain_hvm_guest_migrates_non_live(
    sim_host: SimHost, dest_host: SimHost, torpor: Torpor, dest: Torpor
) -> None:
    domid = sim_host.create_guest("hvm")
    with pytest.raises(LiveUnavailable, match="QEMU"):
        torpor.migrate(domid, dest, live=True)
    assert sim_host.xen.domain_info(domid).running
    res = torpor.migrate(domid, dest)
    assert dict(res.details)["live"] is False and res.state == "running"


# ---------------------------------------------------------------------------
# failures: one copy runs, always


def test_stream_cut_during_precopy_leaves_the_guest_never_stopped(
    sim_host: SimHost,
    dest_host: SimHost,
    torpor: Torpor,
    dest: Torpor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    domid = sim_host.create_guest("pv", behaviour=Behaviour(dirty_rate=5000, dirty_pages=256))
    real = dest.host.builder.incoming  # type: ignore[union-attr]

    def cut() -> Any:
        incoming = real()
        sent = [0]
        original = incoming._write

        def write(data: bytes) -> None:
            sent[0] += len(data)
            if sent[0] > 64 * 1024:
                raise OSError(32, "Broken pipe")  # the connection dropped
            original(data)

        incoming._write = write
        incoming._chunk = 4096
        return incoming

    monkeypatch.setattr(dest.host.builder, "incoming", cut)
    before = sorted(dest_host.xen.domains)
    with pytest.raises(MigrationFailed, match="never suspended") as e:
        torpor.migrate(domid, dest)
    never_stopped(e.value, sim_host, domid, dest_host, before)


def test_destination_failing_after_the_suspend_resumes_the_source(
    sim_host: SimHost,
    dest_host: SimHost,
    torpor: Torpor,
    dest: Torpor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    domid = sim_host.create_guest("pvhvm")

    def refuse(saved: Any) -> int:
        raise ImageError("destination refused the guest (no room)")

    monkeypatch.setattr(dest.host.builder, "restore", refuse)
    before = sorted(dest_host.xen.domains)
    with pytest.raises(MigrationFailed, match="no room") as e:
        torpor.migrate(domid, dest, live=True)
    assert e.value.state == "running"
    assert report(sim_host, domid)["counters"]["cooperative_resumes"] == 1
    assert sorted(dest_host.xen.domains) == before
    assert guests_running(sim_host) == [domid]


def test_a_veto_at_the_stop_and_copy_leaves_the_guest_running(
    sim_host: SimHost, dest_host: SimHost, dest: Torpor
) -> None:
    class No:
        @hookimpl
        def torpor_veto_suspend(self, ctx: Any) -> str:
            return "not now"

    domid = sim_host.create_guest("pv")
    before = sorted(dest_host.xen.domains)
    with (
        Torpor(
            sim_host.toolstack_host(),
            own_host=True,
            plugin_manager=get_plugin_manager(plugins=[No()]),
        ) as t,
        pytest.raises(Vetoed),
    ):
        t.migrate(domid, dest)
    assert sim_host.xen.domain_info(domid).running
    assert report(sim_host, domid)["counters"]["suspends"] == 0
    assert sorted(dest_host.xen.domains) == before


# ---------------------------------------------------------------------------
# the stream's PAGE_DATA records


def _stream(*records: tuple[RecordType, bytes]) -> bytes:
    out = io.BytesIO()
    w = StreamWriter(out.write)
    for rtype, body in records:
        w.record(rtype, body)
    w.end()
    return out.getvalue()


def _pages(pfns: list[int], fill: int = 7) -> bytes:
    return struct.pack(f"<II{len(pfns)}Q", len(pfns), 0, *pfns) + bytes([fill]) * (
        PAGE_SIZE * len(pfns)
    )


DOMAIN = (RecordType.DOMAIN, b'{"kind": "pv", "memory_pages": 4}')
VCPUS = (RecordType.VCPUS, b"[]")


def test_page_data_builds_memory_later_pages_replacing_earlier() -> None:
    saved = decode(
        io.BytesIO(
            _stream(
                DOMAIN,
                (RecordType.PAGE_DATA, _pages([0, 1, 2, 3], 1)),
                (RecordType.PAGE_DATA, _pages([2], 9)),
                VCPUS,
            )
        )
    )
    assert saved.memory == bytes([1]) * (2 * PAGE_SIZE) + bytes([9]) * PAGE_SIZE + bytes([1]) * (
        PAGE_SIZE
    )


@pytest.mark.parametrize(
    ("records", "match"),
    [
        (((RecordType.PAGE_DATA, _pages([0])), DOMAIN, VCPUS), "before the DOMAIN"),
        ((DOMAIN, (RecordType.PAGE_DATA, _pages([4])), VCPUS), "beyond the guest's 4 pages"),
        ((DOMAIN, (RecordType.PAGE_DATA, _pages([0])[:-1]), VCPUS), "cannot hold 1 pages"),
        ((DOMAIN, (RecordType.PAGE_DATA, b"\x01"), VCPUS), "shorter than its header"),
        (
            (DOMAIN, (RecordType.PAGE_DATA, _pages([0])), (RecordType.MEMORY, b""), VCPUS),
            "MEMORY record in a stream",
        ),
        (
            ((RecordType.DOMAIN, b'{"kind": "pv"}'), (RecordType.PAGE_DATA, _pages([0])), VCPUS),
            "memory_pages",
        ),
    ],
)
def test_bad_page_data_is_refused(records: Any, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        decode(io.BytesIO(_stream(*records)))


def test_the_stop_and_copy_asks_the_device_model_only_what_libxl_asks(
    sim_host: SimHost, dest: Torpor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the guest is stopped every round trip is downtime: libxl sends QEMU
    # `stop` and `xen-save-devices-state`, then libxenguest's cleanup turns QEMU's
    # log-dirty off -- nothing else.  What torpor must know of the device model
    # (its commands) it asks while the guest still runs.
    from torpor.qmp import QmpClient

    domid = sim_host.create_guest("pvhvm", behaviour=Behaviour(dirty_rate=2000, dirty_pages=64))
    asked: list[tuple[str, bool]] = []
    execute = QmpClient.execute

    async def spy(self: QmpClient, cmd: str, *args: Any, **kwargs: Any) -> Any:
        if self.domid == domid:
            asked.append((cmd, sim_host.xen.domain_info(domid).suspended))
        return await execute(self, cmd, *args, **kwargs)

    monkeypatch.setattr(QmpClient, "execute", spy)
    with Torpor(sim_host.toolstack_host(), own_host=True) as t:
        res = t.migrate(domid, dest, live=True)
    assert res.outcome == "migrated"
    while_running = [cmd for cmd, suspended in asked if not suspended]
    while_stopped = [cmd for cmd, suspended in asked if suspended]
    assert "query-commands" in while_running and while_running.count("query-commands") == 1
    assert while_stopped == ["stop", "xen-save-devices-state", "xen-set-global-dirty-log"]


def test_a_device_model_silent_at_precopy_start_fails_the_migration_never_stopped(
    sim_host: SimHost,
    dest_host: SimHost,
    torpor: Torpor,
    dest: Torpor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # QEMU is asked its commands, then to log dirty pages, as precopy starts: a
    # device model that does not answer fails the migration there, the guest
    # untouched and QEMU's log-dirty never switched on.
    from torpor.errors import Timeout
    from torpor.qmp import QmpClient

    domid = sim_host.create_guest("pvhvm")
    execute = QmpClient.execute

    async def silent(self: QmpClient, cmd: str, *args: Any, **kwargs: Any) -> Any:
        if self.domid == domid and cmd == "query-commands":
            raise Timeout(f"QMP {cmd}: no reply from domain {domid}'s device model", domid=domid)
        return await execute(self, cmd, *args, **kwargs)

    monkeypatch.setattr(QmpClient, "execute", silent)
    before = sorted(dest_host.xen.domains)
    with pytest.raises(MigrationFailed, match="never suspended") as e:
        torpor.migrate(domid, dest)
    assert isinstance(e.value.cause, Timeout)
    assert "QMP query-commands: no reply from domain" in e.value.message
    never_stopped(e.value, sim_host, domid, dest_host, before)
    assert not sim_host.device_models[domid].global_dirty_log  # QEMU's too

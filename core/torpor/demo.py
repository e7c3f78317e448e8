"""``torpor demo``: the whole protocol on an embedded simulated host, in seconds.

Starts a simulated Xen host in this process with a PV, a PVHVM and an HVM
guest (the HVM guest's device model is a real QEMU when one is installed),
then, showing every phase as it happens:

1. suspends and cooperatively resumes each guest (xenstore handshake for PV
   and PVHVM, ACPI S3 through the guest agent for HVM);
2. checkpoints the PV guest a few times;
3. asks for an in-place non-cooperative resume and shows torpor refusing it,
   with the reason;
4. migrates the PVHVM guest -- which dirties its memory as it runs -- *live*
   to a second simulated host: precopy rounds copy its memory while it runs,
   then it is suspended and what it dirtied meanwhile copied; it resumes
   non-cooperatively in a new domain (its hypercall returns 0, it rebuilds and
   its frontends reconnect to the new host's backends), and the downtime is
   shown as torpor measured it and as the guest saw it (the gap in its own
   timeline);

and ends with a table: guest type, method, timings and the integrity check --
the guest's counter kept going (it was not rebooted) and its memory checksum
when it came back equals the checksum taken while it was suspended.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from typing import Any

import attrs

from torpor.context import OperationContext
from torpor.errors import TorporError, UnsafeResume
from torpor.facade import Torpor
from torpor.hookspecs import hookimpl
from torpor.model import Phase, PrecopyRound, Result
from torpor.plugins import get_plugin_manager

__all__ = ["run_demo"]


class _PhasePrinter:
    """Prints each phase as it ends (a lifecycle-hook plugin, as a toolstack would write)."""

    def __init__(self, out: Any, enabled: bool) -> None:
        self.out = out
        self.enabled = enabled

    @hookimpl
    def torpor_phase_finished(
        self, ctx: OperationContext, phase: Phase, seconds: float, error: TorporError | None
    ) -> None:
        if not self.enabled:
            return
        mark = "FAILED" if error is not None else "ok"
        print(
            f"    {ctx.guest_type_name:<6} dom{ctx.domid} {ctx.operation:<9} "
            f"{phase!s:<21} {seconds * 1000:8.2f} ms  {mark}",
            file=self.out,
            flush=True,
        )

    @hookimpl
    def torpor_precopy_round(self, ctx: OperationContext, precopy: PrecopyRound) -> None:
        if not self.enabled:
            return
        dirty = (
            f"{precopy.dirty} dirtied meanwhile"
            if precopy.dirty >= 0
            else "the rest after the suspend"
        )
        print(
            f"    {ctx.guest_type_name:<6} dom{ctx.domid} {ctx.operation:<9} "
            f"  round {precopy.iteration}: {precopy.pages:5d} pages sent, {dirty}",
            file=self.out,
            flush=True,
        )


@attrs.frozen
class _Row:
    domid: int
    kind: str
    device_model: str | None
    method: str
    suspend_ms: float
    resume_ms: float
    ticks_before: int
    ticks_frozen: int
    ticks_after: int
    boots_same: bool
    checksum_equal: bool

    @property
    def ok(self) -> bool:
        return (
            self.boots_same
            and self.checksum_equal
            and self.ticks_after > self.ticks_frozen >= self.ticks_before
        )


def run_demo(*, json_output: bool = False, qemu: bool | None = None) -> int:
    """Run the demo; 0 if every integrity check held."""
    from torpor.host import sim_module

    SimHost = sim_module("host").SimHost
    qemu_binary = sim_module("qemu").qemu_binary

    out = sys.stdout

    def say(*parts: object) -> None:
        if not json_output:
            print(*parts, file=out, flush=True)

    t_start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="torpor-demo-", dir="/tmp")
    use_qemu = qemu is not False and qemu_binary() is not None
    host = SimHost(workdir, qemu=use_qemu, name="demo")
    second = SimHost(workdir + "/second", qemu=use_qemu, name="second")
    rows: list[_Row] = []
    records: list[dict[str, Any]] = []
    try:
        host.start()
        say("torpor demo: a simulated Xen host with a PV, a PVHVM and an HVM guest")
        Behaviour = sim_module("guest").Behaviour
        guests = {
            "pv": host.create_guest("pv"),
            # it writes 3000 pages a second over 512: precopy has work to do
            "pvhvm": host.create_guest(
                "pvhvm", behaviour=Behaviour(dirty_rate=3000, dirty_pages=512)
            ),
            "hvm": host.create_guest("hvm"),
        }
        dm = host.device_models[guests["hvm"]].kind
        where = f"real QEMU ({qemu_binary()})" if dm == "qemu" else "in-process (no QEMU here)"
        say(f"  HVM device model: {where}")
        printer = _PhasePrinter(out, not json_output)
        pm = get_plugin_manager(plugins=[printer])
        with Torpor(host.toolstack_host(), own_host=True, plugin_manager=pm) as t:
            # Let the guests run a little: their counters must visibly advance.
            for domid in guests.values():
                _settle(host, domid)
            say("\n1. suspend, then cooperative resume, each guest")
            for kind, domid in guests.items():
                row, recs = _cycle(host, t, kind, domid, say)
                rows.append(row)
                records.extend(recs)
            say("\n2. checkpoint the PV guest 5 times (suspend, callback, cooperative resume)")
            pv = guests["pv"]
            printer.enabled = False  # one line per checkpoint, not per phase
            for i in range(5):
                res = t.checkpoint(pv)
                records.append({**res.to_dict(), "index": i})
                say(
                    f"    checkpoint {i + 1}: {res.seconds * 1000:.2f} ms "
                    f"(suspended {sum(x.seconds for x in res.timings[:4]) * 1000:.2f} ms via "
                    f"{res.method})"
                )
            printer.enabled = not json_output
            say("\n3. an in-place non-cooperative resume (fast=0 in the same domain)")
            t.suspend(pv)
            try:
                t.resume(pv, cooperative=False)
                refused = "not refused"
            except UnsafeResume as e:
                refused = e.message
                say(f"  refused, nothing touched: {e.message}")
                records.append({"domid": pv, "operation": "resume", "ok": False, **e.to_dict()})
            t.resume(pv)
            say("\n4. migrate the PVHVM guest live to a second simulated host")
            second.start()
            second.create_guest("pv")  # the new host has guests of its own
            with Torpor(second.toolstack_host(), own_host=True, plugin_manager=pm) as t2:
                row, rec = _migrate(host, second, t, t2, guests["pvhvm"], say=say)
                rows.append(row)
                records.append(rec)
        _table(rows, say)
        elapsed = time.monotonic() - t_start
        ok = all(r.ok for r in rows) and refused != "not refused"
        if json_output:
            for r in records:
                print(json.dumps(r, default=str))
            print(
                json.dumps(
                    {
                        "summary": [attrs.asdict(r) | {"ok": r.ok} for r in rows],
                        "device_model": dm,
                        "seconds": round(elapsed, 3),
                        "ok": ok,
                    }
                )
            )
        say(f"\ndemo {'passed' if ok else 'FAILED'} in {elapsed:.1f} s")
        return 0 if ok else 3
    finally:
        second.stop()
        host.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _settle(host: Any, domid: int, ticks: int = 5, timeout: float = 10.0) -> None:
    """Let a fresh guest run until its counter shows a few ticks (bounded)."""
    deadline = time.monotonic() + timeout
    while host.run(host.guest_report(domid))["counters"]["ticks"] < ticks:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)  # the guest's work advances with time; nothing to wait on


def _cycle(host: Any, t: Torpor, kind: str, domid: int, say: Any) -> tuple[_Row, list[Any]]:
    before = host.run(host.guest_report(domid))
    say(f"  {kind} guest dom{domid}: counter at {before['counters']['ticks']}")
    suspended: Result = t.suspend(domid)
    frozen = host.run(host.guest_report(domid))
    say(
        f"  {kind} guest dom{domid}: {suspended.outcome} via {suspended.method}, "
        f"state {frozen['state']}, counter frozen at {frozen['counters']['ticks']}"
    )
    resumed: Result = t.resume(domid)
    _settle(host, domid, frozen["counters"]["ticks"] + 2)
    after = host.run(host.guest_report(domid))
    row = _Row(
        domid=domid,
        kind=kind,
        device_model=host.device_models[domid].kind if domid in host.device_models else None,
        method=str(suspended.method),
        suspend_ms=suspended.seconds * 1000,
        resume_ms=resumed.seconds * 1000,
        ticks_before=before["counters"]["ticks"],
        ticks_frozen=frozen["counters"]["ticks"],
        ticks_after=after["counters"]["ticks"],
        boots_same=after["counters"]["boots"] == before["counters"]["boots"],
        checksum_equal=after["checksum_at_resume"] == frozen["checksum"],
    )
    return row, [suspended.to_dict(), resumed.to_dict()]


def _migrate(
    src: Any, dst: Any, t: Torpor, t2: Torpor, domid: int, *, say: Any
) -> tuple[_Row, dict[str, Any]]:
    before = src.run(src.guest_report(domid))
    res = t.migrate(domid, t2)
    details: dict[str, Any] = dict(res.details)
    _settle(dst, res.domid, before["counters"]["ticks"] + 2)
    after = dst.run(dst.guest_report(res.domid))
    say(
        f"  dom{domid} on the first host is now dom{res.domid} on the second: "
        f"{res.state}, hypercall returned {after['last_hypercall_return']}, frontends "
        + ", ".join(f"{k} state {v}" for k, v in after["frontends"].items())
    )
    rounds = details.get("rounds") or []
    say(
        f"  live: {len(rounds)} precopy rounds ({details.get('precopy')}), "
        f"{details.get('precopy_pages')} pages sent while it ran, "
        f"{details.get('final_pages')} after the suspend; downtime "
        f"{float(details['downtime']) * 1000:.1f} ms as torpor measured it, "
        f"{after['counters']['last_gap_ns'] / 1e6:.1f} ms as the guest saw it"
    )
    row = _Row(
        domid=res.domid,
        kind="pvhvm->",
        device_model="in-process",
        method=str(res.method),
        suspend_ms=float(details["downtime"]) * 1000,
        resume_ms=sum(
            x.seconds
            for x in res.timings
            if x.phase in (Phase.RESTORE, Phase.RESUME, Phase.XS_RESUME, Phase.VERIFY)
        )
        * 1000,
        ticks_before=before["counters"]["ticks"],
        ticks_frozen=before["counters"]["ticks"],
        ticks_after=after["counters"]["ticks"],
        boots_same=after["counters"]["boots"] == before["counters"]["boots"],
        checksum_equal=after["checksum_at_resume"] == details["memory_checksum"],
    )
    return row, res.to_dict()


def _table(rows: list[_Row], say: Any) -> None:
    say("\nsummary")
    say(
        f"  {'guest':<8} {'dom':>3} {'method':<14} {'suspend':>9} {'resume':>9}  "
        f"{'counter (before / frozen / after)':<34} {'checksum':<9} result"
    )
    for r in rows:
        counter = f"{r.ticks_before} / {r.ticks_frozen} / {r.ticks_after}"
        say(
            f"  {r.kind:<8} {r.domid:>3} {r.method:<14} {r.suspend_ms:7.2f}ms {r.resume_ms:7.2f}ms"
            f"  {counter:<34} {'equal' if r.checksum_equal else 'DIFFERS':<9} "
            f"{'ok' if r.ok else 'FAILED'}"
        )

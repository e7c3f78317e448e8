"""Where torpor's fixed cost per operation goes: what `make bench` reports as the profile.

Against a ``torpor sim`` daemon (xenstored and the hypervisor in another
process, as in a dom0), one simulated PV guest, suspend + cooperative resume
cycles through the synchronous facade:

* requests per cycle: every xenstore request torpor sends, by wire operation,
  and every hypervisor call, by name -- counted by wrapping the two adapters'
  send paths (``Xenstore._submit``, ``RemoteHypervisor.call``), with and
  without intent records;
* the profile: cProfile over the cycles on torpor's loop thread and the
  caller's (``threading.setprofile`` is not needed: the facade's loop thread
  is profiled by enabling a profiler inside it), the top functions by own time.

These are the numbers behind the "what the profile shows" lines of
docs/performance.md; nothing here is timed against a target.
"""

from __future__ import annotations

import collections
import cProfile
import io
import pstats
from typing import Any

from torpor.facade import Torpor
from torpor.host import Host
from torpor.hypervisor.remote import RemoteHypervisor
from torpor.xenstore import Xenstore
from torpor_sim import daemon

CYCLES = 200


def _counting(t: Torpor, domid: int, cycles: int) -> dict[str, Any]:
    xs_ops: collections.Counter[str] = collections.Counter()
    hv_ops: collections.Counter[str] = collections.Counter()
    submit, call = Xenstore._submit, RemoteHypervisor.call

    def counted_submit(self: Xenstore, op: Any, *a: Any, **k: Any) -> None:
        xs_ops[op.name] += 1
        submit(self, op, *a, **k)

    def counted_call(self: RemoteHypervisor, op: str, **args: Any) -> Any:
        hv_ops[op] += 1
        return call(self, op, **args)

    Xenstore._submit = counted_submit  # type: ignore[method-assign]
    RemoteHypervisor.call = counted_call  # type: ignore[method-assign]
    try:
        for _ in range(cycles):
            t.suspend(domid)
            t.resume(domid)
    finally:
        Xenstore._submit = submit  # type: ignore[method-assign]
        RemoteHypervisor.call = call  # type: ignore[method-assign]
    return {
        "xenstore_per_cycle": round(sum(xs_ops.values()) / cycles, 2),
        "xenstore_ops": {k: round(v / cycles, 2) for k, v in sorted(xs_ops.items())},
        "hypervisor_per_cycle": round(sum(hv_ops.values()) / cycles, 2),
        "hypervisor_ops": {k: round(v / cycles, 2) for k, v in sorted(hv_ops.items())},
    }


def _profile(t: Torpor, domid: int, cycles: int) -> dict[str, Any]:
    loop_prof = cProfile.Profile()
    caller_prof = cProfile.Profile()

    async def enable() -> None:
        loop_prof.enable()

    async def disable() -> None:
        loop_prof.disable()

    t._run(enable())
    caller_prof.enable()
    for _ in range(cycles):
        t.suspend(domid)
        t.resume(domid)
    caller_prof.disable()
    t._run(disable())
    out: dict[str, Any] = {}
    for name, prof in (("loop_thread", loop_prof), ("caller_thread", caller_prof)):
        stats = pstats.Stats(prof, stream=io.StringIO())
        rows = []
        total = 0.0
        for (file, line, func), (_cc, nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            total += tt
            rows.append(
                (tt, nc, f"{file.rsplit('/', 2)[-1] if '/' in file else file}:{line}:{func}")
            )
        rows.sort(reverse=True)
        out[name] = {
            "own_ms_per_cycle": round(total * 1000 / cycles, 3),
            "top": [
                {
                    "func": f,
                    "calls_per_cycle": round(nc / cycles, 2),
                    "us_per_cycle": round(tt * 1e6 / cycles, 1),
                }
                for tt, nc, f in rows[:15]
            ],
        }
    return out


def test_profile_suspend_resume(short_dir: str, record: Any) -> None:
    (guest,) = daemon.start(short_dir, ["pv"], qemu=False)
    domid = int(guest["domid"])
    try:
        t = Torpor(Host.sim(short_dir), own_host=True)
        lean = Torpor(Host.sim(short_dir), own_host=True, record_intent=False)
        try:
            for _ in range(20):  # warm up: lock files, watches, imports
                t.suspend(domid)
                t.resume(domid)
                lean.suspend(domid)
                lean.resume(domid)
            counts = _counting(t, domid, CYCLES)
            counts_lean = _counting(lean, domid, CYCLES)
            prof = _profile(t, domid, CYCLES)
        finally:
            t.close()
            lean.close()
    finally:
        daemon.stop(short_dir)
    record(
        "profile",
        {"cycles": CYCLES, "with_intent": counts, "without_intent": counts_lean, "profile": prof},
    )
    # Sanity: a cycle is at least the protocol's own requests (write the
    # request, watch/read the ack, XS_RESUME) and one resume hypercall.
    assert counts["xenstore_per_cycle"] >= 3
    assert counts["hypervisor_ops"].get("resume") == 1

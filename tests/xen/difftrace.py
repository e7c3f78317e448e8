"""The differential trace: what one torpor scenario did to a domain, seen from outside.

The same scenario runs on the simulated host and on real Xen (issue 5 item 3);
the two traces must be equal, and where they are not, the simulator is wrong
(real Xen is right by definition).  A trace is recorded by a :class:`Recorder`:

* a xenstore connection of its own (the lab's wire client, not torpor's
  adapter) watching the domain's whole tree and ``@releaseDomain``;
* the domain's state from the hypervisor's raw flags (libxenctrl on real
  Xen, the simulated hypervisor's flags on the sim) -- never from torpor;
* a torpor plugin implementing ``torpor_phase_finished``: at the end of the
  phases where the domain's state is settled it takes a *snapshot*.

It records only what is deterministic on both hosts:

* snapshots (after the phases below, and after each operation): the domain's
  state word and the values of every node under ``control/`` and of
  ``device/suspend/event-channel``.  After ``ack`` the state is left out: a
  guest shuts down within a millisecond of acking, before or after the
  recorder looks;
* per operation: how many watch events fired for each node of the domain's
  tree (each write, transaction commit or removal fires one), how many
  ``@releaseDomain`` events fired (``"0 or 1"`` where real Xen races the
  guest's shutdown against XS_RESUME), and how the operation ended (outcome,
  or error class and the state it says it left).

Nothing here depends on timing: every snapshot first makes a round trip to
xenstored on the recorder's connection, so every watch event of a write that
completed before it has arrived.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

from xenlab import (
    DOMINF_DYING,
    DOMINF_PAUSED,
    DOMINF_SHUTDOWN,
    SHUTDOWN_MASK,
    SHUTDOWN_NAMES,
    SHUTDOWN_SHIFT,
    XsConn,
)

from torpor import Host, Torpor, hookimpl
from torpor.model import Phase, Timeouts
from torpor.plugins import get_plugin_manager

#: phases after which the recorder takes a snapshot
SNAPSHOT_PHASES = (Phase.ACK, Phase.CANCEL, Phase.SHUTDOWN, Phase.VERIFY)
#: phases after which the domain's state is not settled
STATE_RACES = (Phase.ACK,)


def state_word(flags: int | None) -> str:
    """A domain's state from its raw XEN_DOMINF_* flags (None: it does not exist)."""
    if flags is None:
        return "gone"
    if flags & DOMINF_DYING:
        return "dying"
    if flags & DOMINF_SHUTDOWN:
        reason = (flags >> SHUTDOWN_SHIFT) & SHUTDOWN_MASK
        return f"shutdown:{SHUTDOWN_NAMES.get(reason, reason)}"
    if flags & DOMINF_PAUSED:
        return "paused"
    return "running"


class Recorder:
    """Records one domain's trace; register it as a torpor plugin (``plugins=[rec]``).

    :param xenstore: the xenstored socket (dom0's, privileged).
    :param flags_of: domid -> raw domain flags, or None if the domain is gone.
    """

    def __init__(self, xenstore: str, flags_of: Callable[[int], int | None], domid: int) -> None:
        self.xs = XsConn(xenstore)
        self.flags_of = flags_of
        self.domid = domid
        self.dompath = f"/local/domain/{domid}"
        self.xs.watch(self.dompath, "dom")
        self.xs.watch("@releaseDomain", "rel")
        self.mark = self.xs.mark()
        self.entries: list[dict[str, Any]] = []

    def close(self) -> None:
        self.xs.close()

    # -- torpor hook -------------------------------------------------------------

    @hookimpl
    def torpor_phase_finished(
        self, ctx: Any, phase: Phase, seconds: float, error: Exception | None
    ) -> None:
        if ctx.domid == self.domid and phase in SNAPSHOT_PHASES:
            label = f"{ctx.operation} {phase}" + (f" !{type(error).__name__}" if error else "")
            self.snapshot(label, state=phase not in STATE_RACES)

    # -- recording ---------------------------------------------------------------

    def _control(self) -> dict[str, str | None]:
        nodes: dict[str, str | None] = {}
        for name in self.xs.directory(f"{self.dompath}/control") or []:
            nodes[f"control/{name}"] = self.xs.read(f"{self.dompath}/control/{name}")
        nodes["device/suspend/event-channel"] = self.xs.read(
            f"{self.dompath}/device/suspend/event-channel"
        )
        return nodes

    def snapshot(self, label: str, *, state: bool = True) -> None:
        self.xs.read(self.dompath)  # a round trip: earlier writes' events are in
        self.entries.append(
            {
                "at": label,
                "state": state_word(self.flags_of(self.domid)) if state else "(racy)",
                "nodes": self._control(),
            }
        )

    def operation(self, label: str, run: Callable[[], Any], *, release_race: bool = False) -> None:
        """Run one torpor operation and record how it ended and what it fired.

        ``release_race``: the operation ends in a race on real Xen between a
        guest's shutdown and the toolstack's XS_RESUME, so ``@releaseDomain``
        fires once or not at all (both seen in the lab); either is recorded
        as ``"0 or 1"``, any other count as it is.
        """
        self.xs.read(self.dompath)
        start = self.xs.mark()
        try:
            result = run()
        except Exception as e:  # a TorporError is the expected kind; anything else too
            ended: dict[str, Any] = {"error": type(e).__name__, "state": getattr(e, "state", None)}
        else:
            ended = {"outcome": getattr(result, "outcome", None), "state": result.state}
        self.snapshot(f"after {label}")
        events = self.xs.events[start:]
        prefix = self.dompath + "/"
        writes = Counter(
            p.removeprefix(prefix) for p, tok in events if tok == "dom" and p.startswith(prefix)
        )
        released = sum(1 for _, tok in events if tok == "rel")
        self.entries.append(
            {
                "operation": label,
                **ended,
                "xenstore_events": dict(sorted(writes.items())),
                "release_domain_events": (
                    "0 or 1" if release_race and released in (0, 1) else released
                ),
            }
        )


def diff(sim: list[dict[str, Any]], real: list[dict[str, Any]]) -> str:
    """The two traces side by side, entry by entry, differences marked."""
    out = []
    for i in range(max(len(sim), len(real))):
        a = sim[i] if i < len(sim) else None
        b = real[i] if i < len(real) else None
        mark = "  " if a == b else "!!"
        out.append(f"{mark} sim : {json.dumps(a, sort_keys=True)}")
        out.append(f"{mark} real: {json.dumps(b, sort_keys=True)}")
    return "\n".join(out)


# --- the scenario ------------------------------------------------------------------

#: generous enough for a real guest's panic under TCG to be seen (real-xen.md: ~2 s)
TIMEOUTS = Timeouts(settle=30.0)


def run_scenario(
    host: Host,
    rec: Recorder,
    pause: Callable[[bool], None],
    wait_running: Callable[[], None],
) -> list[dict[str, Any]]:
    """The scenario, on any host; returns the recorder's trace."""
    d = rec.domid
    pm = get_plugin_manager(plugins=[rec])
    with Torpor(host, plugin_manager=pm, timeouts=TIMEOUTS) as t:
        rec.snapshot("start")
        pause(True)
        rec.operation("suspend (paused guest)", lambda: t.suspend(d, ack_timeout=2))
        pause(False)
        wait_running()
        rec.snapshot("unpaused")
        rec.operation("suspend", lambda: t.suspend(d))
        rec.operation("resume", lambda: t.resume(d))
        wait_running()
        rec.operation("suspend again", lambda: t.suspend(d))
        # The guest panics at once; whether that comes before or after
        # torpor's XS_RESUME reaches xenstored (re-arming @releaseDomain) is a
        # race on real Xen -- torpor reads the domain's state, not the event.
        rec.operation(
            "forced resume",
            lambda: t.resume(d, cooperative=False, force=True),
            release_race=True,
        )
    return rec.entries


def sim_trace() -> list[dict[str, Any]]:
    """The scenario on a fresh simulated host (one PV guest)."""
    from torpor_sim.host import SimHost

    with tempfile.TemporaryDirectory(prefix="torpor-diff-") as tmp:
        sim = SimHost(tmp, qemu=False).start()
        try:
            domid = sim.create_guest("pv")
            rec = Recorder(sim.xenstore_socket, sim.xen.domain_flags, domid)
            host = sim.toolstack_host()
            try:

                def pause(on: bool) -> None:
                    (host.hypervisor.pause if on else host.hypervisor.unpause)(domid)

                def wait_running() -> None:
                    # A simulated kernel runs as soon as its domain does (its
                    # pending watch events are handled in the host's loop); the
                    # snapshot that follows and the next operation see it.
                    return None

                return run_scenario(host, rec, pause, wait_running)
            finally:
                rec.close()
                host.close()
        finally:
            sim.stop()

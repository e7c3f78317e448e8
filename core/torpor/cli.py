"""The ``torpor`` command.

Exit codes (stable; scripts may rely on them):

====  ==========================================================
0     every requested operation succeeded
1     some operations failed, others succeeded (partial failure)
2     bad usage: unknown command, malformed domid or option
3     every requested operation failed
4     the backend is unavailable (no Xen here, no simulated host)
130   interrupted by SIGINT (Ctrl-C); what was in flight rolled back
143   interrupted by SIGTERM; what was in flight rolled back
====  ==========================================================

A first SIGINT or SIGTERM interrupts every operation in flight through the
orchestrator's rollback (:meth:`torpor.orchestrator.Torpor.interrupt`): each
domain is reported with the state it was observed in afterwards.  A second
one exits at once, naming what was left unfinished and the ``torpor
recover`` line for it.

The host is ``--host xen`` or ``--host sim:DIR`` (or ``$TORPOR_HOST``);
without either, ``xen`` when ``/proc/xen/capabilities`` says ``control_d``.
``--json`` prints one JSON object per domain and line.  Imports are lazy so
start-up stays cheap (see bench/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torpor.errors import TorporError
    from torpor.model import Result
    from torpor.orchestrator import Torpor
    from torpor.progress import Reporter

__all__ = [
    "EXIT_ALL_FAILED",
    "EXIT_BACKEND",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_ALL_FAILED = 3
EXIT_BACKEND = 4


class _Stop(BaseException):
    """A signal arrived before any operation began: nothing to roll back."""


class _Interrupts:
    """SIGINT and SIGTERM while a command runs (installed by :func:`main`).

    The first signal interrupts every :class:`~torpor.orchestrator.Torpor`
    the command opened: each operation in flight is rolled back and ends in
    :class:`~torpor.errors.Interrupted`, which the command reports per
    domain; the process then exits 128 + the signal's number.  Before any
    was opened, it stops the command at once.  A second signal exits at
    once, naming what was left unfinished.
    """

    def __init__(self) -> None:
        self.torpors: list[Torpor] = []
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def reset(self) -> None:
        """A new command: nothing opened, no signal seen."""
        self.torpors = []
        self.signum = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread (a test may call main())
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def exit_code(self, code: int) -> int:
        return code if self.signum is None else 128 + self.signum

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            if not self.torpors:
                raise _Stop
            print(
                f"torpor: {name}: rolling back what is in flight (a second {name} exits at once)",
                file=sys.stderr,
                flush=True,
            )
            for t in self.torpors:
                t.interrupt(name)
            return
        for t in self.torpors:
            for domid, operation, phase in t.in_flight():
                print(
                    f"torpor: domain {domid}: {operation} left unfinished in phase {phase} "
                    f"by a second {name}; its state was not checked: run "
                    f"`torpor recover {domid}`",
                    file=sys.stderr,
                )
        with contextlib.suppress(OSError):
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(128 + self.signum)


_interrupts = _Interrupts()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# ---------------------------------------------------------------------------
# progress and output


def _describe(res: Result) -> str:
    phases = ", ".join(f"{t.phase} {t.seconds * 1000:.1f}ms" for t in res.timings)
    how = f" via {res.method}" if res.method else ""
    coop = (
        ""
        if res.cooperative is None
        else (" (cooperative)" if res.cooperative else " (non-cooperative)")
    )
    details = dict(res.details)
    who: object = res.domid
    where = ""
    if "source_domid" in details:  # a migration: the guest has a new domid there
        who = details["source_domid"]
        where = f" as domain {res.domid} on {details.get('destination')}"
    return (
        f"domain {who}: {res.operation} ok{how}{coop}: {res.outcome}, now {res.state}{where}"
        f" in {res.seconds * 1000:.1f} ms [{phases}]"
    )


def _error_dict(domid: int, op: str, err: TorporError) -> dict[str, Any]:
    out: dict[str, Any] = {"domid": domid, "operation": op, "ok": False}
    out.update(err.to_dict())
    return out


def _report(
    args: argparse.Namespace,
    op: str,
    domids: Sequence[int],
    results: Sequence[Result | TorporError],
    reporter: Reporter | None,
) -> int:
    from torpor.errors import TorporError

    ok = 0
    for domid, res in zip(domids, results, strict=True):
        if isinstance(res, TorporError):
            if args.json:
                print(json.dumps(_error_dict(domid, op, res)), flush=True)
            else:
                left = getattr(res, "state", None)
                state = f" (domain state: {left})" if left else ""
                print(f"domain {domid}: {op} FAILED: {res}{state}", flush=True)
        else:
            ok += 1
            if args.json:
                print(json.dumps(res.to_dict()), flush=True)
            else:
                print(_describe(res), flush=True)
    if ok == len(domids):
        return EXIT_OK
    return EXIT_PARTIAL if ok else EXIT_ALL_FAILED


# ---------------------------------------------------------------------------
# commands


def _open(args: argparse.Namespace, reporter: Reporter | None = None) -> Torpor:
    from torpor.host import Host
    from torpor.model import Timeouts
    from torpor.orchestrator import Torpor
    from torpor.plugins import get_plugin_manager

    plugins: list[Any] = list(getattr(args, "plugin", None) or [])
    if reporter is not None:
        plugins.append(reporter)
    pm = get_plugin_manager(plugins=plugins, block=getattr(args, "no_plugin", None) or [])
    defaults = Timeouts()
    timeouts = Timeouts(
        ack=args.ack_timeout if args.ack_timeout is not None else defaults.ack,
        suspend=args.suspend_timeout if args.suspend_timeout is not None else defaults.suspend,
    )
    host = Host.open(args.host)
    t = Torpor(host, plugin_manager=pm, timeouts=timeouts, own_host=True)
    _interrupts.torpors.append(t)
    return t


def _explicit_domids(args: argparse.Namespace) -> list[int]:
    """The domids given on the command line, validated before any host is opened."""
    from torpor.errors import UsageError
    from torpor.host import validate_domid

    if args.all:
        if args.domids:
            raise UsageError("give domids or --all, not both")
        return []
    if not args.domids:
        raise UsageError("no domain given (DOMID... or --all)")
    seen: list[int] = []
    for raw in args.domids:
        d = validate_domid(raw)
        if d not in seen:
            seen.append(d)
    return seen


def _domids(args: argparse.Namespace, t: Torpor, want: Callable[[str], bool]) -> list[int]:
    if args.all:
        return [d["domid"] for d in t.list_domains() if want(d["state"])]
    return _explicit_domids(args)


def _bulk(args: argparse.Namespace, op: str) -> int:
    from torpor.errors import TorporError
    from torpor.progress import Reporter

    _explicit_domids(args)  # a malformed domid is bad usage, whatever the host
    reporter = Reporter(quiet=args.json, total=len(args.domids) or 2)
    with _open(args, reporter) as t:
        if op == "suspend":
            domids = _domids(args, t, lambda s: s == "running")
        else:
            domids = _domids(args, t, lambda s: s in ("suspended", "S3"))
        if not domids:
            if not args.json:
                print(f"no domain to {op}")
            return EXIT_OK
        reporter.total = len(domids)
        if len(domids) == 1:
            try:
                if op == "suspend":
                    one: Result | TorporError = t.suspend(domids[0])
                else:
                    one = t.resume(domids[0], cooperative=not args.slow, force=args.force)
            except TorporError as e:
                one = e
            results: list[Result | TorporError] = [one]
        elif op == "suspend":
            results = t.suspend_many(domids)
        else:
            results = t.resume_many(domids, cooperative=not args.slow, force=args.force)
        for d, r in zip(domids, results, strict=True):
            reporter.finished(
                d,
                not isinstance(r, TorporError),
                f"domain {d}: {op} " + ("failed" if isinstance(r, TorporError) else "ok"),
            )
        return _report(args, op, domids, results, reporter)


def _cmd_suspend(args: argparse.Namespace) -> int:
    return _bulk(args, "suspend")


def _cmd_resume(args: argparse.Namespace) -> int:
    return _bulk(args, "resume")


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from torpor.errors import TorporError, UsageError
    from torpor.host import validate_domid

    domid = validate_domid(args.domid)
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.interval < 0:
        raise UsageError("--interval must not be negative")
    from torpor.progress import Reporter

    reporter = Reporter(quiet=True, total=1)
    done = 0

    def show(res: Result) -> None:
        nonlocal done
        if args.json:
            print(json.dumps({**res.to_dict(), "index": done}), flush=True)
        else:
            print(f"checkpoint {done + 1}/{args.count}: " + _describe(res), flush=True)
        done += 1

    with _open(args, reporter) as t:
        try:
            # One session: claimed, classified and (event channel) bound once.
            t.checkpoints(domid, args.count, interval=args.interval / 1000, on_result=show)
        except TorporError as e:
            if args.json:
                print(json.dumps({**_error_dict(domid, "checkpoint", e), "index": done}))
            else:
                left = getattr(e, "state", None)
                state = f" (domain state: {left})" if left else ""
                print(f"domain {domid}: checkpoint {done + 1}/{args.count} FAILED: {e}{state}")
            return EXIT_PARTIAL if done else EXIT_ALL_FAILED
    return EXIT_OK


def _cmd_save(args: argparse.Namespace) -> int:
    from torpor.errors import BackendUnavailable, TorporError
    from torpor.host import validate_domid
    from torpor.progress import Reporter

    domid = validate_domid(args.domid)
    with _open(args, Reporter(quiet=args.json, total=1)) as t:
        try:
            res: Result | TorporError = t.save(domid, args.file)
        except BackendUnavailable:
            raise  # exit code 4, as for every command
        except TorporError as e:
            res = e
        return _report(args, "save", [domid], [res], None)


def _cmd_restore(args: argparse.Namespace) -> int:
    from torpor.errors import BackendUnavailable, TorporError
    from torpor.host import validate_domain_name
    from torpor.progress import Reporter

    name = None if args.name is None else validate_domain_name(args.name)  # else exit 2
    with _open(args, Reporter(quiet=args.json, total=1)) as t:
        try:
            res = t.restore(args.file, name=name)
        except BackendUnavailable:
            raise  # exit code 4, as for every command
        except TorporError as e:
            if args.json:
                print(json.dumps({"operation": "restore", "ok": False, **e.to_dict()}))
            else:
                print(f"restore of {args.file} FAILED: {e}")
            return EXIT_ALL_FAILED
        return _report(args, "restore", [res.domid], [res], None)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from torpor.errors import BackendUnavailable, TorporError
    from torpor.host import validate_domid
    from torpor.progress import Reporter

    domid = validate_domid(args.domid)
    dest_args = argparse.Namespace(**{**vars(args), "host": args.to, "plugin": args.plugin})
    with _open(args, Reporter(quiet=args.json, total=1)) as src, _open(dest_args) as dst:
        try:
            res: Result | TorporError = src.migrate(domid, dst)
        except BackendUnavailable:
            raise  # exit code 4, as for every command
        except TorporError as e:
            res = e
        return _report(args, "migrate", [domid], [res], None)


def _cmd_status(args: argparse.Namespace) -> int:
    from torpor.host import validate_domid

    domid = validate_domid(args.domid)
    with _open(args) as t:
        st = t.status(domid)
    if args.json:
        print(json.dumps(st))
        return EXIT_OK
    print(f"domain {domid} ({st['guest_type']}): {st['state']}")
    if st["request_pending"]:
        print("  a suspend request is pending in control/shutdown")
    intent = st["intent"]
    if intent:
        who = "still running" if st["intent_alive"] else "no longer running"
        print(
            f"  torpor pid {intent.get('pid')} ({who}) was doing: {intent.get('op')}"
            + (f" via {intent['method']}" if intent.get("method") else "")
            + (", guest asked" if intent.get("requested") else "")
        )
        if not st["intent_alive"]:
            print(f"  run `torpor recover {domid}` to bring it back to running")
    return EXIT_OK


def _cmd_recover(args: argparse.Namespace) -> int:
    from torpor.errors import TorporError
    from torpor.host import validate_domid

    domid = validate_domid(args.domid)
    with _open(args) as t:
        try:
            res: Result | TorporError = t.recover(domid)
        except TorporError as e:
            res = e
        code = _report(args, "recover", [domid], [res], None)
        if not args.json and not isinstance(res, TorporError):
            actions: list[str] = list(dict(res.details)["actions"])  # type: ignore[call-overload]
            for action in actions:
                print(f"  {action}")
        return code


def _cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as t:
        rows = t.list_domains()
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return EXIT_OK
    print(f"{'domid':>5}  {'name':<20} {'type':<7} state")
    for r in rows:
        print(f"{r['domid']:>5}  {r['name']:<20} {r['guest_type']:<7} {r['state']}")
    return EXIT_OK


def _refuse_options(args: argparse.Namespace, command: str, why: str, *names: str) -> None:
    """Options every command accepts but this one cannot honour: bad usage, not ignored."""
    from torpor.errors import UsageError

    given = [n for n in names if getattr(args, n, None) not in (None, [])]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise UsageError(f"{command}: {flags} do not apply: {why}")


def _cmd_plugins(args: argparse.Namespace) -> int:
    from torpor.plugins import get_plugin_manager, plugin_names

    pm = get_plugin_manager(
        plugins=getattr(args, "plugin", None) or [], block=getattr(args, "no_plugin", None) or []
    )
    rows = plugin_names(pm)
    hooks: dict[str, list[str]] = {}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks[name] = sorted(
            c.name for c in pm.get_hookcallers(plugin) or [] if c.name.startswith("torpor_")
        )
    if args.json:
        for name, origin in rows:
            print(json.dumps({"name": name, "origin": origin, "hooks": hooks.get(name, [])}))
        return EXIT_OK
    for name, origin in rows:
        print(f"{name:<16} {origin}")
        print(f"{'':<16} hooks: {', '.join(h.removeprefix('torpor_') for h in hooks[name])}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from torpor.demo import run_demo

    _refuse_options(
        args,
        "demo",
        "it runs its own simulated host with the built-in plugins and default deadlines",
        "host",
        "plugin",
        "no_plugin",
        "ack_timeout",
        "suspend_timeout",
    )
    code: int = run_demo(json_output=args.json, qemu=args.qemu)
    return code


def _sim_start(args: argparse.Namespace) -> int:
    from torpor.sim import daemon

    kinds = daemon.parse_guests(args.guests)
    misbehave = daemon.parse_misbehaviours(args.misbehave or [])
    guests = daemon.start(args.dir, kinds, misbehave, qemu=args.qemu, freeze_time=args.freeze_time)
    if args.json:
        print(json.dumps({"dir": args.dir, "guests": guests}))
    else:
        print(f"simulated host running in {args.dir}")
        print(f"  xenstored:  XENSTORED_PATH={args.dir}/xenstored/socket")
        print(f"  hypervisor: {args.dir}/hypervisor.sock")
        print(f"  use it:     torpor --host sim:{args.dir} list")
        _print_status(guests)
    return EXIT_OK


def _sim_status(args: argparse.Namespace) -> int:
    from contextlib import closing

    from torpor.hypervisor.remote import RemoteHypervisor

    with closing(RemoteHypervisor(f"{args.dir}/hypervisor.sock")) as hv:
        rows = hv.call("sim_status")
    if args.json:
        print(json.dumps(rows))
    else:
        _print_status(rows)
    return EXIT_OK


def _sim_stop(args: argparse.Namespace) -> int:
    from torpor.sim import daemon

    if daemon.stop(args.dir):
        if args.json:
            print(json.dumps({"dir": args.dir, "stopped": True}))
        else:
            print(f"simulated host in {args.dir} stopped")
        return EXIT_OK
    print(f"torpor: no simulated host running in {args.dir}", file=sys.stderr)
    return EXIT_BACKEND


def _print_status(rows: Sequence[dict[str, Any]]) -> None:
    print(f"{'domid':>5}  {'name':<16} {'type':<6} {'state':<10} {'counter':>8}  notes")
    for r in rows:
        notes = []
        if r.get("misbehaviour"):
            notes.append(f"misbehaves: {r['misbehaviour']}")
        if r.get("device_model"):
            notes.append(f"device model: {r['device_model']}")
        print(
            f"{r['domid']:>5}  {r['name']:<16} {r['kind']:<6} {r['state']:<10} "
            f"{r['ticks']:>8}  {', '.join(notes)}"
        )


# ---------------------------------------------------------------------------
# the parser


def _common(p: argparse.ArgumentParser, *, sub: bool) -> None:
    """Options accepted before and after the command (``torpor --json list`` or
    ``torpor list --json``)."""
    d: Any = argparse.SUPPRESS if sub else None
    p.add_argument(
        "--host",
        default=d,
        metavar="HOST",
        help="'xen' or 'sim:DIR' (default: $TORPOR_HOST, else xen in a dom0)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if sub else False,
        help="one JSON object per domain and line",
    )
    p.add_argument(
        "-p",
        "--plugin",
        action="append",
        default=d,
        metavar="MODULE",
        help="load this plugin module too",
    )
    p.add_argument(
        "--no-plugin",
        action="append",
        default=d,
        metavar="NAME",
        help="do not load the plugin of this name (e.g. pvhvm)",
    )
    p.add_argument(
        "--ack-timeout",
        type=float,
        default=d,
        metavar="SECONDS",
        help="how long a guest may take to acknowledge (default 30)",
    )
    p.add_argument(
        "--suspend-timeout",
        type=float,
        default=d,
        metavar="SECONDS",
        help="how long a domain may take to suspend once asked (default 60)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="torpor",
        description="Suspend and resume Xen guest domains from dom0.",
        epilog="exit codes: 0 ok, 1 partial failure, 2 usage, 3 all failed, 4 backend unavailable",
    )
    _common(p, sub=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(
        name: str, func: Callable[[argparse.Namespace], int], helptext: str
    ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=helptext, description=helptext)
        _common(c, sub=True)
        c.set_defaults(func=func)
        return c

    cmd("list", _cmd_list, "list guest domains with their guest type and state")
    c = cmd("suspend", _cmd_suspend, "suspend domains (shut down with reason suspend, or S3)")
    c.add_argument("domids", nargs="*", metavar="DOMID")
    c.add_argument("--all", action="store_true", help="every running guest domain")
    c = cmd("resume", _cmd_resume, "resume suspended domains (cooperatively by default)")
    c.add_argument("domids", nargs="*", metavar="DOMID")
    c.add_argument("--all", action="store_true", help="every suspended guest domain")
    c.add_argument(
        "--slow",
        action="store_true",
        help="non-cooperative resume (fast=0): for a guest in a new domain",
    )
    c.add_argument(
        "--force", action="store_true", help="do an unsafe in-place non-cooperative resume anyway"
    )
    c = cmd("checkpoint", _cmd_checkpoint, "suspend then resume cooperatively, N times")
    c.add_argument("domid", metavar="DOMID")
    c.add_argument("--count", type=int, default=1)
    c.add_argument(
        "--interval",
        type=float,
        default=0.0,
        metavar="MS",
        help="pause between checkpoints, in milliseconds",
    )
    c = cmd("save", _cmd_save, "suspend a domain, write its state to FILE, destroy it")
    c.add_argument("domid", metavar="DOMID")
    c.add_argument("file", metavar="FILE")
    c = cmd("restore", _cmd_restore, "build a new domain from FILE and resume it non-cooperatively")
    c.add_argument("file", metavar="FILE")
    c.add_argument(
        "--name",
        metavar="NEW",
        help="restore under this name (a copy: new name, new UUID); without it a domain "
        "already named as the saved guest refuses the restore",
    )
    c = cmd(
        "migrate",
        _cmd_migrate,
        "move a domain to another host (the source is destroyed once it runs there)",
    )
    c.add_argument("domid", metavar="DOMID")
    c.add_argument(
        "--to", required=True, metavar="HOST", help="'sim:DIR' (not real Xen: save and restore)"
    )
    c = cmd(
        "status",
        _cmd_status,
        "the truth about a domain: its state, a pending request, torpor's intent",
    )
    c.add_argument("domid", metavar="DOMID")
    c = cmd("recover", _cmd_recover, "bring a domain a killed torpor left behind back to running")
    c.add_argument("domid", metavar="DOMID")
    cmd("plugins", _cmd_plugins, "list the loaded plugins and the hooks they implement")
    c = cmd("demo", _cmd_demo, "suspend and resume guests on an embedded simulated host")
    c.add_argument(
        "--no-qemu",
        dest="qemu",
        action="store_false",
        default=None,
        help="in-process device models even if QEMU is installed",
    )

    sim = sub.add_parser("sim", help="run a simulated Xen host")
    simsub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", parser_class=_Parser)
    simsub.required = True
    s = simsub.add_parser("start", help="start a simulated host as a daemon")
    s.add_argument("--dir", required=True, help="directory for its sockets and state")
    s.add_argument("--guests", default="pv:1", help="e.g. pv:2,pvhvm:1,hvm:1 (domids 1, 2, ...)")
    s.add_argument(
        "--misbehave",
        action="append",
        metavar="DOMID=NAME",
        help="never_ack, ack_then_hang, slow_ack=SECONDS, unknown_command, "
        "crash_during_suspend, vanish, lose_xenstore",
    )
    s.add_argument(
        "--qemu",
        dest="qemu",
        action="store_true",
        default=None,
        help="HVM device models on real QEMU (default: when installed)",
    )
    s.add_argument(
        "--no-qemu",
        dest="qemu",
        action="store_false",
        help="in-process device models even if QEMU is installed",
    )
    s.add_argument(
        "--freeze-time",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long each guest takes to freeze its tasks when suspending",
    )
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    s.set_defaults(func=_sim_start)
    s = simsub.add_parser("status", help="one line per simulated domain")
    s.add_argument("--dir", required=True)
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    s.set_defaults(func=_sim_status)
    s = simsub.add_parser("stop", help="stop a simulated host (QEMU children included)")
    s.add_argument("--dir", required=True)
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    s.set_defaults(func=_sim_stop)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    _interrupts.reset()
    _interrupts.install()
    try:
        return _interrupts.exit_code(_main(argv))
    except _Stop:
        return _interrupts.exit_code(EXIT_USAGE)
    finally:
        _interrupts.restore()


def _main(argv: Sequence[str] | None) -> int:
    from torpor.errors import BackendUnavailable, TorporError, UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("host", "plugin", "no_plugin", "ack_timeout", "suspend_timeout"):
        if not hasattr(args, name):
            setattr(args, name, None)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as e:
        print(f"torpor: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BackendUnavailable as e:
        print(f"torpor: {e}", file=sys.stderr)
        return EXIT_BACKEND
    except TorporError as e:
        print(f"torpor: {e}", file=sys.stderr)
        return EXIT_ALL_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``torpor list | head``): not an error of ours.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the final flush
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

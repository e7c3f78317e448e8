"""The ``torpor`` command.

Exit codes (stable; scripts may rely on them):

====  ==========================================================
0     every requested operation succeeded
1     some operations failed, others succeeded (partial failure)
2     bad usage: unknown command, malformed domid or option
3     every requested operation failed
4     the backend is unavailable (no Xen here, no simulated host)
====  ==========================================================

Imports are lazy: ``torpor --help`` and the start-up of every command stay
cheap (see bench/).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "EXIT_ALL_FAILED",
    "EXIT_BACKEND",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_ALL_FAILED = 3
EXIT_BACKEND = 4


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own exit code is 2 as well
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _sim_start(args: argparse.Namespace) -> int:
    from torpor.sim import daemon

    kinds = daemon.parse_guests(args.guests)
    misbehave = daemon.parse_misbehaviours(args.misbehave or [])
    guests = daemon.start(args.dir, kinds, misbehave, qemu=args.qemu)
    if args.json:
        print(json.dumps({"dir": args.dir, "guests": guests}))
    else:
        print(f"simulated host running in {args.dir}")
        print(f"  xenstored:  XENSTORED_PATH={args.dir}/xenstored/socket")
        print(f"  hypervisor: {args.dir}/hypervisor.sock")
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
        print(f"simulated host in {args.dir} stopped")
        return EXIT_OK
    print(f"no simulated host running in {args.dir}", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="torpor", description="Suspend and resume Xen guest domains from dom0.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

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
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    s.set_defaults(func=_sim_start)
    s = simsub.add_parser("status", help="one line per simulated domain")
    s.add_argument("--dir", required=True)
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    s.set_defaults(func=_sim_status)
    s = simsub.add_parser("stop", help="stop a simulated host (QEMU children included)")
    s.add_argument("--dir", required=True)
    s.set_defaults(func=_sim_stop)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from torpor.errors import BackendUnavailable, TorporError, UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())

"""The ``torpor`` command.

Exit codes (stable; scripts may rely on them):

====  ==========================================================
0     every requested operation succeeded
1     some operations failed, others succeeded (partial failure)
2     bad usage: unknown command or option, an invalid argument
3     every requested operation failed
4     the backend is unavailable (no Xen here, no simulated host)
130   interrupted by SIGINT (Ctrl-C); what was in flight rolled back
143   interrupted by SIGTERM; what was in flight rolled back
====  ==========================================================

A first SIGINT or SIGTERM interrupts every operation in flight through the
orchestrator's rollback (:meth:`torpor.facade.Torpor.interrupt`): each
domain is reported with the state it was observed in afterwards.  A second
one exits at once, naming what was left unfinished and the ``torpor
recover`` line for it.

The host is ``--host xen`` or ``--host sim:DIR`` (or ``$TORPOR_HOST``);
without either, ``xen`` when ``/proc/xen/capabilities`` says ``control_d``.
``--json`` prints one JSON object per domain and line.

Every argument is checked while the command line is parsed (``type=``
functions) or right after it (a command's ``check``), before any host is
opened: a bad one is one line on stderr, ``torpor COMMAND: error: ...``
naming the valid range, and exit code 2.  Imports are lazy so start-up
stays cheap (see bench/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torpor.errors import TorporError
    from torpor.facade import Torpor
    from torpor.model import Result
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

#: Bounds of the command line's numbers (beyond them a typo, not a wish).
MAX_TIMEOUT = 86400.0  # a day, in seconds
MAX_COUNT = 1_000_000  # checkpoints in one session
MAX_INTERVAL_MS = 86_400_000.0  # a day, in milliseconds

#: The commands that suspend a guest: the only ones the suspend deadlines apply to.
SUSPENDING = ("suspend", "checkpoint", "save", "migrate", "host save-all")


def _sim_daemon() -> Any:
    """torpor_sim.daemon, or BackendUnavailable saying how to install the simulator."""
    from torpor.host import sim_module

    return sim_module("daemon")


class _Stop(BaseException):
    """A signal arrived before any operation began: nothing to roll back."""


class _Interrupts:
    """SIGINT and SIGTERM while a command runs (installed by :func:`main`).

    The first signal interrupts every :class:`~torpor.facade.Torpor`
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
        # One line, never argparse's usage block: ``torpor save: error: ...``.
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _LazyParsers(Mapping[str, argparse.ArgumentParser]):
    """Subcommand name -> parser, each parser built the first time it is looked up."""

    def __init__(self) -> None:
        self._parsers: dict[
            str, argparse.ArgumentParser | Callable[[], argparse.ArgumentParser]
        ] = {}

    def defer(self, name: str, make: Callable[[], argparse.ArgumentParser]) -> None:
        self._parsers[name] = make

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        parser = self._parsers[name]
        if not isinstance(parser, argparse.ArgumentParser):
            parser = self._parsers[name] = parser()
        return parser

    def __contains__(self, name: object) -> bool:  # argparse's choice check: build nothing
        return name in self._parsers

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsers)

    def __len__(self) -> int:
        return len(self._parsers)


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands whose parsers are built only when chosen (or walked, as the
    docs' tests do).  argparse makes a help formatter for every argument it adds
    and looks up its translations for every parser: building all ~25 of ours took
    3-7 ms natively and most of a second in the lab's emulated dom0, for the one
    command a process runs.  ``torpor --help`` lists the commands from their
    help alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._name_parser_map = self.choices = _LazyParsers()  # type: ignore[assignment]

    def add_command(
        self, name: str, build: Callable[[argparse.ArgumentParser], None], **kwargs: Any
    ) -> None:
        """``add_parser(name, **kwargs)``, then ``build(parser)`` -- once it is needed."""
        helptext = kwargs.pop("help")
        kwargs.setdefault("prog", f"{self._prog_prefix} {name}")
        self._choices_actions.append(self._ChoicesPseudoAction(name, (), helptext))

        def make() -> argparse.ArgumentParser:
            parser: argparse.ArgumentParser = self._parser_class(**kwargs)
            build(parser)
            return parser

        self._name_parser_map.defer(name, make)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# argument types: each raises ArgumentTypeError naming the valid range


def _domid(text: str) -> int:
    from torpor.errors import UsageError
    from torpor.host import validate_domid

    try:
        return validate_domid(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def _number(text: str, what: str, low: float, high: float, *, low_ok: bool) -> float:
    bounds = (
        f"from {_fmt(low)} to {_fmt(high)}"
        if low_ok
        else f"greater than {_fmt(low)} and at most {_fmt(high)}"
    )
    expected = f"{what} is a finite number {bounds}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {expected}") from None
    if not math.isfinite(value) or value > high or value < low or (value == low and not low_ok):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {expected}")
    return value


def _timeout(text: str) -> float:
    return _number(text, "a deadline in seconds", 0, MAX_TIMEOUT, low_ok=False)


def _interval(text: str) -> float:
    return _number(text, "an interval in milliseconds", 0, MAX_INTERVAL_MS, low_ok=True)


def _count(text: str) -> int:
    expected = f"a count is a whole number from 1 to {MAX_COUNT}"
    if (
        not (text.isascii() and text.isdigit() and len(text) <= 7)
        or not 1 <= int(text) <= MAX_COUNT
    ):
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: {expected}")
    return int(text)


def _host_spec(text: str) -> str:
    if text == "xen" or (text.startswith("sim:") and len(text) > 4):
        return text
    raise argparse.ArgumentTypeError(f"unknown host {text!r}: use 'xen' or 'sim:DIR'")


def _save_target(text: str) -> str:
    """Where ``save`` may write: a writable directory's entry that is not a directory.

    Whether an existing file there may be overwritten is :func:`_check_save`'s
    business (it depends on ``--force``).
    """
    if not text:
        raise argparse.ArgumentTypeError("FILE is empty: give the image file to write")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name in it")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.exists(parent):
        raise argparse.ArgumentTypeError(f"cannot write {text}: directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"cannot write {text}: no permission to create files in {parent}"
        )
    return text


def _restore_source(text: str) -> str:
    """What ``restore`` may read: an existing, readable regular file."""
    if not text:
        raise argparse.ArgumentTypeError("FILE is empty: give the image file to restore")
    try:
        st = os.stat(text)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"cannot restore {text}: no such file") from None
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot restore {text}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise argparse.ArgumentTypeError(f"cannot restore {text}: it is {what}")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot restore {text}: no permission to read it")
    return text


def _domain_name(text: str) -> str:
    """``restore --name``: a name xl would accept (torpor.host.validate_domain_name)."""
    from torpor.errors import UsageError
    from torpor.host import validate_domain_name

    try:
        return validate_domain_name(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _sim_dir(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("--dir is empty: give the simulated host's directory")
    return text


def _sim_start_dir(text: str) -> str:
    from torpor.errors import UsageError

    check_directory = _sim_daemon().check_directory

    try:
        check_directory(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return text


def _guests(text: str) -> list[str]:
    from torpor.errors import UsageError

    parse_guests = _sim_daemon().parse_guests

    try:
        kinds: list[str] = parse_guests(text)
        return kinds
    except UsageError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _misbehaviour(text: str) -> str:
    from torpor.errors import UsageError

    parse_misbehaviour = _sim_daemon().parse_misbehaviour

    try:
        parse_misbehaviour(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return text


def _dirty_rate(text: str) -> float:
    return _number(text, "a rate in pages per second", 0, 1e9, low_ok=True)


def _dirty_pages(text: str) -> int:
    expected = "a number of pages from 1 to 65536"
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not (1 <= int(text) <= 65536):
        raise argparse.ArgumentTypeError(f"invalid page count {text!r}: {expected}")
    return int(text)


def _freeze_time(text: str) -> float:
    MAX_GUEST_SECONDS = _sim_daemon().MAX_GUEST_SECONDS

    return _number(text, "a time in seconds", 0, MAX_GUEST_SECONDS, low_ok=True)


# ---------------------------------------------------------------------------
# checks across arguments (after parsing, before any host is opened)


def _check_domids(args: argparse.Namespace) -> None:
    from torpor.errors import UsageError

    if args.all and args.domids:
        raise UsageError("give domids or --all, not both")
    if not args.all and not args.domids:
        raise UsageError("no domain given (DOMID... or --all)")
    args.domids = list(dict.fromkeys(args.domids))  # a repeated domid counts once


def _check_save(args: argparse.Namespace) -> None:
    """An existing FILE is replaced only if it is an image already (or empty), or ``--force``."""
    from torpor.errors import UsageError

    path = args.file
    if args.force or not os.path.lexists(path):
        return
    refuse = "refusing to overwrite it (use --force to replace it)"
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(
            f"{path} exists but cannot be looked at ({e.strerror}); {refuse}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} exists and is not a regular file; {refuse}")
    if st.st_size == 0:
        return  # an empty file holds nothing to lose (e.g. from mktemp)
    from torpor.xl_savefile import sniff

    try:
        kind = sniff(path)
    except OSError as e:
        raise UsageError(f"{path} exists and cannot be read ({e.strerror}); {refuse}") from None
    if kind == "unknown":
        raise UsageError(
            f"{path} exists and is neither a torpor image nor an xl save file; {refuse}"
        )


def _same_host(a: str, b: str) -> bool:
    if a.startswith("sim:") and b.startswith("sim:"):
        return os.path.realpath(a[4:]) == os.path.realpath(b[4:])
    return a == b


def _check_migrate(args: argparse.Namespace) -> None:
    from torpor.errors import UsageError
    from torpor.host import HOST_ENV

    source = args.host or os.environ.get(HOST_ENV) or None
    if source is None:  # the default: this dom0, if it is one
        try:
            with open("/proc/xen/capabilities") as f:
                source = "xen" if "control_d" in f.read() else None
        except OSError:
            source = None
    if source is not None and _same_host(source, args.to):
        raise UsageError(f"--to {args.to} is the source host itself; give another host")
    if args.to.startswith("sim:") and args.ssh_command is not None:
        raise UsageError("--ssh-command applies to xl://HOST destinations, not sim:DIR")


def _check_sim_start(args: argparse.Namespace) -> None:
    parse_misbehaviours = _sim_daemon().parse_misbehaviours

    args.misbehaviours = parse_misbehaviours(args.misbehave or [], len(args.guests))


# ---------------------------------------------------------------------------
# output


def _report(
    args: argparse.Namespace,
    op: str,
    domids: Sequence[int],
    results: Sequence[Result | TorporError],
    reporter: Reporter | None = None,
) -> int:
    """Print each result the reporter has not printed already; the exit code."""
    from torpor.errors import TorporError
    from torpor.progress import describe, describe_failure, failure_dict

    ok = 0
    for domid, res in zip(domids, results, strict=True):
        good = not isinstance(res, TorporError)
        ok += good
        if reporter is not None and reporter.reported.get(domid) == good:
            continue  # printed as it finished
        if isinstance(res, TorporError):
            line = json.dumps(failure_dict(domid, op, res)) if args.json else None
            print(line or describe_failure(domid, op, res), flush=True)
        else:
            print(json.dumps(res.to_dict()) if args.json else describe(res), flush=True)
    if ok == len(domids):
        return EXIT_OK
    return EXIT_PARTIAL if ok else EXIT_ALL_FAILED


# ---------------------------------------------------------------------------
# commands


def _open(args: argparse.Namespace, reporter: Reporter | None = None) -> Torpor:
    from torpor.facade import Torpor
    from torpor.host import Host
    from torpor.model import Timeouts
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


def _bulk(args: argparse.Namespace, op: str) -> int:
    from torpor.errors import TorporError
    from torpor.progress import Reporter

    reporter = Reporter(operation=op, json=args.json)
    with _open(args, reporter) as t:
        if args.all:
            want = ("running",) if op == "suspend" else ("suspended", "S3")
            domids = [d["domid"] for d in t.list_domains() if d["state"] in want]
        else:
            domids = args.domids
        if not domids:
            if not args.json:
                print(f"no domain to {op}")
            return EXIT_OK
        with reporter.showing(domids):
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
        if reporter.broken_pipe:
            raise BrokenPipeError
        return _report(args, op, domids, results, reporter)


def _cmd_suspend(args: argparse.Namespace) -> int:
    return _bulk(args, "suspend")


def _cmd_resume(args: argparse.Namespace) -> int:
    return _bulk(args, "resume")


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from torpor.errors import TorporError
    from torpor.progress import Reporter, describe, failure_dict

    domid: int = args.domid
    reporter = Reporter(json=args.json)
    done = 0

    def show(res: Result) -> None:
        nonlocal done
        if args.json:
            print(json.dumps({**res.to_dict(), "index": done}), flush=True)
        else:
            print(f"checkpoint {done + 1}/{args.count}: " + describe(res), flush=True)
        done += 1

    # No line per phase: a session of many checkpoints prints one line each.
    with _open(args, reporter) as t, reporter.showing([domid], phase_lines=False):
        try:
            # One session: claimed, classified and (event channel) bound once.
            t.checkpoints(domid, args.count, interval=args.interval / 1000, on_result=show)
        except TorporError as e:
            if args.json:
                print(json.dumps({**failure_dict(domid, "checkpoint", e), "index": done}))
            else:
                left = getattr(e, "state", None)
                state = f" (domain state: {left})" if left else ""
                print(f"domain {domid}: checkpoint {done + 1}/{args.count} FAILED: {e}{state}")
            return EXIT_PARTIAL if done else EXIT_ALL_FAILED
    return EXIT_OK


def _cmd_save(args: argparse.Namespace) -> int:
    from torpor.errors import BackendUnavailable, TorporError
    from torpor.progress import Reporter

    domid: int = args.domid
    reporter = Reporter(json=args.json)
    with _open(args, reporter) as t, reporter.showing([domid]):
        try:
            res: Result | TorporError = t.save(domid, args.file)
        except BackendUnavailable:
            raise  # exit code 4, as for every command
        except TorporError as e:
            res = e
    return _report(args, "save", [domid], [res])


def _cmd_restore(args: argparse.Namespace) -> int:
    from torpor.errors import BackendUnavailable, TorporError
    from torpor.progress import Reporter

    name = args.name  # checked while parsing (_domain_name)
    reporter = Reporter(json=args.json)
    with _open(args, reporter) as t, reporter.showing([]):
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
    return _report(args, "restore", [res.domid], [res])


def _cmd_migrate(args: argparse.Namespace) -> int:
    from torpor.errors import BackendUnavailable, TorporError
    from torpor.model import PrecopyPolicy
    from torpor.progress import Reporter

    domid: int = args.domid
    reporter = Reporter(json=args.json)
    policy = PrecopyPolicy(max_iterations=args.max_iterations, dirty_threshold=args.dirty_threshold)
    res: Result | TorporError
    if not args.to.startswith("sim:"):  # xl's migration protocol
        with _open(args, reporter) as src, reporter.showing([domid]):
            try:
                res = src.migrate(
                    domid,
                    args.to,
                    live=args.live,
                    precopy=policy,
                    ssh_command="ssh" if args.ssh_command is None else args.ssh_command,
                )
            except BackendUnavailable:
                raise  # exit code 4, as for every command
            except TorporError as e:
                res = e
        return _report(args, "migrate", [domid], [res])
    dest_args = argparse.Namespace(**{**vars(args), "host": args.to, "plugin": args.plugin})
    with _open(args, reporter) as src, _open(dest_args) as dst, reporter.showing([domid]):
        try:
            res = src.migrate(domid, dst, live=args.live, precopy=policy)
        except BackendUnavailable:
            raise  # exit code 4, as for every command
        except TorporError as e:
            res = e
    return _report(args, "migrate", [domid], [res])


def _cmd_migrate_receive(args: argparse.Namespace) -> int:
    """The receiving end of xl's migration protocol, on stdin and stdout.

    Both descriptors are taken for the protocol and replaced (stdin by
    /dev/null, stdout by stderr) so that nothing else can write into the
    stream; progress and the result go to stderr.
    """
    from torpor.errors import BackendUnavailable, TorporError
    from torpor.progress import Reporter, describe, failure_dict

    recv_fd, send_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout.flush()
    os.dup2(2, 1)
    reporter = Reporter(json=args.json, out=sys.stderr)
    try:
        with _open(args, reporter) as t, reporter.showing([]):
            try:
                res = t.migrate_receive(
                    recv_fd=recv_fd, send_fd=send_fd, pause_after=args.pause_after
                )
            except BackendUnavailable:
                raise
            except TorporError as e:
                if args.json:
                    print(json.dumps(failure_dict(0, "migrate-receive", e)), file=sys.stderr)
                else:
                    print(f"migration target: FAILED: {e}", file=sys.stderr)
                return EXIT_ALL_FAILED
    finally:
        os.close(recv_fd)
        os.close(send_fd)
    if args.json:
        print(json.dumps(res.to_dict()), file=sys.stderr)
    else:
        print("migration target: " + describe(res), file=sys.stderr)
    return EXIT_OK


#: Bounds of a precopy policy on the command line (PrecopyPolicy's own).
MAX_ITERATIONS = 1000
MAX_DIRTY_THRESHOLD = 1 << 40


def _iterations(text: str) -> int:
    expected = f"a number of precopy rounds from 1 to {MAX_ITERATIONS}"
    if not (text.isascii() and text.isdigit() and len(text) <= 4) or not (
        1 <= int(text) <= MAX_ITERATIONS
    ):
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: {expected}")
    return int(text)


def _pages(text: str) -> int:
    expected = f"a number of pages from 0 to {MAX_DIRTY_THRESHOLD}"
    if not (text.isascii() and text.isdigit() and len(text) <= 14) or not (
        0 <= int(text) <= MAX_DIRTY_THRESHOLD
    ):
        raise argparse.ArgumentTypeError(f"invalid page count {text!r}: {expected}")
    return int(text)


def _migrate_target(text: str) -> str:
    from torpor.xlmigrate import parse_target

    if text.startswith("sim:") and len(text) > 4:
        return text
    if parse_target(text) is not None:
        return text
    raise argparse.ArgumentTypeError(
        f"unknown destination {text!r}: use 'xl://HOST', a host name, or 'sim:DIR'"
    )


def _migrate_options(c: argparse.ArgumentParser) -> None:
    """``torpor migrate``'s live-migration and transport options."""
    c.add_argument(
        "--ssh-command",
        metavar="CMD",
        help="how to reach HOST (xl's -s; default ssh): torpor runs `sh -c \"exec CMD HOST xl "
        'migrate-receive"`; empty: HOST is the whole command (xl://HOST only)',
    )
    live = c.add_mutually_exclusive_group()
    live.add_argument(
        "--live",
        dest="live",
        action="store_true",
        default=None,
        help="live or not at all: refused (exit 3, the guest untouched) where the guest's "
        "dirty pages cannot be tracked (default: live where they can be, else non-live, "
        "saying why)",
    )
    live.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="suspend the guest first, then copy it (non-live)",
    )
    c.add_argument(
        "--max-iterations",
        type=_iterations,
        default=5,
        metavar="N",
        help="precopy rounds while the guest runs, at most (default %(default)s, libxl's; "
        f"1 to {MAX_ITERATIONS})",
    )
    c.add_argument(
        "--dirty-threshold",
        type=_pages,
        default=50,
        metavar="PAGES",
        help="stop and copy once fewer pages than this are dirty (default %(default)s, libxl's)",
    )


def _cmd_status(args: argparse.Namespace) -> int:
    domid: int = args.domid
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
        stage = intent.get("migration")
        if stage:
            print(f"  migrating to {intent.get('to')}: {stage}")
            if stage == "go":
                print(
                    "  the receiver was given permission to start the guest: check there "
                    "before resuming this copy (two copies must never run)"
                )
        if not st["intent_alive"] and stage != "go":
            print(f"  run `torpor recover {domid}` to bring it back to running")
    return EXIT_OK


def _cmd_recover(args: argparse.Namespace) -> int:
    from torpor.errors import TorporError
    from torpor.progress import Reporter

    domid: int = args.domid
    reporter = Reporter(json=args.json)
    with _open(args, reporter) as t, reporter.showing([domid]):
        try:
            res: Result | TorporError = t.recover(domid)
        except TorporError as e:
            res = e
    code = _report(args, "recover", [domid], [res])
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


def _cmd_plugins(args: argparse.Namespace) -> int:
    import pluggy

    from torpor.plugins import ask_order, get_plugin_manager, plugin_names

    pm = get_plugin_manager(
        plugins=getattr(args, "plugin", None) or [], block=getattr(args, "no_plugin", None) or []
    )
    rows = plugin_names(pm)  # in the order hooks ask them
    hooks: dict[str, list[str]] = {}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks[name] = sorted(
            c.name for c in pm.get_hookcallers(plugin) or [] if c.name.startswith("torpor_")
        )
    # firstresult hooks: the first plugin to answer decides, so the order matters
    deciding = sorted(
        c.name
        for c in pm.hook.__dict__.values()
        if isinstance(c, pluggy.HookCaller)
        and c.name.startswith("torpor_")
        and c.spec is not None
        and c.spec.opts.get("firstresult")
    )
    orders = {h: ask_order(pm, h) for h in deciding}
    if args.json:
        for name, origin in rows:
            asked = {h: order.index(name) + 1 for h, order in orders.items() if name in order}
            print(
                json.dumps(
                    {"name": name, "origin": origin, "hooks": hooks.get(name, []), "asked": asked}
                )
            )
        return EXIT_OK
    print("plugins, in the order hooks ask them:")
    for name, origin in rows:
        print(f"  {name:<16} {origin}")
        print(f"  {'':<16} hooks: {', '.join(h.removeprefix('torpor_') for h in hooks[name])}")
    print("the first to answer decides (firstresult hooks), asked in this order:")
    for h, order in orders.items():
        if order:
            print(f"  {h.removeprefix('torpor_'):<24} {', '.join(order)}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from torpor.demo import run_demo

    code: int = run_demo(json_output=args.json, qemu=args.qemu)
    return code


def _sim_start(args: argparse.Namespace) -> int:
    daemon = _sim_daemon()

    guests = daemon.start(
        args.dir,
        args.guests,
        args.misbehaviours,
        qemu=args.qemu,
        freeze_time=args.freeze_time,
        dirty_rate=args.dirty_rate,
        dirty_pages=args.dirty_pages,
        shadow=args.shadow,
    )
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
    daemon = _sim_daemon()

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
# torpor host save-all / restore-all: the host's lifecycle (issue 16), all here

MAX_CONCURRENCY = 1024
MAX_RATE = 1 << 50  # bytes per second: beyond it a typo
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _concurrency(text: str) -> int:
    expected = f"a concurrency is a whole number from 1 to {MAX_CONCURRENCY}"
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"invalid concurrency {text!r}: {expected}")
    return int(text)


def _rate(text: str) -> float:
    """``--max-rate``: bytes per second, with an optional K/M/G/T suffix (powers of
    1024), ``B`` and ``/s`` allowed: ``200M``, ``1.5GiB/s``, ``50000000``."""
    import re

    expected = "a rate is a positive number of bytes per second, e.g. 200M or 1.5G (1024^n)"
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:i?B)?(?:/s)?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: {expected}")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not 0 < value <= MAX_RATE:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: {expected}")
    return value


def _save_dir(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("--dir is empty: give the save directory")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return text


def _selection(text: str) -> str:
    import re

    for item in text.split(","):
        if item.strip().startswith("re:"):
            try:
                re.compile(item.strip()[3:])
            except re.error as e:
                raise argparse.ArgumentTypeError(
                    f"invalid regular expression {item.strip()!r}: {e}"
                ) from None
    return text


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _outcome_line(o: Any, progress: Any = None) -> str:
    who = f"{o.name or '(no name)'}"
    where = f"domain {o.domid}" if o.domid is not None else "no domain"
    head = f"{who} ({where}, {o.guest_type})"
    if progress is not None:
        head = f"[{progress.done}/{progress.total}] {head}"
    if o.outcome == "saved":
        text = f"saved -> {o.image}, {_size(o.bytes or 0)} in {o.seconds:.2f} s; now {o.state}"
    elif o.outcome == "restored":
        text = (
            f"restored from {o.image} as domain {o.new_domid} in {o.seconds:.2f} s; now "
            f"{o.state}; image removed"
        )
    else:
        text = o.outcome.upper() if not o.ok else o.outcome
        if o.detail:
            text += f": {o.detail}"
        if o.outcome not in ("excluded",):
            text += f" (state: {o.state})"
    line = f"{head}: {text}"
    if progress is not None and progress.bytes:
        line += f" [{_size(progress.bytes)} at {_size(progress.rate)}/s]"
    return line


def _yes(text: str) -> bool:
    low = text.strip().lower()
    if low in ("yes", "true", "1", "on"):
        return True
    if low in ("no", "false", "0", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"invalid value {text!r}: yes or no")


#: /etc/default/torpor-host (contrib/default/torpor-host): setting -> (option dest, type)
HOST_CONFIG: dict[str, tuple[str, Callable[[str], Any]]] = {
    "TORPOR_HOST_SAVE_DIR": ("dir", str),
    "TORPOR_HOST_CONCURRENCY": ("concurrency", _concurrency),
    "TORPOR_HOST_MAX_RATE": ("max_rate", _rate),
    "TORPOR_HOST_SHUTDOWN_FALLBACK": ("shutdown_fallback", _yes),
    "TORPOR_HOST_SHUTDOWN_TIMEOUT": ("shutdown_timeout", _timeout),
    "TORPOR_HOST_ACK_TIMEOUT": ("ack_timeout", _timeout),
    "TORPOR_HOST_ONLY": ("only", lambda v: [_selection(x) for x in v.split()]),
    "TORPOR_HOST_EXCEPT": ("exclude", lambda v: [_selection(x) for x in v.split()]),
    "TORPOR_HOST_RESTORE": ("restore", _yes),
}


def read_host_config(path: str) -> dict[str, Any]:
    """A config file in the xendomains style (``/etc/default/torpor-host``): shell
    ``NAME=value`` lines, ``#`` comments, values optionally quoted; the settings
    of :data:`HOST_CONFIG`, checked as the options they stand for (UsageError)."""
    import shlex

    from torpor.errors import UsageError

    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror or e}") from None
    out: dict[str, Any] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name = name.strip().removeprefix("export ").strip()
        if not eq or name not in HOST_CONFIG:
            known = ", ".join(HOST_CONFIG)
            raise UsageError(f"{path}:{n}: unknown setting {line!r} (known: {known})")
        try:
            words = shlex.split(value, comments=True)
        except ValueError as e:
            raise UsageError(f"{path}:{n}: {e}") from None
        dest, kind = HOST_CONFIG[name]
        joined = " ".join(words)
        if not joined and dest not in ("only", "exclude", "shutdown_fallback", "restore"):
            continue  # empty: the default
        try:
            out[dest] = kind(joined)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{path}:{n}: {name}: {e}") from None
    return out


def _apply_host_config(args: argparse.Namespace) -> None:
    """``--config FILE``: its settings, where the command line gave none."""
    from torpor.errors import UsageError

    config = read_host_config(args.config) if args.config else {}
    for dest, value in config.items():
        if dest == "restore":
            args.restore = value
        elif dest in ("only", "exclude"):
            if not getattr(args, dest, None):
                setattr(args, dest, value)
        elif hasattr(args, dest) and getattr(args, dest) in (None, False):
            setattr(args, dest, value)
    if not args.dir:
        raise UsageError("no save directory: give --dir DIR (or TORPOR_HOST_SAVE_DIR in --config)")
    _save_dir_checked(args.dir)


def _save_dir_checked(text: str) -> None:
    from torpor.errors import UsageError

    try:
        _save_dir(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(str(e)) from None


def _host_command(args: argparse.Namespace, operation: str) -> int:
    from torpor.operations.hostwide import DEFAULT_SHUTDOWN_TIMEOUT, GuestFilter
    from torpor.progress import Reporter

    if operation == "restore-all" and getattr(args, "restore", True) is False:
        print("restore-all: TORPOR_HOST_RESTORE=no in the config: nothing restored", flush=True)
        return EXIT_OK
    if operation == "save-all" and args.shutdown_timeout is None:
        args.shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT
    select = GuestFilter.parse(args.only or [], args.exclude or [])
    printed: set[tuple[str, object]] = set()

    def show(o: Any, progress: Any) -> None:
        printed.add((o.name, o.domid))
        if args.json:
            obj = {"operation": operation, **o.to_dict()}
            obj["progress"] = {
                "done": progress.done,
                "total": progress.total,
                "bytes": progress.bytes,
                "seconds": round(progress.seconds, 3),
                "bytes_per_second": round(progress.rate, 1),
            }
            print(json.dumps(obj), flush=True)
        else:
            print(_outcome_line(o, progress), flush=True)

    # Progress only ("waiting up to 30s for the guest to acknowledge..."): the
    # results are printed by ``show`` as each guest completes.
    reporter = Reporter(json=args.json)
    with _open(args, reporter) as t, reporter.showing([]):
        if operation == "save-all":
            report = t.save_all(
                args.dir,
                select=select,
                concurrency=args.concurrency,
                max_rate=args.max_rate,
                shutdown_fallback=args.shutdown_fallback,
                shutdown_timeout=args.shutdown_timeout,
                on_guest=show,
            )
        else:
            report = t.restore_all(
                args.dir, select=select, concurrency=args.concurrency, on_guest=show
            )
    for o in report.guests:  # the rest: excluded, not running, not saved...
        if (o.name, o.domid) in printed and o.outcome not in ("unlisted",):
            continue
        line = json.dumps({"operation": operation, **o.to_dict()}) if args.json else None
        print(line or _outcome_line(o), flush=True)
    summary = report.to_dict()
    if args.json:
        print(json.dumps({**summary, "summary": True}), flush=True)
    else:
        counts = ", ".join(f"{n} {what}" for what, n in summary["counts"].items()) or "no guest"
        print(
            f"{operation}: {counts}; {_size(report.bytes)} in {report.seconds:.2f} s "
            f"({_size(report.rate)}/s), concurrency {report.concurrency}; "
            f"manifest {os.path.join(report.directory, 'manifest.json')}",
            flush=True,
        )
        for w in report.warnings:
            print(f"{operation}: WARNING: {w}", flush=True)
        for n in report.notes:
            print(f"{operation}: {n}", flush=True)
    attempted = report.attempted
    good = sum(1 for o in attempted if o.ok)
    if good == len(attempted) and not report.warnings:
        return EXIT_OK
    return EXIT_PARTIAL if good or report.warnings else EXIT_ALL_FAILED


def _cmd_host_save_all(args: argparse.Namespace) -> int:
    return _host_command(args, "save-all")


def _cmd_host_restore_all(args: argparse.Namespace) -> int:
    return _host_command(args, "restore-all")


def _host_commands(host: argparse.ArgumentParser) -> None:
    """``torpor host save-all`` / ``restore-all``: xendomains' stop and start."""
    hostsub = host.add_subparsers(dest="host_command", metavar="SUBCOMMAND", parser_class=_Parser)
    hostsub.required = True

    def hostcmd(
        name: str, func: Callable[[argparse.Namespace], int], helptext: str, groups: frozenset[str]
    ) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = hostsub.add_parser(name, help=helptext, description=helptext)
        _common(c, groups, top=False)
        c.set_defaults(func=func, check=_apply_host_config, groups=groups, prog=c.prog)
        c.add_argument(
            "--dir",
            type=_save_dir,
            metavar="DIR",
            help="the save directory: images and manifest.json (xendomains: XENDOMAINS_SAVE)",
        )
        c.add_argument(
            "--config",
            metavar="FILE",
            help="settings in the xendomains style (/etc/default/torpor-host: "
            "TORPOR_HOST_SAVE_DIR=...); the command line's options win",
        )
        c.add_argument(
            "--only",
            action="append",
            type=_selection,
            metavar="SPEC",
            help="only these guests: names, domids or re:REGEX (whole name), comma-separated; "
            "repeatable",
        )
        c.add_argument(
            "--except",
            dest="exclude",
            action="append",
            type=_selection,
            metavar="SPEC",
            help="not these guests (as --only); repeatable",
        )
        c.add_argument(
            "--concurrency",
            type=_concurrency,
            default=None,
            metavar="N",
            help="at most N guests in flight (default 4, see docs/performance.md; 1 = one "
            "after another, as xendomains)",
        )
        return c

    c = hostcmd(
        "save-all",
        _cmd_host_save_all,
        "save every running guest into DIR (concurrently); a guest that refuses is reported "
        "and left running",
        _ON_A_HOST | {"timeouts"},
    )
    c.add_argument(
        "--max-rate",
        type=_rate,
        default=None,
        metavar="RATE",
        help="start saves no faster than RATE bytes/s on average (K/M/G suffixes, powers of 1024)",
    )
    c.add_argument(
        "--shutdown-fallback",
        action="store_true",
        help="a guest that cannot be saved is shut down cleanly (control/shutdown = poweroff, "
        "as xendomains does) and waited for",
    )
    c.add_argument(
        "--shutdown-timeout",
        type=_timeout,
        default=None,
        metavar="SECONDS",
        help="how long a guest asked to power off may take (default 300; "
        "xendomains: XENDOMAINS_STOP_MAXWAIT)",
    )
    hostcmd(
        "restore-all",
        _cmd_host_restore_all,
        "restore the guests save-all saved in DIR, in the saved order; each image is removed "
        "once its guest runs",
        _ON_A_HOST,
    )


# ---------------------------------------------------------------------------
# the parser

#: The common options, by group: (flags, dest).  Each command takes the groups
#: that apply to it, after its name; before it (``torpor --json list``) the
#: top-level parser takes them all, and a group the command does not take is
#: refused (:func:`_check_common`).
COMMON: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "host": ((("--host",), "host"),),
    "json": ((("--json",), "json"),),
    "plugins": ((("-p", "--plugin"), "plugin"), (("--no-plugin",), "no_plugin")),
    "timeouts": ((("--ack-timeout",), "ack_timeout"), (("--suspend-timeout",), "suspend_timeout")),
}
_ALL_GROUPS = frozenset(COMMON)
_ON_A_HOST = frozenset({"host", "json", "plugins"})


def _why_not(command: str, group: str) -> str:
    """Why a common option group does not apply to ``command`` (for the usage error)."""
    if command == "demo":
        return "the demo runs its own simulated host with the built-in plugins and deadlines"
    if command.startswith("sim"):
        return "`torpor sim` runs the simulated host itself and loads no torpor plugins"
    if group == "timeouts":
        return f"only commands that suspend a guest take them ({', '.join(SUSPENDING)})"
    return f"`torpor {command}` does not take it"


def _common(p: argparse.ArgumentParser, groups: frozenset[str], *, top: bool) -> None:
    """The common options of ``groups``: defaults None before the command, and not
    set at all after it (so a value given before the command stays)."""
    d: Any = None if top else argparse.SUPPRESS
    if "host" in groups:
        p.add_argument(
            "--host",
            type=_host_spec,
            default=d,
            metavar="HOST",
            help="'xen' or 'sim:DIR' (default: $TORPOR_HOST, else xen in a dom0)",
        )
    if "json" in groups:
        p.add_argument(
            "--json",
            action="store_true",
            default=d,
            help="machine-readable: one JSON object per line on stdout, nothing on stderr",
        )
    if "plugins" in groups:
        p.add_argument(
            "-p",
            "--plugin",
            action="append",
            default=d,
            metavar="MODULE",
            help="load this plugin module too (repeatable)",
        )
        p.add_argument(
            "--no-plugin",
            action="append",
            default=d,
            metavar="NAME",
            help="do not load the plugin of this name, e.g. pvhvm (repeatable)",
        )
    if "timeouts" in groups:
        p.add_argument(
            "--ack-timeout",
            type=_timeout,
            default=d,
            metavar="SECONDS",
            help=f"how long a guest may take to acknowledge (default 30; 0 < SECONDS <= "
            f"{MAX_TIMEOUT:g})",
        )
        p.add_argument(
            "--suspend-timeout",
            type=_timeout,
            default=d,
            metavar="SECONDS",
            help=f"how long a domain may take to suspend once asked (default 60; 0 < SECONDS "
            f"<= {MAX_TIMEOUT:g})",
        )


DOMID_HELP = "a domain id, 1 to 32751 (dom0 is refused)"


class _VersionAction(argparse.Action):
    """``--version``: torpor's version, then the Xen libraries and hypervisor found
    (looked for only when asked: start-up stays cheap)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kw: Any) -> None:
        from torpor.versions import version_text

        print(version_text(), flush=True)
        parser.exit()


def _suspend_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("domids", nargs="*", type=_domid, metavar="DOMID", help=DOMID_HELP)
    c.add_argument("--all", action="store_true", help="every running guest domain")


def _resume_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("domids", nargs="*", type=_domid, metavar="DOMID", help=DOMID_HELP)
    c.add_argument("--all", action="store_true", help="every suspended guest domain")
    c.add_argument(
        "--slow",
        action="store_true",
        help="non-cooperative resume (fast=0): for a guest in a new domain",
    )
    c.add_argument(
        "--force", action="store_true", help="do an unsafe in-place non-cooperative resume anyway"
    )


def _checkpoint_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("domid", type=_domid, metavar="DOMID", help=DOMID_HELP)
    c.add_argument(
        "--count",
        type=_count,
        default=1,
        metavar="N",
        help=f"how many checkpoints (default %(default)s; 1 to {MAX_COUNT})",
    )
    c.add_argument(
        "--interval",
        type=_interval,
        default=0.0,
        metavar="MS",
        help="pause between checkpoints, in milliseconds (default %(default)g)",
    )


def _save_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("domid", type=_domid, metavar="DOMID", help=DOMID_HELP)
    c.add_argument(
        "file",
        type=_save_target,
        metavar="FILE",
        help="the image to write, in an existing directory (replaced only if it is an image "
        "already, or empty)",
    )
    c.add_argument(
        "--force",
        action="store_true",
        help="replace FILE even if it is neither a torpor image nor an xl save file",
    )


def _restore_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "file",
        type=_restore_source,
        metavar="FILE",
        help="an image written by `torpor save` (on --host xen: an xl save file)",
    )
    c.add_argument(
        "--name",
        type=_domain_name,
        metavar="NEW",
        help="restore under this name (a copy: new name, new UUID); without it a domain "
        "already named as the saved guest refuses the restore",
    )


def _migrate_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("domid", type=_domid, metavar="DOMID", help=DOMID_HELP)
    c.add_argument(
        "--to",
        required=True,
        type=_migrate_target,
        metavar="HOST",
        help="the destination: 'xl://HOST' or a host name such as 'localhost' (xl's migration "
        "protocol to `xl migrate-receive` there), or 'sim:DIR' (not this host)",
    )
    _migrate_options(c)


def _migrate_receive_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--paused",
        dest="pause_after",
        action="store_true",
        help="leave the domain paused once received (xl migrate-receive -p; -p is --plugin here)",
    )
    for flag, what in (("-e", "do not daemonize"), ("-d", "debug"), ("-F", "foreground")):
        c.add_argument(flag, action="store_true", help=f"accepted as xl's ({what}): no effect")


def _status_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("domid", type=_domid, metavar="DOMID", help=DOMID_HELP)


def _recover_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("domid", type=_domid, metavar="DOMID", help=DOMID_HELP)


def _demo_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--no-qemu",
        dest="qemu",
        action="store_false",
        default=None,
        help="in-process device models even if QEMU is installed",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="torpor",
        description="Suspend and resume Xen guest domains from dom0.",
        epilog="Options before COMMAND are passed to it; each command takes those that apply "
        "to it (see `torpor COMMAND --help`). "
        "Exit codes: 0 ok, 1 partial failure, 2 usage, 3 all failed, 4 backend unavailable.",
    )
    p.add_argument(
        "--version",
        action=_VersionAction,
        help="print torpor's version and the Xen libraries and hypervisor it finds, and exit",
    )
    _common(p, _ALL_GROUPS, top=True)
    sub = p.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser, action=_Commands
    )
    assert isinstance(sub, _Commands)
    sub.required = True

    def cmd(
        name: str,
        func: Callable[[argparse.Namespace], int],
        helptext: str,
        groups: frozenset[str] = _ON_A_HOST,
        check: Callable[[argparse.Namespace], None] | None = None,
        *,
        arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    ) -> None:
        def build(c: argparse.ArgumentParser) -> None:
            _common(c, groups, top=False)
            c.set_defaults(func=func, check=check, groups=groups, prog=c.prog)
            if arguments is not None:
                arguments(c)

        sub.add_command(name, build, help=helptext, description=helptext)

    suspending = _ON_A_HOST | {"timeouts"}
    cmd("list", _cmd_list, "list guest domains with their guest type and state")
    cmd(
        "suspend",
        _cmd_suspend,
        "suspend domains (shut down with reason suspend, or S3)",
        suspending,
        _check_domids,
        arguments=_suspend_arguments,
    )
    cmd(
        "resume",
        _cmd_resume,
        "resume suspended domains (cooperatively by default)",
        check=_check_domids,
        arguments=_resume_arguments,
    )
    cmd(
        "checkpoint",
        _cmd_checkpoint,
        "suspend then resume cooperatively, N times",
        suspending,
        arguments=_checkpoint_arguments,
    )
    cmd(
        "save",
        _cmd_save,
        "suspend a domain, write its state to FILE, destroy it",
        suspending,
        _check_save,
        arguments=_save_arguments,
    )
    cmd(
        "restore",
        _cmd_restore,
        "build a new domain from FILE and resume it non-cooperatively",
        arguments=_restore_arguments,
    )
    cmd(
        "migrate",
        _cmd_migrate,
        "move a domain to another host (the source is destroyed once it runs there)",
        suspending,
        _check_migrate,
        arguments=_migrate_arguments,
    )
    cmd(
        "migrate-receive",
        _cmd_migrate_receive,
        "receive a domain over xl's migration protocol on stdin/stdout (xl migrate's other end)",
        arguments=_migrate_receive_arguments,
    )
    cmd(
        "status",
        _cmd_status,
        "the truth about a domain: its state, a pending request, torpor's intent",
        arguments=_status_arguments,
    )
    cmd(
        "recover",
        _cmd_recover,
        "bring a domain a killed torpor left behind back to running",
        arguments=_recover_arguments,
    )
    # --host is accepted (and changes nothing) so a script may give every command it.
    cmd("plugins", _cmd_plugins, "list the loaded plugins and the hooks they implement")
    cmd(
        "demo",
        _cmd_demo,
        "suspend and resume guests on an embedded simulated host",
        frozenset({"json"}),
        arguments=_demo_arguments,
    )
    sub.add_command(
        "host",
        _host_commands,
        help="save every guest at shutdown, restore them at boot",
        description="The host's lifecycle, as xendomains: save every running guest into a "
        "directory (concurrently), restore them from it at boot (docs/host-lifecycle.md).",
    )
    sub.add_command(
        "sim",
        _sim_commands,
        help="run a simulated Xen host",
        description="Run a simulated Xen host in its own process, to drive with --host sim:DIR.",
    )
    return p


def _sim_commands(sim: argparse.ArgumentParser) -> None:
    """``torpor sim start | status | stop``."""
    simsub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", parser_class=_Parser)
    simsub.required = True
    json_help = "print JSON on stdout"
    sim_groups = frozenset({"json"})

    def simcmd(
        name: str, func: Callable[[argparse.Namespace], int], helptext: str, description: str
    ) -> argparse.ArgumentParser:
        s = simsub.add_parser(name, help=helptext, description=description)
        s.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)
        s.set_defaults(func=func, check=None, groups=sim_groups, prog=s.prog)
        return s

    s = simcmd(
        "start",
        _sim_start,
        "start a simulated host as a daemon",
        "Start a simulated Xen host as a daemon (a new session, its log in DIR/sim.log) and "
        "return once every guest has booted.",
    )
    s.set_defaults(check=_check_sim_start)
    s.add_argument(
        "--dir",
        required=True,
        type=_sim_start_dir,
        metavar="DIR",
        help="directory for its sockets and state (created if missing; short: socket paths "
        "hold at most 107 bytes)",
    )
    s.add_argument(
        "--guests",
        type=_guests,
        default="pv:1",
        metavar="SPEC",
        help="guest types and counts, e.g. pv:2,pvhvm:1,hvm:1 (domids 1, 2, ...; "
        "default %(default)s)",
    )
    s.add_argument(
        "--misbehave",
        action="append",
        type=_misbehaviour,
        metavar="DOMID=NAME",
        help="make one of these guests misbehave (repeatable): never_ack, ack_then_hang, "
        "slow_ack=SECONDS, unknown_command, crash_during_suspend, vanish, lose_xenstore",
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
        type=_freeze_time,
        default=0.0,
        metavar="SECONDS",
        help="how long each guest takes to freeze its tasks when suspending "
        "(default %(default)g; 0 to 3600)",
    )
    s.add_argument(
        "--dirty-rate",
        type=_dirty_rate,
        default=0.0,
        metavar="PAGES_PER_S",
        help="each PV, PVHVM and PVH guest writes this many pages per second of its running "
        "time, sweeping --dirty-pages pages (the load a live migration's precopy must keep "
        "up with; default %(default)g: only its tick work)",
    )
    s.add_argument(
        "--dirty-pages",
        type=_dirty_pages,
        default=256,
        metavar="PAGES",
        help="the region --dirty-rate sweeps, added to each guest's memory (default "
        "%(default)s; 1 to 65536)",
    )
    s.add_argument(
        "--no-shadow",
        dest="shadow",
        action="store_false",
        default=True,
        help="a hypervisor without shadow paging, as Debian's Xen 4.17: a PV guest's "
        "log-dirty fails, so it cannot migrate live",
    )
    s = simcmd(
        "status",
        _sim_status,
        "one line per simulated domain",
        "Show each domain of the simulated host in DIR: domid, name, type, state, its tick "
        "counter, its misbehaviour and device model.",
    )
    s.add_argument(
        "--dir", required=True, type=_sim_dir, metavar="DIR", help="the simulated host's directory"
    )
    s = simcmd(
        "stop",
        _sim_stop,
        "stop a simulated host (QEMU children included)",
        "Stop the simulated host in DIR, its guests and QEMU children included, and wait "
        "until its daemon has exited.",
    )
    s.add_argument(
        "--dir", required=True, type=_sim_dir, metavar="DIR", help="the simulated host's directory"
    )


_FLAGS = {flag: group for group, opts in COMMON.items() for flags, _ in opts for flag in flags}


def _check_common(args: argparse.Namespace, extras: Sequence[str]) -> None:
    """A common option the command does not take is refused, saying why; any
    other leftover argument is unknown."""
    from torpor.errors import UsageError

    command = " ".join(
        filter(
            None,
            (args.command, getattr(args, "sim_command", None), getattr(args, "host_command", None)),
        )
    )
    for arg in extras:
        flag = arg.split("=", 1)[0]
        if flag.startswith("-p") and not flag.startswith("--"):
            flag = "-p"
        group = _FLAGS.get(flag)
        if group is not None:
            raise UsageError(
                f"{flag} does not apply to `torpor {command}`: {_why_not(command, group)}"
            )
    if extras:
        raise UsageError(f"unrecognized arguments: {' '.join(extras)}")
    for group, opts in COMMON.items():
        if group in args.groups:
            continue
        for flags, dest in opts:
            if getattr(args, dest, None) not in (None, False, []):
                raise UsageError(
                    f"{flags[-1]} does not apply to `torpor {command}`: {_why_not(command, group)}"
                )


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
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except BackendUnavailable as e:  # `torpor sim ...` without the simulator installed
        print(f"torpor: {e}", file=sys.stderr)
        return EXIT_BACKEND
    prog: str = args.prog
    try:
        _check_common(args, extras)
        for name in ("host", "plugin", "no_plugin", "ack_timeout", "suspend_timeout"):
            if getattr(args, name, None) is None:
                setattr(args, name, None)
        args.json = bool(getattr(args, "json", False))
        if args.check is not None:
            args.check(args)
    except UsageError as e:
        print(f"{prog}: error: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
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

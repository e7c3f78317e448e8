"""Every ``torpor`` subcommand fed bad arguments: exit code 2, one line on stderr naming
the problem (and the valid range), no traceback -- and no host ever opened.

The table runs through :func:`torpor.cli.main` in this process with ``Host.open``,
``daemon.start`` and ``run_demo`` replaced by tripwires (a bad argument that got
past validation would reach them and fail the test, not exit 2), and with
``--host sim:/nonexistent`` (had validation been skipped, that is exit code 4).
A few rows run through a real ``python -m torpor`` process, as a user types
them.  Usage errors are one line, ``torpor COMMAND: error: MESSAGE``, without
argparse's usage block.

Then the CLI polish: ``--version``, help for every argument, descriptions,
common options only where they apply.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import torpor
from torpor.cli import EXIT_BACKEND, EXIT_OK, EXIT_USAGE, SUSPENDING, build_parser, main
from torpor.errors import BackendUnavailable
from torpor.host import DOMID_FIRST_RESERVED, Host
from torpor_sim import daemon

NOWHERE = "sim:/nonexistent-torpor-host"
RANGE = f"from 1 to {DOMID_FIRST_RESERVED - 1}"
TIMEOUT_RANGE = "greater than 0 and at most 86400"
ROOT = os.geteuid() == 0

#: Places the table refers to, made by the ``places`` fixture.
PLACES = ("file", "fifo", "dir", "image", "xl", "empty", "locked")


def _rows() -> Iterator[tuple[str, list[str], str]]:
    """(id, argv, a fragment the error line must contain)."""
    # Domids, for every command that takes one.
    domid_commands = {
        "suspend": ["suspend", "D"],
        "resume": ["resume", "D"],
        "checkpoint": ["checkpoint", "D"],
        "save": ["save", "D", "{dir}/new.img"],
        "migrate": ["migrate", "D", "--to", "sim:/tmp/elsewhere"],
        "status": ["status", "D"],
        "recover": ["recover", "D"],
    }
    for name, template in domid_commands.items():
        for bad in ("-1", "99999999999", "abc", "0", "32752", "1.0", "", "٣"):
            argv = [bad if a == "D" else a for a in template]
            yield f"{name}-domid-{bad!r}", argv, RANGE
    yield "suspend-domid-0-is-dom0", ["suspend", "0"], "control domain"
    yield "resume-one-bad-among-good", ["resume", "1", "2", "x"], RANGE
    # Deadlines, on every command that suspends, before and after the command.
    for name in SUSPENDING:
        argv = {"save": ["save", "1", "{dir}/new.img"], "migrate": ["migrate", "1", "--to",
                "sim:/tmp/elsewhere"], "host save-all": ["host", "save-all", "--dir", "{dir}"],
                }.get(name, [name, "1"])  # fmt: skip
        for opt in ("--ack-timeout", "--suspend-timeout"):
            for bad in ("nan", "inf", "-5", "0", "-0", "abc", "1e999", "86401"):
                yield f"{name}{opt}={bad}", [*argv, opt, bad], TIMEOUT_RANGE
        yield f"{name}-deadline-before", ["--ack-timeout", "nan", *argv], TIMEOUT_RANGE
    # ... and refused where they do not apply.
    for argv in (
        ["list"],
        ["status", "1"],
        ["resume", "1"],
        ["recover", "1"],
        ["plugins"],
        ["demo"],
        ["sim", "status", "--dir", "/tmp/x"],
    ):
        yield f"{argv[0]}-takes-no-deadline", [*argv, "--ack-timeout", "5"], "does not apply"
        yield (
            f"{argv[0]}-takes-no-deadline-before",
            ["--suspend-timeout", "5", *argv],
            ("does not apply"),
        )
    for argv in (["demo"], ["sim", "start", "--dir", "/tmp/x"], ["sim", "stop", "--dir", "/x"]):
        for opt in (["-p", "mod"], ["--no-plugin", "pv"], ["--host", "xen"]):
            yield f"{' '.join(argv[:2])}-{opt[0]}", [*argv, *opt], "does not apply"
    yield (
        "sim-takes-no-plugins-before",
        ["-p", "mod", "sim", "status", "--dir", "/x"],
        ("does not apply"),
    )
    # Domids or --all.
    for name in ("suspend", "resume"):
        yield f"{name}-nothing", [name], "no domain given"
        yield f"{name}-both", [name, "1", "--all"], "not both"
    # checkpoint --count and --interval.
    for bad in ("0", "-3", "1.5", "abc", "1000001", "99999999999999999999", "1e3", " 2"):
        yield f"checkpoint-count-{bad!r}", ["checkpoint", "1", "--count", bad], "from 1 to 1000000"
    for bad in ("nan", "inf", "-1", "x", "86400001"):
        yield (
            f"checkpoint-interval-{bad}",
            ["checkpoint", "1", "--interval", bad],
            ("from 0 to 86400000"),
        )
    # save FILE.
    yield "save-into-a-directory", ["save", "1", "{dir}"], "is a directory"
    yield "save-no-such-directory", ["save", "1", "{dir}/no/such/x.img"], "does not exist"
    yield "save-below-a-file", ["save", "1", "{file}/x.img"], "is not a directory"
    yield "save-over-a-foreign-file", ["save", "1", "{file}"], "neither a torpor image nor an xl"
    yield "save-over-a-fifo", ["save", "1", "{fifo}"], "not a regular file"
    yield "save-no-file", ["save", "1"], "required: FILE"
    yield "save-empty-name", ["save", "1", ""], "FILE is empty"
    # restore FILE.
    yield "restore-missing", ["restore", "{dir}/missing.img"], "no such file"
    yield "restore-a-directory", ["restore", "{dir}"], "it is a directory"
    yield "restore-a-fifo", ["restore", "{fifo}"], "not a regular file"
    yield "restore-below-a-file", ["restore", "{file}/x"], "cannot restore"
    yield "restore-nothing", ["restore"], "required: FILE"
    # migrate --to.
    yield "migrate-to-bogus", ["migrate", "1", "--to", "bo gus"], "unknown destination 'bo gus'"
    yield "migrate-to-nothing", ["migrate", "1"], "required: --to"
    yield "migrate-to-itself", ["migrate", "1", "--to", NOWHERE + "/"], "source host itself"
    yield (
        "migrate-to-itself-by-symlink",
        ["migrate", "1", "--to", "sim:{link}"],
        ("source host itself"),
    )
    # --host.
    yield "host-bogus", ["--host", "bogus", "list"], "unknown host 'bogus'"
    yield "host-sim-without-dir", ["list", "--host", "sim:"], "unknown host 'sim:'"
    # sim start.
    start = ["sim", "start", "--dir"]
    yield "sim-start-no-dir", ["sim", "start"], "required: --dir"
    yield "sim-start-in-proc", [*start, "/proc/torpor-sim"], "virtual file system /proc"
    yield "sim-start-in-sys", [*start, "/sys/torpor-sim"], "virtual file system /sys"
    yield "sim-start-on-a-file", [*start, "{file}"], "it is not a directory"
    yield "sim-start-below-a-file", [*start, "{file}/sub"], "below"
    yield "sim-start-too-long", [*start, "/tmp/" + "d" * 90], "too long"
    yield "sim-start-empty-dir", [*start, ""], "empty"
    if not ROOT:  # root may write anywhere
        yield "sim-start-unwritable", [*start, "{locked}/sub"], "no permission"
    ok_dir = [*start, "{dir}/host"]
    for bad, frag in (
        ("pv:x", "bad count 'x'"),
        ("bogus:1", "unknown guest type 'bogus'"),
        ("pv:5000", "from 0 to 4096"),
        ("pv:-1", "bad count '-1'"),
        ("pv:4000,hvm:100", "more than 4096"),
    ):
        yield f"sim-start-guests-{bad}", [*ok_dir, "--guests", bad], frag
    for bad, frag in (
        ("9=never_ack", "there is no guest 9"),
        ("0=never_ack", "out of range 1..4096"),
        ("1=bogus", "unknown misbehaviour 'bogus'"),
        ("1=slow_ack=nan", "greater than 0"),
        ("1=slow_ack=0", "greater than 0"),
        ("1=slow_ack=-1", "greater than 0"),
        ("1=slow_ack=x", "greater than 0"),
        ("1=slow_ack=9999", "at most 3600"),
        ("never_ack", "DOMID=NAME"),
        ("x=never_ack", "DOMID=NAME"),
        ("1=never_ack=3", "takes no argument"),
    ):
        yield f"sim-start-misbehave-{bad}", [*ok_dir, "--misbehave", bad], frag
    yield "sim-start-misbehave-twice", [
        *ok_dir, "--guests", "pv:2", "--misbehave", "1=never_ack", "--misbehave", "1=vanish"
    ], "two misbehaviours"  # fmt: skip
    yield (
        "sim-start-misbehave-no-guests",
        [*ok_dir, "--guests", "", "--misbehave", "1=vanish"],
        ("no guest 1"),
    )
    for bad in ("nan", "inf", "-1", "x", "3601"):
        yield f"sim-start-freeze-{bad}", [*ok_dir, "--freeze-time", bad], "from 0 to 3600"
    for sub in ("status", "stop"):
        yield f"sim-{sub}-no-dir", ["sim", sub], "required: --dir"
        yield f"sim-{sub}-empty-dir", ["sim", sub, "--dir", ""], "empty"
    # Anything else.
    yield "no-command", [], "required: COMMAND"
    yield "unknown-command", ["frobnicate"], "invalid choice"
    yield "sim-without-subcommand", ["sim"], "required: SUBCOMMAND"
    yield "list-extra-argument", ["list", "extra"], "unrecognized arguments: extra"
    yield "status-two-domids", ["status", "1", "2"], "unrecognized arguments: 2"
    yield "suspend-unknown-option", ["suspend", "1", "--bogus"], "unrecognized arguments"


ROWS = list(_rows())


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("args")
    (d / "notes.txt").write_text("not an image\n")
    os.mkfifo(d / "fifo")
    locked = d / "locked"
    locked.mkdir(mode=0o500)
    from torpor.image import IDENT
    from torpor.xl_savefile import XL_MAGIC

    (d / "old.img").write_bytes(struct.pack(">Q", IDENT) + b"\0" * 24)
    (d / "old.xl").write_bytes(XL_MAGIC + b"\0" * 24)
    (d / "empty").write_bytes(b"")
    link = d / "link"
    link.symlink_to(NOWHERE.removeprefix("sim:"))
    return {
        "file": str(d / "notes.txt"),
        "fifo": str(d / "fifo"),
        "dir": str(d),
        "image": str(d / "old.img"),
        "xl": str(d / "old.xl"),
        "empty": str(d / "empty"),
        "locked": str(locked),
        "link": str(link),
    }


def _fill(argv: list[str], places: dict[str, str]) -> list[str]:
    return [a.format(**places) if "{" in a else a for a in argv]


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Whatever would touch a host records itself and refuses (exit code 4)."""
    touched: list[str] = []

    def trip(what: str) -> Any:
        def tripped(*_a: Any, **_k: Any) -> Any:
            touched.append(what)
            raise BackendUnavailable(f"tripwire: {what}")

        return tripped

    monkeypatch.setattr(Host, "open", classmethod(lambda cls, spec=None: trip("Host.open")()))
    monkeypatch.setattr(daemon, "start", trip("daemon.start"))
    monkeypatch.setattr(daemon, "stop", trip("daemon.stop"))
    import torpor.demo

    monkeypatch.setattr(torpor.demo, "run_demo", trip("run_demo"))
    monkeypatch.delenv("TORPOR_HOST", raising=False)
    return touched


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _with_host(argv: list[str]) -> list[str]:
    """``--host sim:/nonexistent`` where the command takes a host, so that skipped
    validation would be exit code 4 (no host there), not 2."""
    if argv and argv[0] not in ("sim", "demo", "plugins", "frobnicate", "--host"):
        return ["--host", NOWHERE, *argv]
    return argv


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    return lines[0]


@pytest.mark.parametrize(("argv", "fragment"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_a_bad_argument_is_one_line_and_exit_code_2_before_any_host_is_touched(
    argv: list[str],
    fragment: str,
    places: dict[str, str],
    tripwires: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _run(_with_host(_fill(argv, places)), capsys)
    assert code == EXIT_USAGE, (code, out, err)
    line = _one_line(err)
    assert line.startswith("torpor") and ": error: " in line, line
    assert fragment in line, line
    assert "Traceback" not in err and out == ""
    assert tripwires == []


def test_nothing_is_created_by_a_refused_sim_start(
    places: dict[str, str], tripwires: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    target = Path(places["dir"], "never")
    code, _, _ = _run(["sim", "start", "--dir", str(target), "--misbehave", "2=vanish"], capsys)
    assert code == EXIT_USAGE and not target.exists()


@pytest.mark.parametrize("existing", ["image", "xl", "empty"])
def test_save_may_replace_an_image_or_an_empty_file(
    existing: str,
    places: dict[str, str],
    tripwires: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _run(["--host", NOWHERE, "save", "1", places[existing]], capsys)
    assert code == EXIT_BACKEND, err  # past validation: it went on to open the host
    assert tripwires == ["Host.open"]


@pytest.mark.parametrize("existing", ["file", "fifo"])
def test_save_force_replaces_anything_but_a_directory(
    existing: str,
    places: dict[str, str],
    tripwires: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _run(["--host", NOWHERE, "save", "1", places[existing], "--force"], capsys)
    assert code == EXIT_BACKEND, err
    assert tripwires == ["Host.open"]
    code, _, err = _run(["--host", NOWHERE, "save", "1", places["dir"], "--force"], capsys)
    assert code == EXIT_USAGE and "is a directory" in err


@pytest.mark.skipif(ROOT, reason="root may read and write anything")
def test_unreadable_and_unwritable_places(
    places: dict[str, str], tripwires: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    secret = Path(places["dir"], "secret.img")
    secret.write_bytes(b"x")
    secret.chmod(0)
    code, _, err = _run(["--host", NOWHERE, "restore", str(secret)], capsys)
    assert code == EXIT_USAGE and "no permission to read" in _one_line(err)
    code, _, err = _run(["--host", NOWHERE, "save", "1", f"{places['locked']}/x.img"], capsys)
    assert code == EXIT_USAGE and "no permission to create files" in _one_line(err)
    assert tripwires == []


def test_a_good_domid_with_no_host_there_is_exit_code_4_not_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The counterpart of the table: the same host spec, valid arguments -> the host's error.
    monkeypatch.delenv("TORPOR_HOST", raising=False)
    code, _, err = _run(["--host", NOWHERE, "suspend", "1", "--ack-timeout", "2"], capsys)
    assert code == EXIT_BACKEND and "no simulated host" in err


SUBPROCESS_ROWS = [
    r
    for r in ROWS
    if r[0]
    in (
        "suspend-domid-'-1'",
        "suspend-domid-'99999999999'",
        "suspend-domid-'0'",
        "suspend--ack-timeout=nan",
        "checkpoint-count-'0'",
        "sim-start-in-proc",
        "sim-start-below-a-file",
        "sim-start-misbehave-9=never_ack",
        "save-over-a-foreign-file",
        "restore-missing",
        "list-takes-no-deadline",
        "migrate-to-itself",
    )
]


@pytest.mark.parametrize(
    ("argv", "fragment"), [r[1:] for r in SUBPROCESS_ROWS], ids=[r[0] for r in SUBPROCESS_ROWS]
)
def test_as_a_user_types_it_no_traceback_reaches_the_terminal(
    argv: list[str], fragment: str, places: dict[str, str]
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORPOR_HOST"}
    r = subprocess.run(
        [sys.executable, "-m", "torpor", *_with_host(_fill(argv, places))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert r.returncode == EXIT_USAGE, r
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert fragment in _one_line(r.stderr)


def test_subprocess_rows_are_all_in_the_table() -> None:
    assert len(SUBPROCESS_ROWS) == 12


# --------------------------------------------------------------------------- polish


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["--version"], capsys)
    assert code == EXIT_OK and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"torpor {torpor.__version__} (Python ")
    # Then the Xen libraries it finds, and the hypervisor (tests/test_packaging.py).
    assert [x.split(":")[0] for x in lines[1:]] == [
        "libxenctrl.so.4.17",
        "libxenguest.so.4.17",
        "libxenlight.so.4.17",
        "Xen hypervisor",
    ]
    # One source: the installed distribution's metadata says the same.
    assert torpor.__version__ == importlib.metadata.version("torpor")


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    def walk(
        p: argparse.ArgumentParser, path: str
    ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")

    yield from walk(build_parser(), "torpor")


def test_every_argument_has_help_and_every_command_a_description() -> None:
    missing = []
    for path, parser in _parsers():
        if not parser.description:
            missing.append(f"{path}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path}: {action.option_strings or action.metavar or action.dest}")
    assert not missing, missing


def test_help_shows_defaults_and_ranges() -> None:
    helps = dict(_parsers())
    checkpoint = helps["torpor checkpoint"].format_help()
    assert "default 1;" in checkpoint and "default 0)" in checkpoint
    assert f"1 to {DOMID_FIRST_RESERVED - 1}" in helps["torpor suspend"].format_help()
    assert "default pv:1" in helps["torpor sim start"].format_help()


def test_common_options_are_shown_only_where_they_apply() -> None:
    options = {path: {o for a in p._actions for o in a.option_strings} for path, p in _parsers()}
    for path, opts in options.items():
        command = path.removeprefix("torpor").strip()
        if not command or command in ("sim", "host"):
            continue
        assert ("--ack-timeout" in opts) == (command in SUSPENDING), path
        assert ("--suspend-timeout" in opts) == (command in SUSPENDING), path
        on_host = command not in ("demo",) and not command.startswith("sim")
        assert ("-p" in opts) == on_host, path
        assert ("--no-plugin" in opts) == on_host, path
        assert ("--host" in opts) == on_host, path
        assert "--json" in opts, path


def _built(parser: argparse.ArgumentParser) -> set[str]:
    """The subcommands whose parsers exist (a lazy one is built when looked up)."""
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {n for n, p in sub.choices._parsers.items() if isinstance(p, argparse.ArgumentParser)}  # type: ignore[attr-defined]


def test_only_the_chosen_command_is_built(capsys: pytest.CaptureFixture[str]) -> None:
    # Each parser argparse builds costs a formatter per argument: one process runs
    # one command, so only its parser is made.
    parser = build_parser()
    assert _built(parser) == set()
    args, extras = parser.parse_known_args(["--json", "suspend", "3", "--all"])
    assert (args.command, args.domids, args.all, args.json, extras) == (
        "suspend",
        [3],
        True,
        True,
        [],
    )
    assert _built(parser) == {"suspend"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    help_ = capsys.readouterr().out
    assert all(name in help_ for name in ("checkpoint", "migrate-receive", "host", "sim"))
    assert _built(parser) == {"suspend"}  # the list of commands needs no parser
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["resum", "1"])
    assert e.value.code == EXIT_USAGE
    assert "invalid choice: 'resum'" in capsys.readouterr().err
    assert _built(parser) == {"suspend"}


def test_a_nested_command_is_built_when_its_group_is_chosen() -> None:
    args = build_parser().parse_args(["host", "save-all", "--dir", "/tmp", "--concurrency", "2"])
    assert (args.command, args.host_command, args.concurrency) == ("host", "save-all", 2)
    args = build_parser().parse_args(["sim", "status", "--dir", "/tmp"])
    assert (args.command, args.sim_command) == ("sim", "status")

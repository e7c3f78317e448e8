"""A stand-in for ``ssh`` to a simulated host: ``python -m torpor_sim.ssh DIR COMMAND...``.

``xl migrate -s CMD`` (and ``torpor migrate --ssh-command CMD``) runs ``exec
CMD HOST xl [xl options] migrate-receive [flags]``.  With this module as CMD
and a simulated host's directory as HOST, the "remote" command runs on that
host: ``xl ... migrate-receive`` becomes ``torpor --host sim:DIR
migrate-receive`` (a simulated host's xl is torpor), its ``-e``/``-d`` kept
and ``-p`` given as ``--paused``.  Anything else is run as given, with
``TORPOR_HOST=sim:DIR``.  stdin, stdout and stderr are the caller's: the
process replaces itself (``exec``), as ssh's remote command would be
connected.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main", "remote_argv"]


def remote_argv(directory: str, command: list[str]) -> list[str]:
    """The argv that runs ``command`` "on" the simulated host in ``directory``."""
    if command and command[0] == "xl" and "migrate-receive" in command:
        at = command.index("migrate-receive")
        xl = {"-e": "-e", "-d": "-d", "-F": "-F", "-p": "--paused"}  # -p is --plugin in torpor
        flags = [xl[f] for f in command[at + 1 :] if f in xl]
        return [
            sys.executable,
            "-m",
            "torpor",
            "--host",
            f"sim:{directory}",
            "migrate-receive",
            *flags,
        ]
    return command


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m torpor_sim.ssh DIR COMMAND...", file=sys.stderr)
        return 255  # what ssh exits with on its own errors
    directory, command = args[0], args[1:]
    run = remote_argv(directory, command)
    os.environ["TORPOR_HOST"] = f"sim:{directory}"
    try:
        os.execvp(run[0], run)
    except OSError as e:
        print(f"torpor_sim.ssh: cannot run {run[0]}: {e.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

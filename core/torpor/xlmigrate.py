"""xl's migration protocol (tools/xl/xl_migrate.c, Xen 4.17), both ends' transport.

The sender runs ``sh -c "exec SSH HOST xl migrate-receive"`` (xl's ``-s``;
with an empty ssh command, ``HOST`` is the whole command) and talks to it on
the child's stdin/stdout; the receiver (``xl migrate-receive``, or ``torpor
migrate-receive``) answers on its own stdout::

    receiver  "xl migration receiver ready, send binary domain data.\\n"   (no NUL)
    sender    the save stream: xl's header and config, then libxl's stream
              (on a simulated host: torpor's image, live or not)
    receiver  "domain received, ready to unpause\\0"       (the domain is built, paused)
    sender    renames the source NAME--migratedaway, then
              "domain is yours, you are cleared to unpause\\0"         (no way back)
    receiver  renames its NAME--incoming NAME, unpauses it, then
              "my copy unpause results are as follows\\0" and one octet:
              0 -- it runs: the sender destroys the source;
              else (-rc of libxl) -- it destroyed its copy and then sends
              "domain is yours, you are cleared to unpause\\0" back: the
              sender renames the source back and resumes it.

The byte strings are xl.h's ``migrate_receiver_banner`` (written without its
NUL), ``migrate_receiver_ready``, ``migrate_permission_to_go`` and
``migrate_report`` (written with theirs: ``sizeof``).  Every read here has a
deadline; a receiver that dies is an EOF, a write to it ``EPIPE``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import shlex
import subprocess
import threading
import time
from typing import Final

from torpor.errors import MigrationFailed, Timeout

__all__ = [
    "BANNER",
    "GO",
    "READY",
    "REPORT",
    "Channel",
    "ReceiverProcess",
    "parse_target",
    "rune",
]

#: xl.h migrate_receiver_banner (sent without its NUL: sizeof - 1)
BANNER: Final = b"xl migration receiver ready, send binary domain data.\n"
#: xl.h migrate_receiver_ready (sizeof: with its NUL)
READY: Final = b"domain received, ready to unpause\0"
#: xl.h migrate_permission_to_go
GO: Final = b"domain is yours, you are cleared to unpause\0"
#: xl.h migrate_report, followed by one status octet
REPORT: Final = b"my copy unpause results are as follows\0"


class ProtocolError(MigrationFailed):
    """The other end of a migration went away, said something else, or nothing in time."""


def parse_target(text: str) -> str | None:
    """The host of a migration target that goes over xl's protocol (``xl://HOST``,
    or a bare host name such as ``localhost``), or ``None`` (``sim:DIR``, ``xen``)."""
    if text.startswith("xl://"):
        host = text[5:]
        return host or None
    if text == "xen" or text.startswith("sim:") or not text:
        return None
    if all(c.isalnum() or c in ".-_:[]" for c in text) and not text.startswith("-"):
        return text
    return None


def rune(ssh_command: str, host: str, receive_flags: str = "") -> str:
    """The shell command xl runs for ``xl migrate -s SSH DOMAIN HOST``
    (main_migrate: ``exec %s %s xl migrate-receive%s``; an empty ssh command
    makes ``HOST`` the whole command)."""
    if not ssh_command:
        return host
    return f"exec {ssh_command} {shlex.quote(host)} xl migrate-receive{receive_flags}"


class Channel:
    """The protocol's two descriptors: ``send_fd`` to the other end, ``recv_fd`` from it.

    Reads are exact (``os.read``, never buffered past what is asked: the save
    stream and the messages share the descriptor) and bounded by a deadline.
    """

    def __init__(self, send_fd: int, recv_fd: int, *, peer: str = "migration receiver") -> None:
        self.send_fd = send_fd
        self.recv_fd = recv_fd
        self.peer = peer

    def read_exact(self, n: int, what: str, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        buf = bytearray()
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(
                        f"the {self.peer} sent no {what} within {timeout:g}s", deadline=timeout
                    )
                ready, _, _ = select.select([self.recv_fd], [], [], left)
                if not ready:
                    continue
            try:
                chunk = os.read(self.recv_fd, n - len(buf))
            except OSError as e:
                raise ProtocolError(
                    f"reading the {what} from the {self.peer} failed: {e.strerror or e}", cause=e
                ) from e
            if not chunk:
                raise ProtocolError(
                    f"the {self.peer} closed the stream before its {what} "
                    f"({len(buf)} of {n} octets)"
                )
            buf += chunk
        return bytes(buf)

    def expect(self, message: bytes, what: str, timeout: float | None) -> None:
        """Read ``message`` exactly (xl's migrate_read_fixedmessage)."""
        got = self.read_exact(len(message), what, timeout)
        if got != message:
            raise ProtocolError(
                f"{self.peer} stream contained unexpected data instead of {what}: {got[:60]!r}"
            )

    def write_all(self, data: bytes, what: str) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.send_fd, view)
                view = view[n:]
        except OSError as e:
            gone = " (it is gone)" if e.errno == errno.EPIPE else ""
            raise ProtocolError(
                f"sending the {what} to the {self.peer} failed: {e.strerror or e}{gone}", cause=e
            ) from e


class ReceiverProcess:
    """The migration transport process: ``sh -c RUNE`` with pipes on its stdin/stdout
    (xl's create_migration_child).  Its stderr is kept (the last lines) for errors."""

    def __init__(self, command: str, *, env: dict[str, str] | None = None) -> None:
        self.command = command
        self._lines: collections.deque[str] = collections.deque(maxlen=20)
        try:
            self.proc = subprocess.Popen(
                ["sh", "-c", command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                close_fds=True,
                env=env,
            )
        except OSError as e:
            raise ProtocolError(f"cannot run {command!r}: {e.strerror or e}", cause=e) from e
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.channel = Channel(self.proc.stdin.fileno(), self.proc.stdout.fileno())
        self._reader = threading.Thread(target=self._drain, name="migration-stderr", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self._lines.append(raw.decode(errors="replace").rstrip())

    def stderr_tail(self) -> str:
        """What the receiver last said on its stderr (for an error message)."""
        lines = [x for x in list(self._lines) if x.strip()]
        return " | ".join(lines[-6:])

    def close_send(self) -> None:
        """No more to send (the receiver sees EOF)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def finish(self, timeout: float = 10.0) -> int | None:
        """Close our ends and wait for it to exit (killed past ``timeout``, as xl
        stops waiting after 2 s); its exit status."""
        self.close_send()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self._reader.join(2)
        return code

    def why(self, error: str) -> str:
        """``error``, with what the receiver said and how it ended, if it did."""
        code = self.proc.poll()
        ended = "" if code is None else f"; the receiver exited with status {code}"
        said = self.stderr_tail()
        return f"{error}{ended}" + (f" (it said: {said})" if said else "")

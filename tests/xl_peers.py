"""Stand-ins for ``ssh HOST xl migrate-receive`` that misbehave, for the protocol's
failure paths (``--ssh-command "python tests/xl_peers.py MODE"``).

``xl_peers.py MODE DIR xl ... migrate-receive [flags]``, where DIR is a
simulated host's directory.  The fake receivers speak xl's protocol from the
byte strings of xl.h (tools/xl/xl.h, 4.17), typed here independently of
torpor's own:

``cut=N``           run ``torpor migrate-receive`` on DIR, pass it the first N
                    octets of the stream, then kill it (SIGKILL) and exit:
                    the receiver dies mid-stream
``plugin=NAME``     run ``torpor -p NAME migrate-receive`` on DIR
``pidfile=PATH``    run ``torpor migrate-receive`` on DIR, its pid written to PATH
                    first (a test waits for it to end: it outlives a killed sender)
``silent-after-go`` read the stream, say ready, take permission to go, then
                    exit without a report (xl's "failed during final handshake")
``refuse``          read the stream, say ready, take permission to go, report
                    status 3 (ERROR_FAIL) and give the domain back
``garbage``         answer something that is not the banner
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

BANNER = b"xl migration receiver ready, send binary domain data.\n"  # sizeof - 1
READY = b"domain received, ready to unpause\x00"  # sizeof
GO = b"domain is yours, you are cleared to unpause\x00"
REPORT = b"my copy unpause results are as follows\x00"


def read_exact(n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            sys.exit(f"xl_peers: EOF after {len(buf)} of {n} octets")
        buf += chunk
    return buf


def write(data: bytes) -> None:
    while data:
        data = data[os.write(1, data) :]


def read_stream() -> None:
    """torpor's image up to its END record (header 16, records <IIII + body + pad)."""
    import struct

    read_exact(16)
    while True:
        rtype, length, _crc, _r = struct.unpack("<IIII", read_exact(16))
        if rtype == 0:
            read_exact(length)
            return
        read_exact(length + (-length % 8))


def receiver(directory: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torpor", "--host", f"sim:{directory}", *extra, "migrate-receive"]


def main() -> int:
    mode, directory = sys.argv[1], sys.argv[2]
    if mode.startswith("pidfile="):
        Path(mode.split("=", 1)[1]).write_text(f"{os.getpid()}\n")
        os.execvp(sys.executable, receiver(directory))
    if mode.startswith("plugin="):
        os.execvp(sys.executable, receiver(directory, "-p", mode.split("=", 1)[1]))
    if mode.startswith("cut="):
        limit = int(mode.split("=", 1)[1])
        child = subprocess.Popen(receiver(directory), stdin=subprocess.PIPE, bufsize=0)
        assert child.stdin is not None
        passed = 0
        while passed < limit:
            chunk = os.read(0, min(65536, limit - passed))
            if not chunk:
                break
            child.stdin.write(chunk)
            passed += len(chunk)
        child.send_signal(signal.SIGKILL)
        child.wait()
        return 1
    if mode == "garbage":
        write(b"Welcome to a host that speaks no xl\n" + b"x" * 40)
        return 1
    write(BANNER)
    read_stream()
    write(READY)
    if read_exact(len(GO)) != GO:
        return 1
    if mode == "silent-after-go":
        return 1
    if mode == "refuse":
        write(REPORT + b"\x03")
        write(GO)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Say which Debian package the test suite needs and this machine lacks.

The tests drive real parts: QEMU device models, Xen's own C xenstore client
tools, and libxenctrl's headers for the cffi backend.  A missing one is named
here, with the command that installs it, instead of surfacing later as an
obscure failure deep inside a test.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

#: (Debian package, what proves it is installed, why the tests need it)
REQUIRED: list[tuple[str, str, str]] = [
    ("qemu-system-x86", "bin:qemu-system-x86_64", "HVM guests' device models run as real QEMU"),
    ("xenstore-utils", "bin:xenstore-read", "the C xenstore client tools test the sim xenstored"),
    ("libxen-dev", "file:/usr/include/xenctrl.h", "the cffi xenctrl backend is checked against it"),
    ("gcc", "bin:gcc", "cffi compiles the backend's declarations against libxen-dev's headers"),
    ("python3-dev", "pyinclude:Python.h", "cffi's API mode builds a CPython extension"),
    ("systemd", "bin:systemd-analyze", "systemd-analyze verify checks contrib's torpor-host unit"),
]


def missing() -> list[tuple[str, str]]:
    out = []
    for package, probe, why in REQUIRED:
        kind, _, what = probe.partition(":")
        if kind == "bin":
            present = shutil.which(what) is not None
        elif kind == "pyinclude":  # this interpreter's C headers
            present = os.path.exists(os.path.join(sysconfig.get_paths()["include"], what))
        else:
            present = os.path.exists(what)
        if not present:
            out.append((package, why))
    return out


def main() -> int:
    absent = missing()
    if not absent:
        print("check-system:", ", ".join(p for p, _, _ in REQUIRED), "present")
        return 0
    print("check-system: missing Debian packages the tests need:", file=sys.stderr)
    for package, why in absent:
        print(f"  - {package}: {why}", file=sys.stderr)
    names = " ".join(p for p, _ in absent)
    print(f"install them with:  sudo apt-get install -y {names}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""What ``torpor --version`` says: torpor's version and the Xen it can find.

torpor's version lives in one place, ``torpor.__version__`` (pyproject.toml
reads it from there: setuptools' dynamic version).  The Xen libraries are
looked for by the sonames the backends load (``dlopen``, which prints
nothing), and the hypervisor's own version is asked through libxenctrl
(``xc_version``) where a hypervisor answers -- opened with torpor's quiet
logger, so nothing reaches stderr on a machine without Xen.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["XEN_LIBRARIES", "hypervisor_version", "version_text", "xen_libraries"]

#: The Xen libraries torpor's real-Xen backends load (torpor.hypervisor.xenctrl
#: and torpor.hypervisor.libxl), by soname.
XEN_LIBRARIES = ("libxenctrl.so.4.17", "libxenguest.so.4.17", "libxenlight.so.4.17")


def _mapped_file(soname: str) -> str | None:
    """The file the dynamic loader mapped for ``soname`` (its real name, which
    carries the library's full version: ``libxenctrl.so.4.17.0``)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                base = os.path.basename(path)
                if base == soname or base.startswith(soname + "."):
                    return path
    except OSError:
        pass
    return None


def xen_libraries() -> dict[str, str]:
    """soname -> the file loaded for it, or ``"not found"``."""
    out: dict[str, str] = {}
    for soname in XEN_LIBRARIES:
        try:
            ctypes.CDLL(soname)
        except OSError:
            out[soname] = "not found"
            continue
        out[soname] = _mapped_file(soname) or "found"
    return out


def hypervisor_version() -> str:
    """``4.17.7`` (xc_version), or why it cannot be read here (``not found: ...``)."""
    from torpor.errors import TorporError

    try:
        from torpor.hypervisor.xenctrl import XenctrlHypervisor

        with XenctrlHypervisor() as hv:
            return hv.xen_version()
    except TorporError as e:
        return f"not found ({e.message})"


def version_text() -> str:
    """The lines ``torpor --version`` prints."""
    from torpor import __version__

    py = sys.version.split()[0]
    lines = [f"torpor {__version__} (Python {py})"]
    for soname, where in xen_libraries().items():
        lines.append(f"{soname}: {where}")
    lines.append(f"Xen hypervisor: {hypervisor_version()}")
    return "\n".join(lines)

"""Host Debian packages the lab needs: found, installed when root, else named."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .util import LabError, is_root, log, run

#: Debian package -> (program that proves it is there, why the lab needs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "qemu-system-x86": ("qemu-system-x86_64", "boots Xen + dom0 under TCG"),
    "debootstrap": ("debootstrap", "builds the dom0 root filesystem"),
    "cpio": ("cpio", "packs the dom0 and guest initramfs"),
    "zstd": ("zstd", "compresses the dom0 initramfs"),
}

BOOT = ("qemu-system-x86",)
BUILD = ("debootstrap", "cpio", "zstd")

_SBIN = ("/usr/sbin", "/sbin")


def which(prog: str) -> str | None:
    # Non-root PATHs often lack sbin, where debootstrap lives.
    found = shutil.which(prog)
    if found:
        return found
    for d in _SBIN:
        p = Path(d, prog)
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def missing(names: tuple[str, ...]) -> list[str]:
    return [p for p in names if which(PACKAGES[p][0]) is None]


def apt_install(packages: list[str], logfile: Path | None = None) -> None:
    """apt-get install as root; refresh the package lists once if they are stale."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    try:
        run(cmd, timeout=900, logfile=logfile, env=env, what="apt-get install")
    except LabError:
        # A fresh machine may never have run apt-get update.
        run(
            ["apt-get", "update", "-q"],
            timeout=600,
            logfile=logfile,
            env=env,
            what="apt-get update",
        )
        run(cmd, timeout=900, logfile=logfile, env=env, what="apt-get install")


def ensure(names: tuple[str, ...], purpose: str, logfile: Path | None = None) -> None:
    absent = missing(names)
    if not absent:
        return
    why = "; ".join(f"{p}: {PACKAGES[p][1]}" for p in absent)
    if not is_root():
        raise LabError(
            f"missing host packages for {purpose} ({why}).\n"
            f"  install them with:  sudo apt-get install -y {' '.join(absent)}"
        )
    log(f"installing host packages: {' '.join(absent)}")
    apt_install(absent, logfile)
    still = missing(names)
    if still:
        raise LabError(f"apt-get installed {' '.join(absent)} but {' '.join(still)} still missing")


def _has_pip(python: str) -> bool:
    try:
        r = subprocess.run(
            [python, "-m", "pip", "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def pip_command(logfile: Path | None = None) -> list[str]:
    """A pip to download dom0's wheels with (any CPython 3 host pip will do:
    the target interpreter and platform are given explicitly)."""
    for python in (sys.executable, "/usr/bin/python3"):
        if python and Path(python).exists() and _has_pip(python):
            return [python, "-m", "pip"]
    if not is_root():
        raise LabError(
            "no pip on this host (needed to fetch torpor's Python dependencies for dom0).\n"
            "  install it with:  sudo apt-get install -y python3-pip"
        )
    log("installing host package: python3-pip")
    apt_install(["python3-pip"], logfile)
    if _has_pip("/usr/bin/python3"):
        return ["/usr/bin/python3", "-m", "pip"]
    raise LabError("apt-get installed python3-pip but `/usr/bin/python3 -m pip` still fails")

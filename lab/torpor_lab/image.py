"""The dom0 image: its recipe, the recipe's hash, and the cached build.

Everything comes from Debian's archive (bookworm + updates + security):
  - xen-hypervisor-4.17-amd64 and the current linux-image-6.1 are downloaded
    and unpacked, never installed (no boot hooks run);
  - dom0's root is `debootstrap --variant=minbase` plus the Xen tools, Python
    and qemu-system-xen + seabios for HVM guests, packed as a zstd cpio
    initramfs with only the kernel modules dom0 loads;
  - the guests boot the same kernel with a tiny busybox initramfs (guest/init).

A built image is a directory `image-<hash>` in the cache, <hash> covering the
files in RECIPE_FILES (this module included), so editing the recipe rebuilds
it and nothing else does.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from . import hostdeps
from .util import LabError, fmt_s, is_root, log, run

SUITE = "bookworm"
MIRROR = os.environ.get("TORPOR_LAB_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get(
    "TORPOR_LAB_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)

#: installed in dom0 (security suite enabled, so the tools match the 4.17.7
#: hypervisor); qemu-system-xen + seabios are the HVM device model and BIOS;
#: qemu-guest-agent is not run in dom0: its qemu-ga (and the shared libraries
#: it needs) goes into the HVM guests' second initramfs (guest-initrd-qga.img).
DOM0_PACKAGES = (
    "xen-utils-4.17",
    "xenstore-utils",
    "python3",
    "qemu-system-xen",
    "seabios",
    "busybox-static",
    "kmod",
    "qemu-guest-agent",
)
#: the QEMU guest agent copied into guest-initrd-qga.img
QGA_BINARY = "usr/sbin/qemu-ga"
XEN_PACKAGE = "xen-hypervisor-4.17-amd64"
KERNEL_META = "linux-image-amd64"

#: modules dom0's init loads; their dependencies are added from modules.dep.
DOM0_MODULES = (
    "xen-evtchn",
    "xen-gntdev",
    "xen-gntalloc",
    "xen-privcmd",
    "xenfs",
    "xen-blkback",
    "xen-netback",
    "tun",
    "virtio_pci",  # the transport of the 9p shares
    "9pnet_virtio",
    "9p",
)
#: dropped from dom0's root: not needed at run time, ~290 MB of the ~500.
STRIP = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log/apt",
)
#: where the guest kernel and initramfs live inside dom0
GUEST_DIR = "var/lib/torpor-lab"

#: the files whose content defines the image (paths relative to lab/)
RECIPE_FILES = ("torpor_lab/image.py", "dom0/init", "guest/init")


def recipe_hash(lab_dir: Path) -> str:
    h = hashlib.sha256()
    for rel in RECIPE_FILES:
        h.update(rel.encode() + b"\0" + (lab_dir / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    dir: Path

    @property
    def xen(self) -> Path:
        return self.dir / "xen.elf"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "dom0.cpio.zst"

    @property
    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.dir / "manifest.json").read_text())
        return data


def cached(cache: Path, lab_dir: Path) -> Image | None:
    d = cache / f"image-{recipe_hash(lab_dir)}"
    return Image(d) if (d / "manifest.json").is_file() else None


def build(cache: Path, lab_dir: Path, logfile: Path) -> Image:
    """Build the image for the current recipe into the cache (needs root)."""
    if not is_root():
        raise LabError(
            "the dom0 image for this recipe is not cached and building it needs root "
            "(debootstrap, chroot).\n  build it once with:  sudo lab/run build"
        )
    hostdeps.ensure(hostdeps.BUILD, "building the dom0 image", logfile)
    key = recipe_hash(lab_dir)
    t0 = time.monotonic()
    work = cache / "build"
    if work.exists():
        shutil.rmtree(work)
    out = work / "out"
    out.mkdir(parents=True)
    root = work / "root"
    logfile.write_text("")

    log(f"debootstrap {SUITE} (minbase) from {MIRROR}")
    run(
        ["debootstrap", "--variant=minbase", SUITE, root, MIRROR],
        timeout=1200,
        logfile=logfile,
        what="debootstrap",
    )
    _configure_apt(root)
    log(f"installing dom0 packages: {' '.join(DOM0_PACKAGES)}")
    _chroot(root, ["apt-get", "update", "-q"], logfile, 600)
    _chroot(
        root,
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DOM0_PACKAGES],
        logfile,
        1200,
    )

    abi = _kernel_package(root, logfile)
    log(f"downloading {XEN_PACKAGE} and {abi} (unpacked, not installed)")
    (root / "tmp/debs").mkdir(parents=True)
    _chroot(root, ["sh", "-c", f"cd /tmp/debs && apt-get download {XEN_PACKAGE} {abi}"], logfile)
    versions = {}
    for deb in sorted((root / "tmp/debs").glob("*.deb")):
        inside = f"/tmp/debs/{deb.name}"
        name = _chroot(root, ["dpkg-deb", "-f", inside, "Package"], logfile).strip()
        versions[name] = _chroot(root, ["dpkg-deb", "-f", inside, "Version"], logfile).strip()
        _chroot(root, ["dpkg-deb", "-x", inside, "/tmp/pkg"], logfile)
    pkg = root / "tmp/pkg"
    for name in ("xen-utils-4.17", "qemu-system-xen", "python3", "seabios", "qemu-guest-agent"):
        q = ["dpkg-query", "-W", "-f", "${Version}", name]
        versions[name] = _chroot(root, q, logfile).strip()

    # The hypervisor: gunzipped, it is a multiboot ELF QEMU's -kernel boots.
    with gzip.open(pkg / "boot/xen-4.17-amd64.gz") as src, (out / "xen.elf").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    kvers = sorted(p.name for p in (pkg / "lib/modules").iterdir())
    if len(kvers) != 1:
        raise LabError(f"expected one kernel in {abi}, found {kvers}")
    kver = kvers[0]
    shutil.copy2(pkg / f"boot/vmlinuz-{kver}", out / "vmlinuz")
    guest_dir = root / GUEST_DIR
    guest_dir.mkdir(parents=True)
    shutil.copy2(pkg / f"boot/vmlinuz-{kver}", guest_dir / "vmlinuz")

    nmods = _install_modules(root, kver, logfile)
    _guest_initrd(root, lab_dir, guest_dir / "guest-initrd.img", logfile)
    _guest_initrd(root, lab_dir, guest_dir / "guest-initrd-qga.img", logfile, agent=True)
    shutil.copy2(lab_dir / "dom0/init", root / "init")
    (root / "init").chmod(0o755)

    _chroot(root, ["apt-get", "clean"], logfile)
    (root / "usr/sbin/policy-rc.d").unlink()
    for rel in (*STRIP, "tmp"):
        p = root / rel
        if p.exists():
            shutil.rmtree(p)
            p.mkdir(mode=0o1777 if rel == "tmp" else 0o755)

    log("packing dom0 initramfs (cpio | zstd)")
    run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            "find . -mindepth 1 -print0 | cpio --null -o -H newc -R 0:0 --quiet "
            f"| zstd -q -T0 -6 -o {out / 'dom0.cpio.zst'}",
        ],
        cwd=root,
        timeout=900,
        logfile=logfile,
        what="pack dom0 initramfs",
    )
    took = time.monotonic() - t0
    manifest = {
        "recipe": key,
        "kernel": kver,
        "versions": versions,
        "dom0_modules": nmods,
        "initrd_bytes": (out / "dom0.cpio.zst").stat().st_size,
        "build_seconds": round(took, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    final = cache / f"image-{key}"
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    shutil.rmtree(work)
    for old in cache.glob("image-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    log(
        f"image {key}: xen {versions.get(XEN_PACKAGE)}, linux {kver}, "
        f"initramfs {manifest['initrd_bytes'] / 1e6:.0f} MB, built in {fmt_s(took)}"
    )
    return Image(final)


def _chroot(root: Path, cmd: list[str], logfile: Path, timeout: float = 300) -> str:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
        "HOME": "/root",
    }
    return run(["chroot", root, *cmd], timeout=timeout, logfile=logfile, env=env, what=cmd[0])


def _configure_apt(root: Path) -> None:
    (root / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY_MIRROR} {SUITE}-security main\n"
    )
    # No service may start inside the build chroot.
    rc = root / "usr/sbin/policy-rc.d"
    rc.write_text("#!/bin/sh\nexit 101\n")
    rc.chmod(0o755)


def _kernel_package(root: Path, logfile: Path) -> str:
    """The linux-image-6.1.0-N-amd64 that linux-image-amd64 points at now."""
    out = _chroot(root, ["apt-cache", "depends", KERNEL_META], logfile)
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            return dep
    raise LabError(f"cannot resolve {KERNEL_META}:\n{out}")


def _install_modules(root: Path, kver: str, logfile: Path) -> int:
    """Copy DOM0_MODULES and what they depend on into dom0; run depmod."""
    pkg = root / "tmp/pkg"
    _chroot(root, ["depmod", "-b", "/tmp/pkg", kver], logfile)
    src = pkg / "lib/modules" / kver
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (src / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        name = Path(path).name.removesuffix(".ko").replace("-", "_")
        deps[name] = (path, rest.split())
    by_path = {path: name for name, (path, _) in deps.items()}
    want = [m.replace("-", "_") for m in DOM0_MODULES]
    missing = [m for m in want if m not in deps]
    if missing:
        raise LabError(f"kernel {kver} has no module(s) {missing}")
    closure: set[str] = set()
    stack = list(want)
    while stack:
        m = stack.pop()
        if m in closure:
            continue
        closure.add(m)
        stack.extend(by_path[d] for d in deps[m][1])
    dst = root / "lib/modules" / kver
    for m in closure:
        rel = deps[m][0]
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)
    _chroot(root, ["depmod", kver], logfile)
    return len(closure)


def _resolve_in(root: Path, path: str) -> Path:
    """`path` inside the chroot `root`, every symlink (absolute ones too) followed there."""
    parts = [p for p in path.split("/") if p]
    cur = root
    for _ in range(256):
        if not parts:
            return cur
        nxt = cur / parts.pop(0)
        if nxt.is_symlink():
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = root
            parts = [p for p in target.split("/") if p] + parts
            continue
        cur = nxt
    raise LabError(f"too many symlinks resolving {path} in {root}")


def _guest_initrd(
    root: Path, lab_dir: Path, dest: Path, logfile: Path, *, agent: bool = False
) -> None:
    """The guests' busybox initramfs; with `agent`, plus Debian's qemu-ga.

    qemu-ga is dynamically linked: it goes in with every shared object
    `ldd` names (the loader included) at the same paths.  Only guests that
    use it boot this bigger image (HVM firmware loads the initramfs through
    fw_cfg's I/O port, slowly under TCG).
    """
    stage = root / ("tmp/guest-qga" if agent else "tmp/guest")
    for d in ("bin", "proc", "sys", "dev", "run", "tmp"):
        (stage / d).mkdir(parents=True)
    # The kernel opens /dev/console for init before anything is mounted.
    os.mknod(stage / "dev/console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    busybox = root / "bin/busybox"
    if not busybox.exists():
        raise LabError("busybox-static did not install /bin/busybox in the dom0 root")
    shutil.copy2(busybox, stage / "bin/busybox")
    shutil.copy2(lab_dir / "guest/init", stage / "init")
    (stage / "init").chmod(0o755)
    if agent:
        qga = root / QGA_BINARY
        if not qga.exists():
            raise LabError(f"qemu-guest-agent did not install /{QGA_BINARY} in the dom0 root")
        wanted = [f"/{QGA_BINARY}"]
        for line in _chroot(root, ["ldd", f"/{QGA_BINARY}"], logfile).splitlines():
            # "libglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x...)"
            # "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file
            parts = line.split()
            path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts else ""
            if path.startswith("/"):
                wanted.append(path)
        for path in wanted:
            dst = stage / path.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_resolve_in(root, path), dst)  # the file, not the symlink
        log(f"guest initramfs with qemu-ga: {len(wanted)} files")
    run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"find . -mindepth 1 | cpio -o -H newc -R 0:0 --quiet | gzip -9 > {dest}",
        ],
        cwd=stage,
        timeout=120,
        logfile=logfile,
        what="pack guest initramfs",
    )

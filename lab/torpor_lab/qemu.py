"""Boot the lab's Xen + dom0 under QEMU (TCG) and follow its serial console.

The boot line is the one known to work on these machines (docs/real-xen.md):
KVM is unusable here, `-cpu max` exposes SVM so HVM/PVH guests run (minus
XSAVE/AVX, see CPU), and Xen needs smap=0 smep=0 under TCG.  Xen is booted as
a multiboot kernel; dom0's kernel and initramfs are its modules.

The console is read from QEMU's stdout with select(): dom0's init prints
"TORPOR-LAB ready|done|fail" lines, which drive the phases; every wait has a
deadline, and a timeout or a panic ends QEMU and reports the last lines.
"""

from __future__ import annotations

import collections
import os
import re
import select
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .image import Image
from .util import LabError

XEN_ARGS = (
    "console=com1 com1=115200,8n1 dom0_mem=1536M,max:1536M dom0_max_vcpus=2 "
    "smap=0 smep=0 noreboot "
    # guests' port-0xE9 output (hvmloader's progress) on the console: cheap
    # and it shows where a slow HVM boot spends its time
    "guest_loglvl=all"
)
DOM0_ARGS = "console=hvc0 rdinit=/init"
MACHINE = [
    "-machine", "pc",
    "-accel", "tcg,thread=multi",
    "-smp", "2",
    "-m", "4G",
    "-no-reboot",
    "-display", "none",
    "-vga", "none",
    "-nic", "none",
]  # fmt: skip

#: console lines that mean the machine is gone for good
FATAL = (
    re.compile(r"Kernel panic - not syncing"),
    re.compile(r"\(XEN\) Panic on CPU"),
    re.compile(r"\(XEN\) Hardware Dom0 crashed"),
    re.compile(r"Attempted to kill init"),
)
MARK = "TORPOR-LAB "


@dataclass(frozen=True)
class Share:
    tag: str
    path: Path
    readonly: bool


@dataclass
class Boot:
    """What happened to one boot."""

    ready_after: float | None = None
    done_after: float | None = None
    exit_after: float | None = None
    job_rc: int | None = None
    qemu_rc: int | None = None
    failure: str | None = None
    notes: list[str] = field(default_factory=list)
    last_lines: list[str] = field(default_factory=list)


#: `max` exposes SVM, so HVM and PVH guests run (docs/real-xen.md).  XSAVE
#: and AVX are taken out: with them, dom0 processes (python3) segfaulted with
#: corrupted pointers whenever an HVM guest ran next to them (seen here, twice
#: in a 4-process stress run; none without XSAVE/AVX).  Xen then keeps FPU
#: state with FXSAVE and glibc uses its SSE code paths.
CPU = "max,-xsave,-avx,-avx2,-xsaveopt,-xsavec,-xsaves"


def argv(
    image: Image, shares: list[Share], mode: str, *, interactive: bool, cpu: str = CPU
) -> list[str]:
    for p in (image.kernel, image.initrd):
        if "," in str(p) or " " in str(p):
            raise LabError(f"QEMU cannot take a multiboot module path with ',' or ' ': {p}")
    cmd = [
        "qemu-system-x86_64",
        *MACHINE,
        "-cpu", cpu,
        "-kernel", str(image.xen),
        "-append", XEN_ARGS,
        "-initrd", f"{image.kernel} {DOM0_ARGS} torpor.mode={mode},{image.initrd}",
    ]  # fmt: skip
    if interactive:
        # Ctrl-A x quits, Ctrl-A c reaches QEMU's monitor.
        cmd += ["-serial", "mon:stdio", "-monitor", "none"]
    else:
        cmd += [
            "-monitor",
            "none",
            "-chardev",
            "stdio,id=con0,signal=off",
            "-serial",
            "chardev:con0",
        ]
    for s in shares:
        opt = f"local,path={s.path},mount_tag={s.tag},security_model=none"
        cmd += ["-virtfs", opt + (",readonly=on" if s.readonly else "")]
    return cmd


def interactive(image: Image, shares: list[Share], cpu: str = CPU) -> int:
    return subprocess.call(argv(image, shares, "shell", interactive=True, cpu=cpu))


def run(
    image: Image,
    shares: list[Share],
    console_log: Path,
    *,
    boot_timeout: float,
    run_timeout: float,
    on_line: Callable[[str], None],
    halt_timeout: float = 90.0,
    cpu: str = CPU,
) -> Boot:
    """Boot in test mode, follow the console until QEMU exits or a deadline passes."""
    cmd = argv(image, shares, "test", interactive=False, cpu=cpu)
    res = Boot()
    last: collections.deque[str] = collections.deque(maxlen=60)
    start = time.monotonic()
    phase, deadline = "boot", start + boot_timeout
    waiting_for = f"dom0 to come up (no 'TORPOR-LAB ready' within {boot_timeout:.0f}s)"
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = b""
    try:
        with console_log.open("wb") as clog:
            clog.write(("$ " + " ".join(cmd) + "\n").encode())
            while True:
                now = time.monotonic()
                if now >= deadline:
                    if phase == "halt" and res.done_after is not None:
                        # The job finished and reported; only the power-off hung.
                        res.notes.append(
                            f"stopped QEMU: it did not exit {halt_timeout:.0f}s "
                            "after dom0 powered off"
                        )
                    else:
                        res.failure = res.failure or f"timed out waiting for {waiting_for}"
                    break
                ready, _, _ = select.select([fd], [], [], deadline - now)
                if not ready:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break  # QEMU closed its stdout: it is exiting
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip("\r")
                    last.append(line)
                    now = time.monotonic()
                    # Host time since QEMU started: where a slow boot spends it.
                    clog.write(f"[{now - start:7.2f}] {line}\n".encode())
                    if any(p.search(line) for p in FATAL) and phase != "halt":
                        res.failure = f"the machine died: {line.strip()}"
                        phase, deadline = "halt", now + 10
                        waiting_for = "QEMU to exit after the crash"
                    idx = line.find(MARK)
                    if idx < 0:
                        continue
                    event = line[idx + len(MARK) :].strip()
                    if event.startswith("ready") and phase == "boot":
                        res.ready_after = now - start
                        phase, deadline = "run", now + run_timeout
                        waiting_for = f"the dom0 job to finish (run timeout {run_timeout:.0f}s)"
                    elif event.startswith("done"):
                        m = re.search(r"rc=(-?\d+)", event)
                        res.job_rc = int(m.group(1)) if m else None
                        res.done_after = now - start
                        phase, deadline = "halt", now + halt_timeout
                        waiting_for = "QEMU to exit after dom0 powered off"
                    elif event.startswith("fail"):
                        res.failure = f"dom0 init failed: {event[4:].strip()}"
                        phase, deadline = "halt", now + halt_timeout
                        waiting_for = "QEMU to exit after dom0 init failed"
                    on_line(event)
                clog.flush()
            if buf:
                clog.write(buf + b"\n")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        res.qemu_rc = proc.returncode
        res.exit_after = time.monotonic() - start
        res.last_lines = list(last)
    if res.failure is None and res.done_after is None:
        res.failure = f"QEMU exited (status {res.qemu_rc}) before {waiting_for}"
    return res

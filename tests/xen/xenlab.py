"""Helpers for tests that run in the lab's dom0 on a real Xen 4.17 hypervisor.

Independent of torpor's own code on purpose: these are the lab's oracles
(what the hypervisor, xenstored and the guests really do), so a bug in torpor
cannot hide behind them.

  XenCtrl     libxenctrl/libxenguest through ctypes: domain info (raw flags,
              shutdown reason), HVM params, xc_domain_resume
  XsConn      a minimal xenstore wire client for watches with deadlines
  Guest       one lab guest: domid, name, type, its console log and counter
  GuestFactory  creates guests from lab/guests/<type>.cfg, destroys them
  ConsoleDir  inotify on the console log directory, so waits are event-driven
  Qmp         qemu-xen's QMP socket for an HVM guest (qemu.qmp, with deadlines)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# xen/include/public/domctl.h (XEN_DOMCTL_INTERFACE_VERSION 0x15, Xen 4.17)
DOMINF_DYING = 1 << 0
DOMINF_HVM = 1 << 1
DOMINF_SHUTDOWN = 1 << 2
DOMINF_PAUSED = 1 << 3
DOMINF_BLOCKED = 1 << 4
DOMINF_RUNNING = 1 << 5
SHUTDOWN_SHIFT = 16
SHUTDOWN_MASK = 0xFF
# xen/include/public/sched.h
SHUTDOWN_POWEROFF = 0
SHUTDOWN_REBOOT = 1
SHUTDOWN_SUSPEND = 2
SHUTDOWN_CRASH = 3
# xen/include/public/hvm/params.h
HVM_PARAM_CALLBACK_IRQ = 0
HVM_PARAM_ACPI_S_STATE = 14
# xen/include/public/arch-x86/xen.h: a PVH guest emulates only the LAPIC
XEN_X86_EMU_LAPIC = 1 << 0

LAB_DIR = Path("/var/lib/torpor-lab")  # guest kernel + initramfs (built into dom0)
CONSOLE_DIR = Path("/var/log/xen/console")  # xenconsoled --log=guest, HVM serial files
RUN_DIR = Path("/run/torpor-lab")  # per-guest configs and command sockets
XENSTORED_SOCKET = "/var/run/xenstored/socket"
REPO = Path(__file__).resolve().parents[2]
GUEST_DEFS = REPO / "lab" / "guests"
GUEST_TYPES = ("pv", "pvh", "pvhvm", "hvm")


def in_dom0() -> bool:
    try:
        return "control_d" in Path("/proc/xen/capabilities").read_text()
    except OSError:
        return False


def sh(*cmd: str, timeout: float = 60.0) -> str:
    """Run a dom0 command; its output, or an AssertionError that shows it."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


# --- libxenctrl / libxenguest --------------------------------------------------


class _DomainInfo(ctypes.Structure):
    """struct xen_domctl_getdomaininfo (= xc_domaininfo_t): no bitfields."""

    _fields_ = [
        ("domain", ctypes.c_uint16),
        ("pad1", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("tot_pages", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("outstanding_pages", ctypes.c_uint64),
        ("shr_pages", ctypes.c_uint64),
        ("paged_pages", ctypes.c_uint64),
        ("shared_info_frame", ctypes.c_uint64),
        ("cpu_time", ctypes.c_uint64),
        ("nr_online_vcpus", ctypes.c_uint32),
        ("max_vcpu_id", ctypes.c_uint32),
        ("ssidref", ctypes.c_uint32),
        ("handle", ctypes.c_uint8 * 16),
        ("cpupool", ctypes.c_uint32),
        ("gpaddr_bits", ctypes.c_uint8),
        ("pad2", ctypes.c_uint8 * 7),
        ("emulation_flags", ctypes.c_uint32),  # struct xen_arch_domainconfig
        ("misc_flags", ctypes.c_uint32),
    ]


DOMAININFO_SIZE = 112  # sizeof(xc_domaininfo_t) with Debian's 4.17 headers


@dataclass(frozen=True)
class DomInfo:
    domid: int
    flags: int
    tot_pages: int
    online_vcpus: int
    emulation_flags: int

    @property
    def hvm(self) -> bool:
        return bool(self.flags & DOMINF_HVM)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & DOMINF_SHUTDOWN)

    @property
    def shutdown_reason(self) -> int | None:
        if not self.shutdown:
            return None
        return (self.flags >> SHUTDOWN_SHIFT) & SHUTDOWN_MASK

    @property
    def paused(self) -> bool:
        return bool(self.flags & DOMINF_PAUSED)

    @property
    def dying(self) -> bool:
        return bool(self.flags & DOMINF_DYING)

    @property
    def pvh(self) -> bool:
        return self.hvm and self.emulation_flags == XEN_X86_EMU_LAPIC


class XenCtrl:
    """A libxenctrl handle (never a DUMMY one) and the calls the tests need."""

    def __init__(self) -> None:
        self.ctrl = ctypes.CDLL("libxenctrl.so.4.17", use_errno=True)
        self.guest = ctypes.CDLL("libxenguest.so.4.17", use_errno=True)
        c, g = self.ctrl, self.guest
        c.xc_interface_open.restype = ctypes.c_void_p
        c.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        c.xc_interface_close.argtypes = [ctypes.c_void_p]
        c.xc_domain_getinfolist.restype = ctypes.c_int
        c.xc_domain_getinfolist.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_uint,
            ctypes.POINTER(_DomainInfo),
        ]
        c.xc_hvm_param_get.restype = ctypes.c_int
        c.xc_hvm_param_get.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.POINTER(ctypes.c_uint64),
        ]
        g.xc_domain_resume.restype = ctypes.c_int
        g.xc_domain_resume.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
        handle = c.xc_interface_open(None, None, 0)
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, f"xc_interface_open: {os.strerror(err)}")
        self.xch: int | None = handle

    def close(self) -> None:
        if self.xch:
            self.ctrl.xc_interface_close(self.xch)
            self.xch = None

    def domains(self, first: int = 0, count: int = 256) -> list[DomInfo]:
        buf = (_DomainInfo * count)()
        n = self.ctrl.xc_domain_getinfolist(self.xch, first, count, buf)
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"xc_domain_getinfolist: {os.strerror(err)}")
        return [
            DomInfo(d.domain, d.flags, d.tot_pages, d.nr_online_vcpus, d.emulation_flags)
            for d in buf[:n]
        ]

    def info(self, domid: int) -> DomInfo | None:
        """The domain's info, or None if it does not exist (any more)."""
        found = self.domains(domid, 1)
        return found[0] if found and found[0].domid == domid else None

    def hvm_param(self, domid: int, param: int) -> int:
        value = ctypes.c_uint64()
        if self.ctrl.xc_hvm_param_get(self.xch, domid, param, ctypes.byref(value)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"xc_hvm_param_get({domid}, {param}): {os.strerror(err)}")
        return value.value

    def resume(self, domid: int, fast: bool) -> None:
        """xc_domain_resume (libxenguest); raises OSError with Xen's errno."""
        if self.guest.xc_domain_resume(self.xch, domid, 1 if fast else 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"xc_domain_resume({domid}, fast={fast}): {os.strerror(err)}")


# --- xenstore: a minimal wire client for watches with deadlines ------------------

XS_DIRECTORY, XS_READ, XS_WATCH, XS_UNWATCH, XS_ERROR, XS_WATCH_EVENT = 1, 2, 4, 5, 16, 15
_HDR = struct.Struct("<IIII")  # type, req_id, tx_id, len (xs_wire.h)


class XsConn:
    """One connection to xenstored's socket: requests and watch events.

    Replies and events share the socket.  Every event received is kept in
    `events` (append-only), so a test can ask whether one fired since a mark
    no matter which wait happened to read it.  Every wait has a deadline.
    """

    def __init__(self, path: str = XENSTORED_SOCKET) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = b""
        self.events: list[tuple[str, str]] = []
        self.req = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> XsConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, deadline: float) -> tuple[int, int, bytes]:
        while True:
            if len(self.buf) >= _HDR.size:
                typ, req, _tx, n = _HDR.unpack_from(self.buf)
                if len(self.buf) >= _HDR.size + n:
                    body = self.buf[_HDR.size : _HDR.size + n]
                    self.buf = self.buf[_HDR.size + n :]
                    if typ == XS_WATCH_EVENT:
                        path, token = body.split(b"\0")[:2]
                        self.events.append((path.decode(), token.decode()))
                    return typ, req, body
            left = deadline - time.monotonic()
            # select() even when the deadline has passed: what already
            # arrived is still read (a zero deadline polls).
            r, _, _ = select.select([self.sock], [], [], max(left, 0.0))
            if r:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("xenstored closed the connection")
                self.buf += chunk
            elif left <= 0:
                raise TimeoutError("no message from xenstored before the deadline")

    def request(self, typ: int, payload: bytes, timeout: float = 10.0) -> bytes:
        self.req += 1
        self.sock.setblocking(True)
        self.sock.sendall(_HDR.pack(typ, self.req, 0, len(payload)) + payload)
        self.sock.setblocking(False)
        deadline = time.monotonic() + timeout
        while True:
            rtyp, req, body = self._recv(deadline)
            if rtyp == XS_WATCH_EVENT or req != self.req:
                continue
            if rtyp == XS_ERROR:
                raise OSError(body.rstrip(b"\0").decode())
            return body

    def read(self, path: str) -> str | None:
        try:
            return self.request(XS_READ, path.encode() + b"\0").decode()
        except OSError as e:
            if str(e) == "ENOENT":
                return None
            raise

    def directory(self, path: str) -> list[str] | None:
        """XS_DIRECTORY: the node's children, or None if it does not exist."""
        try:
            body = self.request(XS_DIRECTORY, path.encode() + b"\0")
        except OSError as e:
            if str(e) == "ENOENT":
                return None
            raise
        return [n.decode() for n in body.split(b"\0") if n]

    def watch(self, path: str, token: str) -> None:
        """XS_WATCH; returns once the watch's initial event has arrived."""
        mark = self.mark()
        self.request(XS_WATCH, f"{path}\0{token}\0".encode())
        self.wait_until(lambda: self.saw(path, token, mark), 10, f"the initial event of {path}")

    def unwatch(self, path: str, token: str) -> None:
        self.request(XS_UNWATCH, f"{path}\0{token}\0".encode())

    def mark(self) -> int:
        return len(self.events)

    def saw(self, path: str, token: str, since: int) -> bool:
        return (path, token) in self.events[since:]

    def pump(self, timeout: float) -> bool:
        """Read messages until one watch event arrives (True) or `timeout` (False)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                typ, _req, _body = self._recv(deadline)
                if typ == XS_WATCH_EVENT:
                    return True
        except TimeoutError:
            return False

    def wait_until(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """Re-evaluate `check` on each watch event until it is truthy; return it.

        AssertionError naming `what` when the deadline passes first.
        """
        deadline = time.monotonic() + timeout
        mark = self.mark()
        while True:
            value = check()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0 or not self.pump(left):
                if value := check():
                    return value
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what} "
                    f"(events meanwhile: {self.events[mark:]})"
                )


# --- guest consoles --------------------------------------------------------------

_IN_MODIFY, _IN_CREATE, _IN_MOVED_TO = 0x2, 0x100, 0x80
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000


class ConsoleDir:
    """inotify on the console log directory: wake up when any log grows."""

    def __init__(self, path: Path = CONSOLE_DIR) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        path.mkdir(parents=True, exist_ok=True)
        mask = _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO
        if libc.inotify_add_watch(self.fd, str(path).encode(), mask) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def close(self) -> None:
        os.close(self.fd)

    def wait(self, timeout: float, also: XsConn | None = None) -> None:
        """Block until some log changes, a watch on `also` fires, or `timeout`."""
        fds: list[Any] = [self.fd] if also is None else [self.fd, also.sock]
        r, _, _ = select.select(fds, [], [], max(timeout, 0.0))
        if self.fd in r:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.fd, 65536):
                    pass
        if also is not None and also.sock in r:
            also.pump(0)


# Complete lines only: an HVM guest's UART log grows a character at a time.
_TICK = re.compile(r"TORPOR-TICK n=(\d+) uptime=([\d.]+)\r?\n")


@dataclass(frozen=True)
class Tick:
    n: int
    uptime: float


class GuestDied(AssertionError):
    """The guest's domain shut down (or vanished) while a test waited on it."""

    def __init__(self, msg: str, info: DomInfo | None) -> None:
        super().__init__(msg)
        self.info = info


SHUTDOWN_NAMES = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog"}


@dataclass
class Guest:
    """A lab guest.  `kind` is pv | pvh | pvhvm | hvm."""

    kind: str
    name: str
    domid: int
    config: Path
    console_log: Path
    command_socket: Path | None
    consoles: ConsoleDir = field(repr=False)
    xc: XenCtrl = field(repr=False)
    releases: XsConn = field(repr=False)  # watches @releaseDomain
    _channel: socket.socket | None = field(default=None, repr=False)
    #: the QEMU guest agent's socket (/var/run/xen/qga-<domid>), if it has one
    agent_socket: Path | None = None

    @property
    def qmp_socket(self) -> Path:
        return Path(f"/var/run/xen/qmp-libxl-{self.domid}")

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ticks(self) -> list[Tick]:
        return [Tick(int(n), float(u)) for n, u in _TICK.findall(self.console())]

    def last_tick(self) -> Tick | None:
        t = self.ticks()
        return t[-1] if t else None

    def _tail(self, lines: int = 15) -> str:
        return "\n".join(self.console().splitlines()[-lines:])

    def wait_console(self, check: Callable[[str], Any], timeout: float, what: str) -> Any:
        """Re-check the console log each time it grows until `check` is truthy.

        Also woken by @releaseDomain: if the domain shuts down or vanishes
        meanwhile, GuestDied says so at once instead of a timeout later.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = check(self.console())
            if value:
                return value
            info = self.xc.info(self.domid)
            if info is None or info.shutdown:
                why = (
                    "vanished"
                    if info is None
                    else f"shut down ({SHUTDOWN_NAMES.get(info.shutdown_reason or 0, '?')})"
                )
                raise GuestDied(
                    f"{self.name} (domid {self.domid}) {why} while waiting for {what}; "
                    f"console tail:\n{self._tail()}",
                    info,
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.name}: timed out after {timeout:.0f}s waiting for {what}; "
                    f"console tail:\n{self._tail()}"
                )
            self.consoles.wait(left, also=self.releases)

    def wait_tick(self, after: int | None = None, timeout: float = 60.0) -> Tick:
        """The first tick numbered above `after` (default: the last one seen now)."""
        if after is None:
            last = self.last_tick()
            after = last.n if last else 0

        def newer(_: str) -> Tick | None:
            t = self.last_tick()
            return t if t and t.n > after else None

        tick: Tick = self.wait_console(newer, timeout, f"a tick after n={after}")
        return tick

    def wait_line(self, text: str, timeout: float = 60.0, count: int = 1) -> None:
        """Wait until `text` appears `count` times on the console."""
        self.wait_console(lambda c: c.count(text) >= count, timeout, repr(text))

    def send(self, command: str, timeout: float = 10.0) -> None:
        """Send one line to the guest's command channel (HVM types: ttyS1).

        The connection stays open until the guest is destroyed: qemu-xen
        feeds the UART as fast as the guest drains its FIFO, and drops what
        it has not read yet when the client hangs up.
        """
        if self.command_socket is None:
            raise ValueError(f"{self.kind} guests have no command channel")
        if self._channel is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(str(self.command_socket))
            self._channel = s
        self._channel.sendall(command.encode() + b"\n")

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class GuestFactory:
    """Creates lab guests from lab/guests/<kind>.cfg and destroys them all.

    A definition is an xl config with placeholders: @NAME@, @LABDIR@,
    @CONSOLE_LOG@, @CMD_SOCKET@, @QGA_SOCKET@, @EXTRA@ (appended to the kernel
    command line).  `agent=True` (plain HVM only) uses hvm-qga.cfg: the guest
    runs qemu-ga on its ttyS1, whose dom0 end is renamed to
    /var/run/xen/qga-<domid> once the domid is known (xl cannot name it so).
    """

    _seq = itertools.count(1)  # names stay unique across factories in a session
    #: seconds from `xl create` to the first tick: HVM guests' firmware pulls
    #: the kernel through fw_cfg's I/O port, slow under TCG
    BOOT_TIMEOUT: ClassVar[dict[str, float]] = {"pv": 90, "pvh": 90, "pvhvm": 300, "hvm": 300}

    def __init__(self, results: Path | None, xc: XenCtrl) -> None:
        self.results = results
        self.xc = xc
        self.guests: list[Guest] = []
        self.consoles = ConsoleDir()
        self.releases = XsConn()
        self.releases.watch("@releaseDomain", "lab-guest-factory")

    def create(
        self,
        kind: str,
        *,
        name: str | None = None,
        extra_cmdline: str = "",
        overrides: dict[str, str] | None = None,
        wait_ticking: bool = True,
        timeout: float | None = None,
        retry_boot: bool = True,
        agent: bool = False,
    ) -> Guest:
        """Create a guest; with wait_ticking, return once it has ticked.

        A guest whose domain dies before its first tick is created again,
        once, and the first death is reported on stderr: under nested TCG a
        PVH kernel occasionally triple-faults in its PIT calibration loop
        (100,000 reads of a port PVH does not emulate), a lab artefact that
        has nothing to do with what the tests check.
        """
        if kind not in GUEST_TYPES:
            raise ValueError(f"guest type {kind!r} not in {GUEST_TYPES}")
        if agent and kind != "hvm":
            raise ValueError("only plain HVM lab guests run the guest agent")
        boot_timeout = timeout if timeout is not None else self.BOOT_TIMEOUT[kind]
        for attempt in (1, 2):
            guest = self._create(kind, name, extra_cmdline, overrides, boot_timeout, agent)
            if not wait_ticking:
                return guest
            try:
                guest.wait_tick(after=0, timeout=boot_timeout)
            except GuestDied as died:
                if attempt == 2 or not retry_boot:
                    raise
                print(
                    f"[lab] {guest.name} died while booting, creating another: {died}",
                    file=sys.stderr,
                )
                self.destroy(guest)
                continue
            return guest
        raise AssertionError("unreachable")

    def _create(
        self,
        kind: str,
        name: str | None,
        extra_cmdline: str,
        overrides: dict[str, str] | None,
        timeout: float,
        agent: bool = False,
    ) -> Guest:
        name = name or f"lab-{kind}-{next(self._seq)}"
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        # Plain HVM guests' console is their ttyS0, written by qemu-xen to a
        # file; the others use the PV console, logged by xenconsoled.
        log = CONSOLE_DIR / (f"hvm-{name}.log" if kind == "hvm" else f"guest-{name}.log")
        cmd_sock = RUN_DIR / f"{name}.cmd" if kind in ("hvm", "pvhvm") and not agent else None
        qga_sock = RUN_DIR / f"{name}.qga" if agent else None
        text = (GUEST_DEFS / ("hvm-qga.cfg" if agent else f"{kind}.cfg")).read_text()
        for key, value in {
            "@NAME@": name,
            "@LABDIR@": str(LAB_DIR),
            "@CONSOLE_LOG@": str(log),
            "@CMD_SOCKET@": str(cmd_sock),
            "@QGA_SOCKET@": str(qga_sock),
            "@EXTRA@": extra_cmdline,
        }.items():
            text = text.replace(key, value)
        for key, value in (overrides or {}).items():
            text += f"\n{key} = {value}\n"
        cfg = RUN_DIR / f"{name}.cfg"
        cfg.write_text(text)
        sh("xl", "create", str(cfg), timeout=timeout)
        domid = int(sh("xl", "domid", name).strip())
        guest = Guest(kind, name, domid, cfg, log, cmd_sock, self.consoles, self.xc, self.releases)
        self.guests.append(guest)
        if qga_sock is not None:
            # qemu-xen listens on the inode, whatever its name: rename it to
            # where a toolstack looks for domain <domid>'s agent.
            guest.agent_socket = Path(f"/var/run/xen/qga-{domid}")
            os.rename(qga_sock, guest.agent_socket)
        return guest

    def destroy(self, guest: Guest) -> None:
        guest.close_channel()
        subprocess.run(
            ["xl", "destroy", str(guest.domid)], capture_output=True, timeout=60, check=False
        )
        if guest.agent_socket is not None:
            with contextlib.suppress(OSError):
                guest.agent_socket.unlink()
        if self.results is not None:
            dest = self.results / "guests"
            dest.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(guest.console_log, dest / f"{guest.name}.log")
                shutil.copy(guest.config, dest / f"{guest.name}.cfg")
        if guest in self.guests:
            self.guests.remove(guest)

    def destroy_all(self) -> None:
        for g in list(self.guests):
            self.destroy(g)
        self.consoles.close()
        self.releases.close()


# --- QMP (HVM device model) ------------------------------------------------------


class Qmp:
    """qemu-xen's QMP socket through qemu.qmp's QMPClient, every call bounded."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        from qemu.qmp import QMPClient

        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("lab")
        self.timeout = timeout
        self._run(self.client.connect(str(path)))

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout or self.timeout))

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return self._run(self.client.execute(cmd, args))

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            while True:
                ev = await self.client.events.get()
                if ev["event"] == name:
                    return dict(ev)

        try:
            result: dict[str, Any] = self._run(get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no QMP {name} event within {timeout:.0f}s") from None
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.client.disconnect())
        self.loop.close()


@contextlib.contextmanager
def qmp(path: Path, timeout: float = 10.0) -> Iterator[Qmp]:
    q = Qmp(path, timeout)
    try:
        yield q
    finally:
        q.close()


def errno_name(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))

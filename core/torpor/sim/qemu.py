"""HVM device models for the simulated Xen host: real QEMU, and what they share.

An HVM domain's device model on Xen is a QEMU process (qemu-xen) that torpor
reaches over QMP.  In the simulated host it is a real ``qemu-system-x86_64``
(TCG, i440fx ``-machine pc``, SeaBIOS) running the boot sector of
:mod:`torpor.sim.hvm_image`; where QEMU is not installed,
:class:`torpor.sim.fake_qemu.FakeDeviceModel` stands in with the same
observable behaviour over a real QMP socket.  Both implement
:class:`DeviceModelProcess`; :func:`make_device_model` picks one.

How :class:`QemuDeviceModel` runs QEMU, and why:

* Every Unix socket is created and bound here, listening, *before* QEMU
  starts, and handed over as a file descriptor (``-chardev
  socket,fd=N,server=on``; ``pass_fds``).  A client can connect the moment
  :attr:`qmp_path` exists: the kernel queues it until QEMU accepts; nothing
  sleeps and polls for a socket to appear.
* The serial line (COM1) is a socket chardev with ``wait=on`` whose client end
  is connected before QEMU starts, so QEMU accepts it before the guest runs
  and no early output is lost.  ``-display none`` rather than
  ``-nographic``: with ``-nographic`` SeaBIOS mirrors its screen to COM1.
* QMP: :attr:`qmp_path` is torpor's (qemu-xen's ``qmp-libxl-<domid>``); a
  second monitor is this object's own (qemu-xen has a second one too,
  ``qmp-libxenstat-<domid>``): it follows the run state from events and
  tells :meth:`on_event` subscribers, as qemu-xen tells Xen of an S3 entry
  (``HVM_PARAM_ACPI_S_STATE``).
* Guest RAM is a shared file (``memory-backend-file,share=on``): the host
  reads and writes guest-physical memory directly, as dom0 maps a guest's
  frames (``xc_map_foreign_range``).  Below 640 KiB and up to the top of RAM
  (16 MiB here) file offset = guest-physical address.
* ``-no-shutdown``: a guest that powers off or dies leaves the device model
  alive in run state ``shutdown`` (``SHUTDOWN`` then ``STOP``), as a Xen
  domain that shut down stays until the toolstack destroys it.  Unless
  ``reboot=True``, also ``-no-reboot``: a guest reset (the crash command's
  triple fault, or SeaBIOS's reboot when S3 resume finds no waking vector)
  becomes ``SHUTDOWN {guest: true, reason: guest-reset}``: the sim reports
  that as a crash (an unrequested reset is what xl's ``on_crash`` sees when
  ``HVM_PARAM_TRIPLE_FAULT_REASON`` is ``SHUTDOWN_crash``).  With
  ``reboot=True`` QEMU resets instead (``RESET``, twice: the reset lands in
  SeaBIOS's resume path, whose ``tryReboot()`` resets again) and the guest
  boots again, its boot count 2.
* The process dies with its parent (``PR_SET_PDEATHSIG``; strictly, with the
  parent *thread* that started it: start device models from the thread that
  runs their event loop), is killed by :meth:`~QemuDeviceModel.stop`, and by
  an ``atexit`` hook for any left; :func:`running_qemu_pids` finds any still
  running (tests assert none).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import itertools
import json
import mmap
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from torpor.errors import DeviceModelError, Timeout
from torpor.qmp import QmpClient, QmpEvent
from torpor.sim import hvm_image
from torpor.sim.hvm_image import GuestCounters

__all__ = [
    "RAM_BYTES",
    "DeviceModelBase",
    "DeviceModelProcess",
    "GuestAgentShim",
    "QemuDeviceModel",
    "make_device_model",
    "qemu_binary",
    "running_qemu_pids",
]

#: Guest RAM of a simulated HVM guest (QEMU ``-m``).
RAM_BYTES = 16 * 1024 * 1024
QEMU_BINARY = "qemu-system-x86_64"
#: The ``-name`` every QEMU started here carries: it names the owning process.
_NAME_TAG = "torpor-sim"
_instances = itertools.count(1)

Kind = Literal["qemu", "in-process"]


@runtime_checkable
class DeviceModelProcess(Protocol):
    """An HVM guest's device model: a QEMU process (or its in-process stand-in).

    QMP is on :attr:`qmp_path`; the guest's COM1 lines come through
    :meth:`wait_serial` / :meth:`on_serial`; guest memory is read and
    written like a foreign mapping.  Not to be confused with QMP ``stop``:
    :meth:`stop` destroys the device model.
    """

    #: ``"qemu"`` or ``"in-process"``: which one ran.
    kind: Kind
    #: The domain this device model serves (``None`` outside a simulated host).
    domid: int | None

    @property
    def qmp_path(self) -> str:
        """The QMP socket torpor connects to (bound before the model starts)."""
        ...

    @property
    def pid(self) -> int | None:
        """QEMU's process id; ``None`` for the in-process model or before start."""
        ...

    @property
    def alive(self) -> bool:
        """True from :meth:`start` until the model exits or is stopped."""
        ...

    @property
    def run_state(self) -> str:
        """The QEMU run state as last seen: ``running``, ``paused``, ``suspended``,
        ``shutdown``; ``prelaunch`` before start, ``exited`` after."""
        ...

    async def start(self, *, timeout: float = 10.0) -> None:
        """Start the device model and wait for the guest's ``torpor-hvm boot`` line."""
        ...

    async def stop(self) -> None:
        """Destroy the device model (kill QEMU); idempotent."""
        ...

    async def request_s3(self) -> None:
        """Ask the guest to enter S3 (sends ``S`` on its COM1): the sim guest agent."""
        ...

    async def request_poweroff(self) -> None:
        """Ask the guest to power off (ACPI S5)."""
        ...

    async def request_crash(self) -> None:
        """Make the guest crash (triple fault)."""
        ...

    def read_memory(self, addr: int, length: int) -> bytes:
        """Read guest-physical memory."""
        ...

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write guest-physical memory (for tests of misbehaving guests)."""
        ...

    def read_counters(self) -> GuestCounters:
        """The guest's tick, boot and resume counters (:mod:`torpor.sim.hvm_image`)."""
        ...

    def memory_checksum(self) -> str:
        """SHA-256 of the guest's work ring."""
        ...

    @property
    def serial_lines(self) -> Sequence[str]:
        """Every COM1 line so far, CR LF stripped."""
        ...

    def serial_mark(self) -> int:
        """Index of the next COM1 line: ``since=`` for :meth:`wait_serial`."""
        ...

    async def wait_serial(self, text: str, *, timeout: float, since: int | None = None) -> str:
        """Wait for a COM1 line containing ``text`` (from line ``since``, or a new one)."""
        ...

    def on_serial(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(line)`` for each new COM1 line; returns an unsubscribe."""
        ...

    def on_event(self, callback: Callable[[QmpEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for each QMP event the model emits."""
        ...

    async def wait_run_state(self, states: Iterable[str], *, timeout: float) -> str:
        """Wait until :attr:`run_state` is one of ``states``."""
        ...

    async def pause_vcpus(self) -> None:
        """The hypervisor stops running the guest (a pause, a shutdown).

        In the sim QEMU plays the domain's vCPUs as well as its device model,
        so this is QMP ``stop`` on the model's own monitor.  No-op unless running.
        """
        ...

    async def unpause_vcpus(self) -> None:
        """The hypervisor runs the guest again: ``cont``, only if paused."""
        ...


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64`` on ``PATH``, or ``None``."""
    return shutil.which(QEMU_BINARY)


def make_device_model(
    *,
    domid: int | None = None,
    prefer: Literal["auto", "qemu", "in-process"] = "auto",
    run_dir: str | os.PathLike[str] | None = None,
    qmp_path: str | os.PathLike[str] | None = None,
    reboot: bool = False,
) -> DeviceModelProcess:
    """Real QEMU when ``qemu-system-x86_64`` is installed (or ``prefer="qemu"``),
    else the in-process model; ``kind`` on the result says which."""
    if prefer == "qemu" or (prefer == "auto" and qemu_binary() is not None):
        return QemuDeviceModel(domid=domid, run_dir=run_dir, qmp_path=qmp_path, reboot=reboot)
    from torpor.sim.fake_qemu import FakeDeviceModel

    return FakeDeviceModel(domid=domid, run_dir=run_dir, qmp_path=qmp_path, reboot=reboot)


# ---------------------------------------------------------------------------
# What both models share: serial lines, events and run state, guest memory.
# ---------------------------------------------------------------------------


class DeviceModelBase:
    """Serial-line, event and memory plumbing shared by both device models."""

    kind: Kind

    def __init__(self, *, domid: int | None, reboot: bool) -> None:
        self.domid = domid
        self.reboot = reboot
        self._lines: list[str] = []
        self._partial = b""
        self._line_waiters: list[tuple[str, int, asyncio.Future[str]]] = []
        self._serial_cbs: dict[int, Callable[[str], None]] = {}
        self._event_cbs: dict[int, Callable[[QmpEvent], None]] = {}
        self._keys = itertools.count()
        self._state = "prelaunch"
        self._state_waiters: list[tuple[frozenset[str], asyncio.Future[str]]] = []
        self._dead: DeviceModelError | None = None

    # serial

    @property
    def serial_lines(self) -> Sequence[str]:
        return tuple(self._lines)

    def serial_mark(self) -> int:
        return len(self._lines)

    def _feed_serial(self, data: bytes) -> None:
        buf = self._partial + data
        *complete, self._partial = buf.split(b"\n")
        for raw in complete:
            line = raw.rstrip(b"\r").decode("latin-1")
            self._lines.append(line)
            index = len(self._lines) - 1
            for text, since, fut in self._line_waiters:
                if not fut.done() and index >= since and text in line:
                    fut.set_result(line)
            for cb in list(self._serial_cbs.values()):
                cb(line)

    async def wait_serial(self, text: str, *, timeout: float, since: int | None = None) -> str:
        start = len(self._lines) if since is None else since
        for line in self._lines[start:]:
            if text in line:
                return line
        if self._dead is not None:
            raise self._dead
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        entry = (text, start, fut)
        self._line_waiters.append(entry)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError as e:
            raise Timeout(
                f"guest COM1 line {text!r}: not seen within {timeout:g} s",
                deadline=timeout,
                domid=self.domid,
            ) from e
        finally:
            self._line_waiters.remove(entry)

    def on_serial(self, callback: Callable[[str], None]) -> Callable[[], None]:
        key = next(self._keys)
        self._serial_cbs[key] = callback

        def unsubscribe() -> None:
            self._serial_cbs.pop(key, None)

        return unsubscribe

    # events and run state

    @property
    def run_state(self) -> str:
        return self._state

    def _set_state(self, state: str) -> None:
        self._state = state
        for states, fut in self._state_waiters:
            if not fut.done() and state in states:
                fut.set_result(state)

    def _note_event(self, ev: QmpEvent) -> None:
        """Follow QEMU's run state from its events (softmmu/runstate.c)."""
        if ev.name == "STOP" and self._state != "shutdown":
            self._set_state("paused")
        elif ev.name in ("RESUME", "WAKEUP"):
            self._set_state("running")
        elif ev.name == "SUSPEND":
            self._set_state("suspended")
        elif ev.name == "SHUTDOWN":
            self._set_state("shutdown")
        for cb in list(self._event_cbs.values()):
            cb(ev)

    def on_event(self, callback: Callable[[QmpEvent], None]) -> Callable[[], None]:
        key = next(self._keys)
        self._event_cbs[key] = callback

        def unsubscribe() -> None:
            self._event_cbs.pop(key, None)

        return unsubscribe

    async def wait_run_state(self, states: Iterable[str], *, timeout: float) -> str:
        wanted = frozenset(states)
        if self._state in wanted:
            return self._state
        if self._dead is not None:
            raise self._dead
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        entry = (wanted, fut)
        self._state_waiters.append(entry)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError as e:
            raise Timeout(
                f"device model run state {'/'.join(sorted(wanted))}: still {self._state} "
                f"after {timeout:g} s",
                deadline=timeout,
                domid=self.domid,
            ) from e
        finally:
            self._state_waiters.remove(entry)

    def _died(self, err: DeviceModelError) -> None:
        """The model is gone: every waiter fails with ``err``."""
        self._dead = err
        self._set_state("exited")
        for _, _, fut in self._line_waiters:
            if not fut.done():
                fut.set_exception(err)
        for _, sfut in self._state_waiters:
            if not sfut.done():
                sfut.set_exception(err)

    # guest memory

    def _ram(self) -> mmap.mmap:
        raise NotImplementedError

    def read_memory(self, addr: int, length: int) -> bytes:
        ram = self._ram()
        if addr < 0 or length < 0 or addr + length > len(ram):
            raise DeviceModelError(
                f"guest memory {addr:#x}+{length:#x} is outside RAM", domid=self.domid
            )
        return ram[addr : addr + length]

    def write_memory(self, addr: int, data: bytes) -> None:
        ram = self._ram()
        if addr < 0 or addr + len(data) > len(ram):
            raise DeviceModelError(
                f"guest memory {addr:#x}+{len(data):#x} is outside RAM", domid=self.domid
            )
        ram[addr : addr + len(data)] = data

    def read_counters(self) -> GuestCounters:
        return hvm_image.read_counters(self.read_memory)

    def memory_checksum(self) -> str:
        return hvm_image.region_checksum(
            self.read_memory(hvm_image.REGION_ADDR, hvm_image.REGION_SIZE)
        )


# ---------------------------------------------------------------------------
# Real QEMU
# ---------------------------------------------------------------------------

_live_pids: set[int] = set()


def running_qemu_pids(owner: int | None = None) -> list[int]:
    """QEMU processes started by this module for process ``owner`` (default:
    this one) that are still running, found in /proc by their ``-name`` tag."""
    tag = f"{_NAME_TAG}.{os.getpid() if owner is None else owner}.".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
            status = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # A zombie (state Z) is dead, just not yet reaped.
        if tag in cmdline and status.rsplit(")", 1)[-1].split()[0] != "Z":
            found.append(int(entry))
    return found


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(_live_pids):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1  # linux/prctl.h
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _listening_socket(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    return sock


class QemuDeviceModel(DeviceModelBase):
    """A real ``qemu-system-x86_64`` running the boot sector guest.

    :param domid: the domain it serves (used in errors and the process name).
    :param run_dir: where sockets, the image, RAM and the log go (a fresh
        temporary directory, removed by :meth:`stop`, if not given).
    :param qmp_path: torpor's QMP socket (default ``run_dir/qmp.sock``).
    :param reboot: let a guest reset reboot the guest (default: ``-no-reboot``).
    :param qemu: the binary (default: ``qemu-system-x86_64`` on ``PATH``).
    """

    kind: Kind = "qemu"

    def __init__(
        self,
        *,
        domid: int | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        qmp_path: str | os.PathLike[str] | None = None,
        reboot: bool = False,
        qemu: str | None = None,
    ) -> None:
        super().__init__(domid=domid, reboot=reboot)
        self._own_dir = run_dir is None
        self.run_dir = Path(
            run_dir if run_dir is not None else tempfile.mkdtemp(prefix="torpor-dm-")
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._qmp_path = Path(qmp_path) if qmp_path is not None else self.run_dir / "qmp.sock"
        self._aux_path = self.run_dir / "qmp-aux.sock"
        self._serial_path = self.run_dir / "serial.sock"
        self._image = self.run_dir / "guest.img"
        self._ram_path = self.run_dir / "guest.ram"
        self._log_path = self.run_dir / "qemu.log"
        self._qemu = qemu
        self._proc: asyncio.subprocess.Process | None = None
        self._listeners: list[socket.socket] = []
        self._serial_writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._aux: QmpClient | None = None
        self._mem: mmap.mmap | None = None
        self._stopped = False
        self.name = f"{_NAME_TAG}.{os.getpid()}.{next(_instances)}"

    @property
    def qmp_path(self) -> str:
        return str(self._qmp_path)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and not self._stopped

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it exited."""
        return None if self._proc is None else self._proc.returncode

    def command_line(self, qmp_fd: int, aux_fd: int, serial_fd: int) -> list[str]:
        """The QEMU command line (fds are the pre-bound listening sockets)."""
        qemu = self._qemu or qemu_binary()
        if qemu is None:
            raise DeviceModelError(f"{QEMU_BINARY} is not installed", domid=self.domid)
        mib = RAM_BYTES // (1024 * 1024)
        args = [
            qemu,
            "-name", f"guest={self.name},process=torpor-dm",
            "-machine", "pc,memory-backend=ram0",
            "-accel", "tcg",
            "-m", f"{mib}M",
            "-object",
            f"memory-backend-file,id=ram0,size={mib}M,mem-path={self._ram_path},share=on",
            "-nodefaults",
            "-display", "none",
            "-no-user-config",
            "-no-shutdown",
            "-drive", f"file={self._image},format=raw,if=ide,index=0,media=disk",
            "-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=qmp-aux,fd={aux_fd},server=on,wait=off",
            "-mon", "chardev=qmp-aux,mode=control",
            "-chardev", f"socket,id=com1,fd={serial_fd},server=on,wait=on",
            "-serial", "chardev:com1",
        ]  # fmt: skip
        if not self.reboot:
            args.append("-no-reboot")
        return args

    async def start(self, *, timeout: float = 10.0) -> None:
        if self._proc is not None:
            raise DeviceModelError("device model already started", domid=self.domid)
        loop = asyncio.get_running_loop()
        hvm_image.write_image(self._image)
        with open(self._ram_path, "wb") as f:
            f.truncate(RAM_BYTES)
        fd = os.open(self._ram_path, os.O_RDWR)
        try:
            self._mem = mmap.mmap(fd, RAM_BYTES, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        qmp = _listening_socket(self._qmp_path)
        aux = _listening_socket(self._aux_path)
        ser = _listening_socket(self._serial_path)
        self._listeners = [qmp, aux, ser]
        # Our end of COM1, queued in the backlog before QEMU exists (wait=on accepts it).
        com1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        com1.connect(str(self._serial_path))
        reader, self._serial_writer = await asyncio.open_unix_connection(sock=com1)
        cmd = self.command_line(qmp.fileno(), aux.fileno(), ser.fileno())
        with open(self._log_path, "wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=[s.fileno() for s in self._listeners],
                preexec_fn=_die_with_parent,
            )
        _live_pids.add(self._proc.pid)
        # QEMU holds the listening sockets now; ours would only keep stale paths alive.
        for s in self._listeners:
            s.close()
        self._set_state("running")
        self._tasks = [
            loop.create_task(self._read_serial(reader), name=f"{self.name}-com1"),
            loop.create_task(self._reap(), name=f"{self.name}-reap"),
        ]
        try:
            aux_client = QmpClient(domid=self.domid, name=f"{self.name}-aux")
            await aux_client.connect(self._aux_path, timeout=timeout)
            self._aux = aux_client
            aux_client.subscribe(self._note_event)
            await self.wait_serial(hvm_image.LINE_BOOT, timeout=timeout, since=0)
        except BaseException as e:
            detail = self._log_tail()
            await self.stop()
            if isinstance(e, DeviceModelError | Timeout) and detail:
                e.message = f"{e.message}; QEMU said: {detail}"
                e.args = (e.message,)
            raise

    async def _read_serial(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(4096):
            self._feed_serial(chunk)

    async def _reap(self) -> None:
        assert self._proc is not None
        rc = await self._proc.wait()
        _live_pids.discard(self._proc.pid)
        why = "was stopped" if self._stopped else f"exited with status {rc}"
        detail = "" if self._stopped else self._log_tail()
        self._died(
            DeviceModelError(
                f"QEMU device model {why}" + (f": {detail}" if detail else ""), domid=self.domid
            )
        )

    def _log_tail(self) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if "waiting for connection" not in ln]
        return " | ".join(lines[-3:])

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if self._aux is not None:
            await self._aux.close(timeout=1.0)
        if proc is not None:
            await proc.wait()
            _live_pids.discard(proc.pid)
        if self._serial_writer is not None:
            self._serial_writer.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 2.0)
        for s in self._listeners:
            s.close()
        if self._mem is not None:
            with contextlib.suppress(BufferError):
                self._mem.close()
        for p in (self._qmp_path, self._aux_path, self._serial_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._dead is None:
            self._died(DeviceModelError("QEMU device model was stopped", domid=self.domid))

    async def __aenter__(self) -> QemuDeviceModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def pause_vcpus(self) -> None:
        if self._aux is not None and self._state == "running":
            await self._aux.stop()

    async def unpause_vcpus(self) -> None:
        if self._aux is not None and self._state == "paused":
            await self._aux.cont()

    async def _send_serial(self, command: bytes) -> None:
        if self._serial_writer is None or not self.alive:
            raise DeviceModelError("device model is not running", domid=self.domid)
        try:
            self._serial_writer.write(command)
            await self._serial_writer.drain()
        except OSError as e:
            raise DeviceModelError(f"guest COM1: {e}", domid=self.domid, cause=e) from e

    async def request_s3(self) -> None:
        await self._send_serial(hvm_image.CMD_S3)

    async def request_poweroff(self) -> None:
        await self._send_serial(hvm_image.CMD_POWEROFF)

    async def request_crash(self) -> None:
        await self._send_serial(hvm_image.CMD_CRASH)

    def _ram(self) -> mmap.mmap:
        if self._mem is None or self._mem.closed:
            raise DeviceModelError("guest memory is not mapped", domid=self.domid)
        return self._mem


# ---------------------------------------------------------------------------
# The sim's guest agent
# ---------------------------------------------------------------------------


class GuestAgentShim:
    """Serves the qemu-ga protocol on a Unix socket for a boot-sector guest.

    A guest agent cannot fit in a boot sector; this stands for the in-guest
    agent.  Like qemu-ga it answers only while the guest runs (a paused or
    sleeping guest's agent is silent), discards its parser state on a 0xFF
    byte, answers ``guest-sync-delimited`` after a 0xFF sentinel, and sends
    **no reply** to a successful ``guest-suspend-ram`` (qga/qapi-schema.json):
    it turns it into :meth:`DeviceModelProcess.request_s3`.  A guest that
    found no FADT cannot sleep: that is an error reply, as qemu-ga gives when
    the guest kernel lacks S3.
    """

    VERSION = "7.2.0"
    COMMANDS = (
        "guest-sync-delimited",
        "guest-sync",
        "guest-ping",
        "guest-info",
        "guest-suspend-ram",
    )

    def __init__(self, dm: DeviceModelProcess, path: str | os.PathLike[str]) -> None:
        self.dm = dm
        self.path = Path(path)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Bind and listen (the socket exists when this returns)."""
        sock = _listening_socket(self.path)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()
        for t in list(self._handlers):
            t.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> GuestAgentShim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            while line := await reader.readline():
                # 0xFF is invalid JSON: qemu-ga's lexer drops what it had and starts afresh.
                text = line.rsplit(b"\xff", 1)[-1].strip()
                if not text:
                    continue
                # The agent runs inside the guest: nothing is answered while it is not running.
                await self.dm.wait_run_state({"running"}, timeout=3600.0)
                reply = await self._handle(text)
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except (OSError, DeviceModelError, Timeout):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels a connection; end it quietly (asyncio's stream server
            # would log a cancelled handler as an error in Python 3.11).
            pass
        finally:
            self._conns.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    async def _handle(self, text: bytes) -> bytes | None:
        try:
            msg = json.loads(text)
        except ValueError:
            return self._error("GenericError", "JSON parse error")
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            return self._error("GenericError", "Invalid JSON syntax")
        cmd: str = msg["execute"]
        args: Any = msg.get("arguments") or {}
        if cmd == "guest-sync-delimited":
            return b"\xff" + self._ok(args.get("id"))
        if cmd == "guest-sync":
            return self._ok(args.get("id"))
        if cmd == "guest-ping":
            return self._ok({})
        if cmd == "guest-info":
            supported = [
                {"name": c, "enabled": True, "success-response": True} for c in self.COMMANDS
            ]
            supported[-1]["success-response"] = False
            return self._ok({"version": self.VERSION, "supported_commands": supported})
        if cmd == "guest-suspend-ram":
            if self.dm.read_counters().pm1a_cnt == 0:
                return self._error("GenericError", "the guest found no ACPI FADT: S3 not supported")
            await self.dm.request_s3()
            return None
        return self._error("CommandNotFound", f"The command {cmd} has not been found")

    @staticmethod
    def _ok(value: object) -> bytes:
        return json.dumps({"return": value}).encode() + b"\n"

    @staticmethod
    def _error(error_class: str, desc: str) -> bytes:
        return json.dumps({"error": {"class": error_class, "desc": desc}}).encode() + b"\n"

"""HVM device models for the simulated Xen host: real QEMU, and what they share.

An HVM domain's device model on Xen is a QEMU process (qemu-xen) that torpor
reaches over QMP.  In the simulated host it is a real ``qemu-system-x86_64``
(TCG, i440fx ``-machine pc``, SeaBIOS) running the boot sector of
:mod:`torpor_sim.hvm_image`; where QEMU is not installed,
:class:`torpor_sim.fake_qemu.FakeDeviceModel` stands in with the same
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

Saving and restoring a whole VM (torpor's save / restore / migration): in the
sim QEMU runs the guest's vCPUs as well as its devices, so the guest's complete
state (RAM, CPU, devices) is QEMU's VM state, moved with QEMU's own migration:

* :meth:`~DeviceModelProcess.save_vm_state` stops the guest (``stop`` on the
  model's own monitor, never on :attr:`qmp_path`) and runs ``migrate`` to an
  ``exec:`` URI (``cat > FILE``), waiting on ``MIGRATION`` events (capability
  ``events``), through ``pre-switchover`` (capability
  ``pause-before-switchover``, on only during the save; see S3 below) to
  ``completed``.  QEMU reports ``completed`` before it has closed the pipe to
  the writer (the state is set in ``migration_completion()``;
  ``migrate_fd_cleanup()`` closes the channel later, in a bottom half), so
  the writer's own exit status comes back through a FIFO and only then is
  the file renamed into place: the file is whole when :meth:`save_vm_state`
  returns, or absent.  The source stays stopped, in run state
  ``postmigrate`` (QEMU lets ``cont`` run it again: a checkpoint).
* ``incoming=FILE``: QEMU starts with ``-S -incoming defer``; the model sets
  the ``events`` capability on the new QEMU, then ``migrate-incoming``
  ``exec:cat FILE``.  Setting the capability first is what makes the end of
  the load an event (with ``-incoming exec:...`` the load starts before any
  monitor command runs, and its end could only be polled for), and a bad URI
  is a QMP error rather than an exit.  ``start()`` returns on ``MIGRATION``
  ``completed`` (sent after the run state is set:
  ``process_incoming_migration_bh()``), the guest paused, its RAM written by
  QEMU into the new memory-backend file and readable here.  A failed load
  makes QEMU 7.2 exit (``process_incoming_migration_co()``): ``start()``
  raises with QEMU's last log lines.
* S3 does not survive a QEMU 7.2 migration.  ``migration_completion()``
  calls ``qemu_system_wakeup_request(QEMU_WAKEUP_REASON_OTHER)`` and stores
  the global run state (now ``running``) before it stops the VM; QEMU's main
  loop then carries out the wake-up (a system reset: the vCPU goes to the
  reset vector, RAM and the CMOS shutdown status 0xFE stay) and sends
  ``WAKEUP``.  So the source shows ``WAKEUP``, the stream says ``running``,
  and the restored model starts ``paused``, not ``suspended``; on ``cont``
  SeaBIOS takes its S3 resume path to the guest's waking vector: the guest
  resumes from S3 as after a ``system_wakeup`` (resume count + 1, boot count
  unchanged, no ``RESET``), on the restored model.  The wake-up runs in the
  main loop while the migration thread saves the device state, and the two
  race: seen here, 5 saves of 60 kept the vCPU where S3 stopped it (the
  restored guest then ran on without the resume path).  The pause before
  switchover closes the race: the migration thread waits there without the
  big lock, after the wake-up was requested and before the vCPU state is
  saved, and the save continues (``migrate-continue``) only after
  ``WAKEUP``.  QEMU 9.0 keeps S3 across a migration instead (Steve
  Sistare's "migration: preserve suspended runstate"); 7.2 runs here.
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
import shlex
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from torpor.errors import DeviceModelError, Timeout
from torpor.qmp import QmpClient, QmpEvent
from torpor_sim import hvm_image
from torpor_sim.hvm_image import GuestCounters

__all__ = [
    "RAM_BYTES",
    "DeviceModelBase",
    "DeviceModelProcess",
    "GuestAgentShim",
    "QemuDeviceModel",
    "make_device_model",
    "qemu_binary",
    "running_qemu_pids",
    "saved_vm_state_kind",
]

#: Guest RAM of a simulated HVM guest (QEMU ``-m``).
RAM_BYTES = 16 * 1024 * 1024
QEMU_BINARY = "qemu-system-x86_64"
#: The ``-name`` every QEMU started here carries: it names the owning process.
_NAME_TAG = "torpor-sim"
_instances = itertools.count(1)
#: The first bytes of a QEMU migration stream (migration/savevm.c ``QEMU_VM_FILE_MAGIC``).
QEMU_VM_FILE_MAGIC = b"QEVM"
#: The first bytes of a VM state saved by the in-process model (:mod:`torpor_sim.fake_qemu`).
INPROC_VM_MAGIC = b"TORPORVM"
#: The run states :meth:`DeviceModelProcess.unpause_vcpus` continues from: a pause, and
#: a source whose state was saved (QEMU 7.2 lets ``cont`` run it again: ``qmp_cont``).
_CONTINUABLE = frozenset({"paused", "postmigrate"})

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
        """Start the device model and wait for the guest's ``torpor-hvm boot`` line.

        A model made with ``incoming=FILE`` does not boot the guest: it loads
        the VM state saved by :meth:`save_vm_state` and returns once it is
        loaded, the guest paused (run state ``paused``) where it was saved;
        :meth:`unpause_vcpus` continues it.  A missing, truncated, foreign or
        corrupt file is a :class:`DeviceModelError` (nothing is left running).
        """
        ...

    async def save_vm_state(self, path: str | os.PathLike[str], *, timeout: float) -> None:
        """Write the whole VM state (RAM, vCPU, devices) to ``path``.

        A running guest is stopped first (``STOP``); the model stays stopped
        afterwards, in run state ``postmigrate`` (:meth:`unpause_vcpus` may
        continue it: a checkpoint).  The file appears whole or not at all.
        A model made with ``incoming=path`` restores it.  A guest in S3 is
        woken by the save (QEMU 7.2; see the module docstring).  Failures are
        :class:`DeviceModelError`, the deadline :class:`Timeout`.
        """
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
        """The guest's tick, boot and resume counters (:mod:`torpor_sim.hvm_image`)."""
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
        """The hypervisor runs the guest again: ``cont``, only if paused (or, after
        :meth:`save_vm_state`, ``postmigrate``)."""
        ...


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64`` on ``PATH``, or ``None``."""
    return shutil.which(QEMU_BINARY)


def saved_vm_state_kind(path: str | os.PathLike[str]) -> Kind | None:
    """Which device model wrote the VM state at ``path``: ``"qemu"`` (a QEMU
    migration stream), ``"in-process"``, or ``None`` (neither).

    An unreadable file is a :class:`DeviceModelError`.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(INPROC_VM_MAGIC))
    except OSError as e:
        raise DeviceModelError(f"saved VM state {os.fspath(path)}: {e.strerror}", cause=e) from e
    if head.startswith(QEMU_VM_FILE_MAGIC):
        return "qemu"
    if head == INPROC_VM_MAGIC:
        return "in-process"
    return None


def make_device_model(
    *,
    domid: int | None = None,
    prefer: Literal["auto", "qemu", "in-process"] = "auto",
    run_dir: str | os.PathLike[str] | None = None,
    qmp_path: str | os.PathLike[str] | None = None,
    reboot: bool = False,
    incoming: str | os.PathLike[str] | None = None,
) -> DeviceModelProcess:
    """Real QEMU when ``qemu-system-x86_64`` is installed (or ``prefer="qemu"``),
    else the in-process model; ``kind`` on the result says which.

    ``incoming``: start from a VM state saved by
    :meth:`DeviceModelProcess.save_vm_state` instead of booting the guest.
    Only the kind of model that saved a state can load it
    (:func:`saved_vm_state_kind` tells which); the other refuses it in
    :meth:`~DeviceModelProcess.start`.
    """
    if prefer == "qemu" or (prefer == "auto" and qemu_binary() is not None):
        return QemuDeviceModel(
            domid=domid, run_dir=run_dir, qmp_path=qmp_path, reboot=reboot, incoming=incoming
        )
    from torpor_sim.fake_qemu import FakeDeviceModel

    return FakeDeviceModel(
        domid=domid, run_dir=run_dir, qmp_path=qmp_path, reboot=reboot, incoming=incoming
    )


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
    :param incoming: a VM state saved by :meth:`save_vm_state` (by this or
        another QEMU device model) to start from instead of booting.
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
        incoming: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(domid=domid, reboot=reboot)
        self.incoming = None if incoming is None else Path(os.path.abspath(incoming))
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
        self._save_lock = asyncio.Lock()
        self._migration_set_up = False
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
        if self.incoming is not None:
            # Paused after the load; the URI comes by QMP once the events capability is on.
            args += ["-S", "-incoming", "defer"]
        return args

    async def start(self, *, timeout: float = 10.0) -> None:
        if self._proc is not None:
            raise DeviceModelError("device model already started", domid=self.domid)
        if self.incoming is not None:
            try:
                self._check_incoming(self.incoming)
            except DeviceModelError:
                await self.stop()
                raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
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
        self._set_state("running" if self.incoming is None else "inmigrate")
        self._tasks = [
            loop.create_task(self._read_serial(reader), name=f"{self.name}-com1"),
            loop.create_task(self._reap(), name=f"{self.name}-reap"),
        ]
        try:
            aux_client = QmpClient(domid=self.domid, name=f"{self.name}-aux")
            await aux_client.connect(self._aux_path, timeout=timeout)
            self._aux = aux_client
            aux_client.subscribe(self._note_event)
            if self.incoming is None:
                await self.wait_serial(hvm_image.LINE_BOOT, timeout=timeout, since=0)
            else:
                await self._load_incoming(aux_client, self.incoming, deadline)
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

    # ------------------------------------------------------------ save / restore

    def _check_incoming(self, path: Path) -> None:
        """Refuse, before QEMU starts, a file that is not a QEMU migration stream.

        A stream with the right start and anything wrong after it is QEMU's to
        refuse (it exits).  An empty one it would never notice: QEMU 7.2 waits
        for it with a ``G_IO_IN`` watch on the pipe (``exec_start_incoming_migration()``,
        migration/exec.c), and a bare hang-up never fires it (seen: it waits forever).
        """
        try:
            kind = saved_vm_state_kind(path)
        except DeviceModelError as e:
            raise DeviceModelError(e.message, domid=self.domid, cause=e.cause) from e
        if kind == "in-process":
            raise DeviceModelError(
                f"saved VM state {path} was written by the in-process device model, "
                "not by QEMU: QEMU cannot load it",
                domid=self.domid,
            )
        if kind is None:
            raise DeviceModelError(
                f"saved VM state {path} is not a QEMU migration stream "
                f"(no {QEMU_VM_FILE_MAGIC.decode()} magic)",
                domid=self.domid,
            )

    async def _load_incoming(self, aux: QmpClient, path: Path, deadline: float) -> None:
        """``migrate-incoming exec:cat PATH`` and wait for its ``MIGRATION`` outcome."""
        loop = asyncio.get_running_loop()

        def left() -> float:
            return max(0.0, deadline - loop.time())

        await aux.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events", "state": True}]},
            timeout=left(),
        )
        mark = aux.event_mark()
        await aux.execute(
            "migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(path))}"}, timeout=left()
        )
        try:
            ev = await aux.wait_event(
                "MIGRATION", since=mark, match=_migration_over, timeout=left()
            )
            outcome = str(ev.data.get("status"))
        except DeviceModelError:
            outcome = "ended by QEMU's exit"  # QEMU 7.2 exits on a failed incoming migration
        if outcome != "completed":
            # Let QEMU finish dying, so its last words are in the log.
            if self._proc is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), min(left(), 5.0))
            raise DeviceModelError(
                f"restoring the VM state from {path}: QEMU's incoming migration {outcome}",
                domid=self.domid,
            )
        self._set_state(await aux.query_status(timeout=left()))

    async def save_vm_state(self, path: str | os.PathLike[str], *, timeout: float) -> None:
        aux = self._aux
        if aux is None or not self.alive:
            raise DeviceModelError("device model is not running", domid=self.domid)
        target = _save_target(path, self.domid)
        if self._state == "postmigrate":
            raise _saved_already(target, self.domid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def left() -> float:
            return max(0.0, deadline - loop.time())

        async with self._save_lock:
            if self._state == "running":
                await aux.stop(timeout=left())
            # QEMU < 9.0 wakes a guest in S3 as the migration completes (see the module
            # docstring): the save must wait for that wake-up's reset.
            wakes = self._state == "suspended" and await self._qemu_major(aux, left()) < 9
            if not self._migration_set_up:
                # A stopped VM gains nothing from the live-migration throttle (128 MiB/s).
                await aux.execute(
                    "migrate-set-parameters", {"max-bandwidth": 1 << 40}, timeout=left()
                )
                self._migration_set_up = True
            await self._set_capabilities(aux, left(), events=True, pause=True)
            part = target.with_name(f".{target.name}.{os.getpid()}.part")
            with _WriterStatus() as status:
                try:
                    await self._migrate_to(aux, target, part, status, wakes=wakes, left=left)
                    try:
                        os.replace(part, target)
                    except OSError as e:
                        raise DeviceModelError(
                            f"saving the VM state to {target}: {e.strerror}",
                            domid=self.domid,
                            cause=e,
                        ) from e
                except BaseException:
                    # A writer still running would recreate the file: let it end first
                    # (it does once QEMU closed the pipe: a cancel or a failure does).
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(status.wait(), min(max(left(), 0.5), 2.0))
                    with contextlib.suppress(FileNotFoundError):
                        part.unlink()
                    raise
                finally:
                    if self.alive:
                        with contextlib.suppress(DeviceModelError, Timeout):
                            # Left on, it would hold any later migration at pre-switchover.
                            await self._set_capabilities(aux, 1.0, pause=False)
                        with contextlib.suppress(DeviceModelError, Timeout):
                            self._set_state(await aux.query_status(timeout=max(left(), 1.0)))

    async def _qemu_major(self, aux: QmpClient, timeout: float) -> int:
        reply = await aux.execute("query-version", timeout=timeout)
        try:
            return int(reply["qemu"]["major"])
        except (TypeError, KeyError, ValueError) as e:
            raise DeviceModelError(
                f"query-version: unexpected reply {reply!r}", domid=self.domid
            ) from e

    async def _set_capabilities(
        self, aux: QmpClient, timeout: float, *, events: bool | None = None, pause: bool
    ) -> None:
        caps = [{"capability": "pause-before-switchover", "state": pause}]
        if events is not None:
            caps.append({"capability": "events", "state": events})
        await aux.execute("migrate-set-capabilities", {"capabilities": caps}, timeout=timeout)

    async def _migrate_to(
        self,
        aux: QmpClient,
        target: Path,
        part: Path,
        status: _WriterStatus,
        *,
        wakes: bool,
        left: Callable[[], float],
    ) -> None:
        """``migrate`` to ``cat > part``, through pre-switchover, to the writer's end."""
        command = f"cat > {shlex.quote(str(part))}; {status.report_command()}"
        mark = aux.event_mark()
        await aux.execute("migrate", {"uri": f"exec:{command}"}, timeout=left())
        try:
            ev = await aux.wait_event(
                "MIGRATION", since=mark, match=_migration_paused_or_over, timeout=left()
            )
            if ev.data.get("status") == "pre-switchover":
                # The VM is stopped and RAM is sent; the vCPU and device state are not.
                # migration_maybe_pause() waits here without the BQL, so QEMU's main loop
                # carries out a wake-up requested by migration_completion() (WAKEUP comes
                # after its system reset): the saved vCPU is then always the reset one.
                # Without this pause the two race (seen: 5 of 60 saves kept the vCPU
                # where S3 stopped it).
                if wakes:
                    await aux.wait_event("WAKEUP", since=mark, timeout=left())
                await aux.execute("migrate-continue", {"state": "pre-switchover"}, timeout=left())
                ev = await aux.wait_event(
                    "MIGRATION", since=mark, match=_migration_over, timeout=left()
                )
        except Timeout:
            with contextlib.suppress(DeviceModelError, Timeout):
                await aux.execute("migrate_cancel", timeout=1.0)
            raise
        outcome = str(ev.data.get("status"))
        if outcome != "completed":
            info = await aux.execute("query-migrate", timeout=max(left(), 1.0))
            desc = info.get("error-desc") if isinstance(info, dict) else None
            raise DeviceModelError(
                f"saving the VM state to {target}: QEMU's migration {outcome}"
                + (f": {desc}" if desc else ""),
                domid=self.domid,
            )
        # QEMU says completed before it closed the pipe: the writer may still be writing.
        try:
            rc = await asyncio.wait_for(status.wait(), left())
        except TimeoutError as e:
            raise Timeout(
                f"saving the VM state to {target}: the writer did not finish in time",
                deadline=left(),
                domid=self.domid,
            ) from e
        if rc != 0:
            raise DeviceModelError(
                f"saving the VM state to {target}: the writer failed (status {rc}): "
                f"{self._log_tail()}",
                domid=self.domid,
            )

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
        if self._aux is not None and self._state in _CONTINUABLE:
            await self._aux.cont()
            if self._state == "postmigrate":  # no event says so: QEMU now runs it
                self._set_state(await self._aux.query_status())

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


def _save_target(path: str | os.PathLike[str], domid: int | None) -> Path:
    """The absolute path a VM state is saved to, refused early where it cannot be."""
    target = Path(os.path.abspath(path))
    if not target.parent.is_dir():
        raise DeviceModelError(
            f"saving the VM state to {target}: no directory {target.parent}", domid=domid
        )
    if target.is_dir():
        raise DeviceModelError(f"saving the VM state to {target}: Is a directory", domid=domid)
    return target


def _saved_already(target: Path, domid: int | None) -> DeviceModelError:
    # QEMU 7.2 migrate_prepare(): a postmigrate VM cannot be migrated again until it ran.
    return DeviceModelError(
        f"saving the VM state to {target}: QEMU refuses (\"Can't migrate the vm that was "
        'paused due to previous migration"): its state was saved already and it has not '
        "run since; continue it first (unpause_vcpus), or use the file saved before",
        domid=domid,
    )


def _migration_over(ev: QmpEvent) -> bool:
    return ev.data.get("status") in ("completed", "failed", "cancelled")


def _migration_paused_or_over(ev: QmpEvent) -> bool:
    return ev.data.get("status") == "pre-switchover" or _migration_over(ev)


class _WriterStatus:
    """The exit status of the shell command QEMU writes a migration stream to.

    QEMU reports a migration ``completed`` once the last byte went into the
    pipe, not once the writer wrote it out, and never sees a writer's own
    failure (a full disk) after that.  The command therefore ends with
    ``echo $? 1<>FIFO``: ``<>`` opens the FIFO read-write, which never blocks,
    so the shell (and QEMU, which waits for it in ``migrate_fd_cleanup()``)
    can never hang on it, even after this object is gone.  This end holds a
    writer of its own too, so it never reads an end-of-file.
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="torpor-save-")
        self.fifo = Path(self._dir, "status")
        os.mkfifo(self.fifo, 0o600)
        self._rfd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self._wfd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        self._buf = b""
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._loop.add_reader(self._rfd, self._readable)

    def report_command(self) -> str:
        return f"echo $? 1<>{shlex.quote(str(self.fifo))}"

    def _readable(self) -> None:
        try:
            self._buf += os.read(self._rfd, 64)
        except BlockingIOError:
            return
        if b"\n" in self._buf and not self._done.done():
            line = self._buf.split(b"\n", 1)[0].strip()
            self._done.set_result(int(line) if line.isdigit() else -1)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def __enter__(self) -> _WriterStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.remove_reader(self._rfd)
        os.close(self._rfd)
        os.close(self._wfd)
        shutil.rmtree(self._dir, ignore_errors=True)
        if not self._done.done():
            self._done.cancel()


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

    Filesystem freeze, as qemu-ga 7.2 on Linux does it (qga/commands-posix.c,
    qga/main.c); the guest has one filesystem, whose freeze flag lives in
    guest memory (``fs_frozen``, :mod:`torpor_sim.hvm_image`), so a freeze
    survives S3, a save and a migration as the guest's kernel state does,
    and a reboot clears it:

    * ``guest-fsfreeze-freeze`` freezes it (``FIFREEZE``; the guest's writer
      then blocks) and returns the number of filesystems frozen, 1;
    * ``guest-fsfreeze-status`` returns ``"frozen"`` or ``"thawed"``;
    * ``guest-fsfreeze-thaw`` thaws it and returns the number thawed (1, or
      0 when nothing was frozen: not an error);
    * while frozen, qemu-ga disables every command but those of its
      ``ga_freeze_allowlist`` (ping, info, sync, sync-delimited, fsfreeze
      status and thaw): a second ``guest-fsfreeze-freeze`` and
      ``guest-suspend-ram`` are refused with ``CommandNotFound`` "Command
      ... has been disabled: the agent is in frozen state" (qmp-dispatch.c),
      and ``guest-info`` shows them ``enabled: false``.  A guest can still be
      suspended without its agent (a hard suspend) with its filesystem frozen.
    """

    VERSION = "7.2.0"
    COMMANDS = (
        "guest-sync-delimited",
        "guest-sync",
        "guest-ping",
        "guest-info",
        "guest-suspend-ram",
        "guest-fsfreeze-status",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    )
    #: qga/main.c ``ga_freeze_allowlist``: what still runs while filesystems are frozen.
    FROZEN_ALLOWED = frozenset(
        {
            "guest-ping",
            "guest-info",
            "guest-sync",
            "guest-sync-delimited",
            "guest-fsfreeze-status",
            "guest-fsfreeze-thaw",
        }
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
        if cmd not in self.COMMANDS:
            return self._error("CommandNotFound", f"The command {cmd} has not been found")
        frozen = self.frozen()
        if frozen and cmd not in self.FROZEN_ALLOWED:
            return self._error(
                "CommandNotFound", f"Command {cmd} has been disabled: the agent is in frozen state"
            )
        if cmd == "guest-sync-delimited":
            return b"\xff" + self._ok(args.get("id"))
        if cmd == "guest-sync":
            return self._ok(args.get("id"))
        if cmd == "guest-ping":
            return self._ok({})
        if cmd == "guest-info":
            supported = [
                {
                    "name": c,
                    "enabled": not frozen or c in self.FROZEN_ALLOWED,
                    "success-response": c != "guest-suspend-ram",
                }
                for c in self.COMMANDS
            ]
            return self._ok({"version": self.VERSION, "supported_commands": supported})
        if cmd == "guest-suspend-ram":
            if self.dm.read_counters().pm1a_cnt == 0:
                return self._error("GenericError", "the guest found no ACPI FADT: S3 not supported")
            await self.dm.request_s3()
            return None
        if cmd == "guest-fsfreeze-status":
            return self._ok("frozen" if frozen else "thawed")
        if cmd == "guest-fsfreeze-freeze":
            self.dm.write_memory(hvm_image.FS_FROZEN_ADDR, b"\x01")
            return self._ok(1)
        # guest-fsfreeze-thaw
        self.dm.write_memory(hvm_image.FS_FROZEN_ADDR, b"\x00")
        return self._ok(1 if frozen else 0)

    def frozen(self) -> bool:
        """Whether the guest's filesystem is frozen (read from its memory)."""
        return self.dm.read_memory(hvm_image.FS_FROZEN_ADDR, 1) != b"\x00"

    @staticmethod
    def _ok(value: object) -> bytes:
        return json.dumps({"return": value}).encode() + b"\n"

    @staticmethod
    def _error(error_class: str, desc: str) -> bytes:
        return json.dumps({"error": {"class": error_class, "desc": desc}}).encode() + b"\n"

"""What the simulated host's two HVM device models share.

An HVM domain's device model on Xen is a QEMU process (qemu-xen) that torpor
reaches over QMP.  The simulated host has two: a real ``qemu-system-x86_64``
(:class:`torpor_sim.qemu.QemuDeviceModel`) running the boot sector of
:mod:`torpor_sim.hvm_image`, and, where QEMU is not installed, an in-process
model with the same observable behaviour over a real QMP socket
(:class:`torpor_sim.fake_qemu.FakeDeviceModel`).  Both implement
:class:`DeviceModelProcess`; :func:`torpor_sim.hvm.make_device_model` picks one.

:class:`DeviceModelBase` is everything they do alike, so each model keeps
only what is its own (launching and talking to a QEMU process, or modelling
the machine in this process):

* the run directory, torpor's QMP socket path and the VM state to start from;
* the lifecycle: :meth:`~DeviceModelBase.start` (refuse a saved state the
  model cannot load, launch, wait for the guest's boot line, clean up on any
  failure), :meth:`~DeviceModelBase.stop` (idempotent; unmaps RAM, removes
  what it made, fails every waiter), the vCPUs (``stop`` only while running,
  ``cont`` only from ``paused`` or ``postmigrate``), the guest's one-byte COM1
  commands, and the checks before a save;
* the guest's COM1 lines, QEMU's run state followed from its events
  (softmmu/runstate.c), event subscribers, and guest memory read and written
  like a foreign mapping.

The two saved-state formats are told apart by their first bytes
(:func:`saved_vm_state_kind`): a QEMU migration stream, or the in-process
model's own format (:mod:`torpor_sim.fake_machine`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, Protocol, Self, TypeVar, runtime_checkable

from torpor.errors import DeviceModelError, Timeout
from torpor.qmp import QmpEvent
from torpor_sim import hvm_image
from torpor_sim.hvm_image import GuestCounters

__all__ = [
    "CONTINUABLE",
    "INPROC_VM_MAGIC",
    "QEMU_VM_FILE_MAGIC",
    "RAM_BYTES",
    "DeviceModelBase",
    "DeviceModelProcess",
    "Kind",
    "saved_vm_state_kind",
]

#: Guest RAM of a simulated HVM guest (QEMU ``-m``).
RAM_BYTES = 16 * 1024 * 1024
#: The first bytes of a QEMU migration stream (migration/savevm.c ``QEMU_VM_FILE_MAGIC``).
QEMU_VM_FILE_MAGIC = b"QEVM"
#: The first bytes of a VM state saved by the in-process model (:mod:`torpor_sim.fake_machine`).
INPROC_VM_MAGIC = b"TORPORVM"
#: The run states :meth:`DeviceModelProcess.unpause_vcpus` continues from: a pause, and
#: a source whose state was saved (QEMU 7.2 lets ``cont`` run it again: ``qmp_cont``).
CONTINUABLE = frozenset({"paused", "postmigrate"})

Kind = Literal["qemu", "in-process"]
_T = TypeVar("_T")

#: What a saved state of each kind is, for the errors of a model that cannot load it.
_FORMAT = {
    "qemu": ("a QEMU migration stream", QEMU_VM_FILE_MAGIC),
    "in-process": ("a VM state saved by the in-process device model", INPROC_VM_MAGIC),
}


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
        woken by the save (QEMU 7.2; see :mod:`torpor_sim.qemu`).  Failures are
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


class DeviceModelBase(abc.ABC):
    """The lifecycle, serial-line, event, run-state and memory plumbing of both models.

    A model supplies :attr:`alive`, :meth:`_launch` (start the machine),
    :meth:`_shut_down` (end it), :meth:`_send_serial` (bytes to the guest's
    COM1), :meth:`_stop_vcpus` / :meth:`_run_vcpus` (QMP ``stop`` / ``cont``
    as the model does them) and :meth:`_save` (write the VM state); it maps
    the guest's RAM at :attr:`_mem`, reports what the guest prints with
    :meth:`_feed_serial`, and its run state with :meth:`_set_state` or
    through the events it passes to :meth:`_note_event`.
    """

    kind: Kind
    #: What errors call this model ("QEMU device model"...).
    what: str

    def __init__(
        self,
        *,
        domid: int | None,
        run_dir: str | os.PathLike[str] | None,
        qmp_path: str | os.PathLike[str] | None,
        reboot: bool,
        incoming: str | os.PathLike[str] | None,
    ) -> None:
        self.domid = domid
        self.reboot = reboot
        self.incoming = None if incoming is None else Path(os.path.abspath(incoming))
        self._own_dir = run_dir is None
        self.run_dir = Path(
            run_dir if run_dir is not None else tempfile.mkdtemp(prefix="torpor-dm-")
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._qmp_path = Path(qmp_path) if qmp_path is not None else self.run_dir / "qmp.sock"
        self._mem: mmap.mmap | None = None
        self._started = False
        self._stopped = False
        self._lines: list[str] = []
        self._partial = b""
        self._line_waiters = _Waiters()
        self._serial_cbs: dict[int, Callable[[str], None]] = {}
        self._event_cbs: dict[int, Callable[[QmpEvent], None]] = {}
        self._keys = itertools.count()
        self._state = "prelaunch"
        self._state_waiters = _Waiters()
        self._dead: DeviceModelError | None = None

    # what each model does its own way

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """True from :meth:`start` until the model exits or is stopped."""

    @abc.abstractmethod
    async def _launch(self, timeout: float) -> None:
        """Start the machine: boot the guest (:meth:`start` then waits for its
        boot line), or load :attr:`incoming` and leave it paused."""

    @abc.abstractmethod
    async def _shut_down(self) -> None:
        """End the machine and close what :meth:`_launch` opened (once, from :meth:`stop`)."""

    @abc.abstractmethod
    async def _send_serial(self, command: bytes) -> None:
        """Send bytes to the guest's COM1 (the model is alive)."""

    @abc.abstractmethod
    async def _stop_vcpus(self) -> None:
        """QMP ``stop`` as the model does it (the guest is running)."""

    @abc.abstractmethod
    async def _run_vcpus(self) -> None:
        """QMP ``cont`` as the model does it (the run state is one of :data:`CONTINUABLE`)."""

    @abc.abstractmethod
    async def _save(self, target: Path, part: Path, *, timeout: float) -> None:
        """Write the VM state to ``part`` and rename it to ``target`` (the model is
        alive, its state not saved already); the model stays ``postmigrate``."""

    def _last_words(self) -> str:
        """What the model said before :meth:`start` failed, for the error ("" if nothing)."""
        return ""

    # lifecycle

    @property
    def qmp_path(self) -> str:
        return str(self._qmp_path)

    @property
    def pid(self) -> int | None:
        return None

    async def start(self, *, timeout: float = 10.0) -> None:
        if self._started:
            raise DeviceModelError("device model already started", domid=self.domid)
        self._started = True
        try:
            if self.incoming is not None:
                self._check_incoming(self.incoming)
            await self._launch(timeout)
            if self.incoming is None:
                await self.wait_serial(hvm_image.LINE_BOOT, timeout=timeout, since=0)
        except BaseException as e:
            said = self._last_words()  # before stop() removes it
            if isinstance(e, DeviceModelError | Timeout) and said:
                e.message = f"{e.message}; {said}"
                e.args = (e.message,)
            await self.stop()
            raise

    def _check_incoming(self, path: Path) -> None:
        """Refuse, before the model starts, a file it cannot load: the other model's,
        or neither's.

        QEMU must not even be started on one: an empty file it would never
        notice (QEMU 7.2 waits for the stream with a ``G_IO_IN`` watch on the
        pipe, ``exec_start_incoming_migration()`` in migration/exec.c, and a bare
        hang-up never fires it: seen, it waits forever).  A file with the right
        start and anything wrong after it is the model's to refuse.
        """
        try:
            kind = saved_vm_state_kind(path)
        except DeviceModelError as e:
            raise DeviceModelError(e.message, domid=self.domid, cause=e.cause) from e
        if kind == self.kind:
            return
        if kind is None:
            what, magic = _FORMAT[self.kind]
            raise DeviceModelError(
                f"saved VM state {path} is not {what} (no {magic.decode()} magic)",
                domid=self.domid,
            )
        raise DeviceModelError(
            f"saved VM state {path} is {_FORMAT[kind][0]}: the {self.what} cannot load it",
            domid=self.domid,
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._shut_down()
        if self._mem is not None:
            with contextlib.suppress(BufferError):
                self._mem.close()
        with contextlib.suppress(FileNotFoundError):
            self._qmp_path.unlink()
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._dead is None:
            self._died(DeviceModelError(f"{self.what} was stopped", domid=self.domid))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _not_running(self) -> DeviceModelError:
        return DeviceModelError("device model is not running", domid=self.domid)

    async def pause_vcpus(self) -> None:
        if self._state == "running":
            await self._stop_vcpus()

    async def unpause_vcpus(self) -> None:
        if self._state in CONTINUABLE:
            await self._run_vcpus()

    async def _command_guest(self, command: bytes) -> None:
        if not self.alive:
            raise self._not_running()
        await self._send_serial(command)

    async def request_s3(self) -> None:
        await self._command_guest(hvm_image.CMD_S3)

    async def request_poweroff(self) -> None:
        await self._command_guest(hvm_image.CMD_POWEROFF)

    async def request_crash(self) -> None:
        await self._command_guest(hvm_image.CMD_CRASH)

    async def save_vm_state(self, path: str | os.PathLike[str], *, timeout: float) -> None:
        if not self.alive:
            raise self._not_running()
        target = Path(os.path.abspath(path))
        if not target.parent.is_dir():
            raise DeviceModelError(
                f"saving the VM state to {target}: no directory {target.parent}", domid=self.domid
            )
        if target.is_dir():
            raise DeviceModelError(
                f"saving the VM state to {target}: Is a directory", domid=self.domid
            )
        if self._state == "postmigrate":
            # QEMU 7.2 migrate_prepare(): a postmigrate VM cannot be migrated again until it ran.
            raise DeviceModelError(
                f"saving the VM state to {target}: QEMU refuses (\"Can't migrate the vm that "
                'was paused due to previous migration"): its state was saved already and it '
                "has not run since; continue it first (unpause_vcpus), or use the file saved "
                "before",
                domid=self.domid,
            )
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        await self._save(target, part, timeout=timeout)

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
            self._line_waiters.offer(line)
            for cb in list(self._serial_cbs.values()):
                cb(line)

    async def wait_serial(self, text: str, *, timeout: float, since: int | None = None) -> str:
        start = len(self._lines) if since is None else since
        for line in self._lines[start:]:
            if text in line:
                return line
        if self._dead is not None:
            raise self._dead
        try:
            # A line is offered once appended: its index is len - 1.
            return await self._line_waiters.wait(
                lambda line: len(self._lines) > start and text in line, timeout
            )
        except TimeoutError as e:
            raise Timeout(
                f"guest COM1 line {text!r}: not seen within {timeout:g} s",
                deadline=timeout,
                domid=self.domid,
            ) from e

    def on_serial(self, callback: Callable[[str], None]) -> Callable[[], None]:
        return self._subscribe(self._serial_cbs, callback)

    def _subscribe(
        self, table: dict[int, Callable[[_T], None]], callback: Callable[[_T], None]
    ) -> Callable[[], None]:
        key = next(self._keys)
        table[key] = callback

        def unsubscribe() -> None:
            table.pop(key, None)

        return unsubscribe

    # events and run state

    @property
    def run_state(self) -> str:
        return self._state

    def _set_state(self, state: str) -> None:
        self._state = state
        self._state_waiters.offer(state)

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
        return self._subscribe(self._event_cbs, callback)

    async def wait_run_state(self, states: Iterable[str], *, timeout: float) -> str:
        wanted = frozenset(states)
        if self._state in wanted:
            return self._state
        if self._dead is not None:
            raise self._dead
        try:
            return await self._state_waiters.wait(wanted.__contains__, timeout)
        except TimeoutError as e:
            raise Timeout(
                f"device model run state {'/'.join(sorted(wanted))}: still {self._state} "
                f"after {timeout:g} s",
                deadline=timeout,
                domid=self.domid,
            ) from e

    def _died(self, err: DeviceModelError) -> None:
        """The model is gone: every waiter fails with ``err``."""
        self._dead = err
        self._set_state("exited")
        self._line_waiters.fail(err)
        self._state_waiters.fail(err)

    # guest memory

    def _ram(self) -> mmap.mmap:
        if self._mem is None or self._mem.closed:
            raise DeviceModelError("guest memory is not mapped", domid=self.domid)
        return self._mem

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


class _Waiters:
    """Futures each waiting for the first value offered that passes its test."""

    def __init__(self) -> None:
        self._entries: list[tuple[Callable[[str], bool], asyncio.Future[str]]] = []

    def offer(self, value: str) -> None:
        for test, fut in self._entries:
            if not fut.done() and test(value):
                fut.set_result(value)

    def fail(self, err: BaseException) -> None:
        for _, fut in self._entries:
            if not fut.done():
                fut.set_exception(err)

    async def wait(self, test: Callable[[str], bool], timeout: float) -> str:
        """The first value offered from now on that passes ``test`` (``TimeoutError``)."""
        entry = (test, asyncio.get_running_loop().create_future())
        self._entries.append(entry)
        try:
            return await asyncio.wait_for(asyncio.shield(entry[1]), timeout)
        finally:
            self._entries.remove(entry)

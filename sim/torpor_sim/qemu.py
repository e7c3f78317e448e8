"""The simulated host's HVM device model as a real QEMU process.

An HVM domain's device model on Xen is a QEMU process (qemu-xen) that torpor
reaches over QMP.  In the simulated host it is a real ``qemu-system-x86_64``
(TCG, i440fx ``-machine pc``, SeaBIOS) running the boot sector of
:mod:`torpor_sim.hvm_image`: :class:`QemuDeviceModel`.  What it shares with
the in-process model (:mod:`torpor_sim.fake_qemu`) is in
:mod:`torpor_sim.devicemodel`; this module is what is QEMU's own: launching
it, talking to it, and moving its VM state with QEMU's own migration.

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

* :meth:`~QemuDeviceModel.save_vm_state` stops the guest (``stop`` on the
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
import mmap
import os
import shlex
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from torpor.errors import DeviceModelError, Timeout
from torpor.qmp import QmpClient, QmpEvent
from torpor_sim import hvm_image
from torpor_sim.devicemodel import RAM_BYTES, DeviceModelBase, Kind
from torpor_sim.qmp_server import listening_socket

__all__ = ["QemuDeviceModel", "qemu_binary", "running_qemu_pids"]

QEMU_BINARY = "qemu-system-x86_64"
#: The ``-name`` every QEMU started here carries: it names the owning process.
_NAME_TAG = "torpor-sim"
_instances = itertools.count(1)
_live_pids: set[int] = set()


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64`` on ``PATH``, or ``None``."""
    return shutil.which(QEMU_BINARY)


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
    what = "QEMU device model"

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
        super().__init__(
            domid=domid, run_dir=run_dir, qmp_path=qmp_path, reboot=reboot, incoming=incoming
        )
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
        self._save_lock = asyncio.Lock()
        self._migration_set_up = False
        self.name = f"{_NAME_TAG}.{os.getpid()}.{next(_instances)}"

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

    async def _launch(self, timeout: float) -> None:
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
        qmp = listening_socket(self._qmp_path)
        aux = listening_socket(self._aux_path)
        ser = listening_socket(self._serial_path)
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
        aux_client = QmpClient(domid=self.domid, name=f"{self.name}-aux")
        await aux_client.connect(self._aux_path, timeout=timeout)
        self._aux = aux_client
        aux_client.subscribe(self._note_event)
        if self.incoming is not None:
            await self._load_incoming(aux_client, self.incoming, deadline)

    def _last_words(self) -> str:
        tail = self._log_tail() if self._proc is not None else ""
        return f"QEMU said: {tail}" if tail else ""

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

    async def _save(self, target: Path, part: Path, *, timeout: float) -> None:
        aux = self._aux
        if aux is None:
            raise self._not_running()
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

    async def _shut_down(self) -> None:
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
        for p in (self._aux_path, self._serial_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def _stop_vcpus(self) -> None:
        if self._aux is not None:
            await self._aux.stop()

    async def _run_vcpus(self) -> None:
        if self._aux is not None:
            await self._aux.cont()
            if self._state == "postmigrate":  # no event says so: QEMU now runs it
                self._set_state(await self._aux.query_status())

    async def _send_serial(self, command: bytes) -> None:
        writer = self._serial_writer
        if writer is None:
            raise self._not_running()
        try:
            writer.write(command)
            await writer.drain()
        except OSError as e:
            raise DeviceModelError(f"guest COM1: {e}", domid=self.domid, cause=e) from e


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

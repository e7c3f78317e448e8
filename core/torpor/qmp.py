"""torpor's device-model client: QMP over QEMU's own ``qemu.qmp``, and a qemu-ga client.

An HVM guest's device model is QEMU (qemu-xen on real Xen, with its QMP socket
at ``/var/run/xen/qmp-libxl-<domid>``; a plain ``qemu-system-x86_64`` in the
simulated host).  :class:`QmpClient` is the thin adapter torpor talks to it
through.  It uses ``qemu.qmp.QMPClient`` (async) and handles that library's
quirks where they bite, each named at the place it is handled:

* ``connect()`` neither retries nor has a deadline, and waits for the QMP
  greeting forever.  The socket is connected here (a missing socket or one
  nobody listens on fails at once: qemu-xen's socket exists as long as the
  device model does) and the handshake runs under the caller's deadline.
* A reply whose ``id`` matches nothing is logged and dropped (qmp-spec:
  "clients should drop all the responses that have an unknown id"), so the
  command that waits for it would wait forever: every command has a deadline.
* The default ``events`` listener queues and keeps a history of every event,
  unbounded, and cannot be removed.  Its ``event_filter`` takes each event
  synchronously in the reader's dispatch and rejects it, so nothing piles
  up; this also means an event that precedes a reply on the wire is recorded
  before the command returns.
* When the connection dies the library only schedules a disconnect; nothing
  wakes a caller who is waiting for an *event*.  A watcher turns the runstate
  change into a :class:`~torpor.errors.DeviceModelError` for every waiter, and
  every later call fails fast.
* ``disconnect()`` drains the writer first and can stall on a peer that never
  reads; the socket is ours, so a close that overruns its deadline shuts it
  down under the library.
* A server that hangs up right after the handshake makes ``connect()`` trip
  its own ``assert self.runstate == Runstate.RUNNING``: that
  ``AssertionError`` is a lost connection too.

Every failure is a :class:`~torpor.errors.DeviceModelError` (carrying the
``domid`` given at construction and the underlying cause); a deadline is a
:class:`~torpor.errors.Timeout`.

QEMU facts the helpers rely on (QEMU 7.2, softmmu/runstate.c, qapi/*.json):
``stop`` on a guest in S3 changes nothing (the run state stays ``suspended``,
no ``STOP`` event); ``system_wakeup`` refuses a guest that is not in S3
("Unable to wake up: guest is not in suspended state") and emits ``WAKEUP``
before it replies; ``xen-save-devices-state`` exists in every
``qemu-system-x86_64`` (its QAPI schema has no build condition), stops a
running guest and restarts it (``STOP``, ``RESUME``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs
from qemu.qmp import (
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
)

from torpor.errors import DeviceModelError, QmpCommandError, Timeout

__all__ = [
    "DEFAULT_TIMEOUT",
    "DeviceModel",
    "GuestAgent",
    "QmpClient",
    "QmpCommandError",
    "QmpEvent",
]

log = logging.getLogger(__name__)

#: Default deadline of one QMP command, in seconds.
DEFAULT_TIMEOUT = 10.0
#: Events kept for :meth:`QmpClient.wait_event` ``since=`` look-backs.
EVENT_HISTORY = 1024

T = TypeVar("T")


@attrs.frozen
class QmpEvent:
    """One QMP event: its name, its ``data`` and QEMU's timestamp (seconds).

    ``seq`` numbers the events one connection has seen, from 0; compare it
    with :meth:`QmpClient.event_mark`.
    """

    name: str
    data: Mapping[str, Any]
    timestamp: float
    seq: int


def _event_from(msg: Mapping[str, Any], seq: int) -> QmpEvent:
    ts = msg.get("timestamp") or {}
    try:
        when = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
    except (TypeError, ValueError, AttributeError):
        when = 0.0
    data = msg.get("data")
    return QmpEvent(str(msg.get("event")), dict(data) if isinstance(data, dict) else {}, when, seq)


class QmpClient:
    """A QMP connection to one device model.

    :param domid: the domain the device model serves; carried by every error.
    :param name: a name for the connection in logs.

    Use as ``async with QmpClient(domid=3) as qmp: await qmp.connect(path)``,
    or :meth:`open`.
    """

    def __init__(self, *, domid: int | None = None, name: str = "torpor") -> None:
        self.domid = domid
        self._name = name
        self._client: QMPClient | None = None
        self._sock: socket.socket | None = None
        self._path: str | None = None
        self._seq = itertools.count()
        self._next_seq = 0
        self._history: collections.deque[QmpEvent] = collections.deque(maxlen=EVENT_HISTORY)
        self._waiters: list[
            tuple[frozenset[str], Callable[[QmpEvent], bool] | None, asyncio.Future[QmpEvent]]
        ] = []
        self._subscribers: dict[int, tuple[frozenset[str] | None, Callable[[QmpEvent], None]]] = {}
        self._sub_ids = itertools.count()
        self._watcher: asyncio.Task[None] | None = None
        self._lost: DeviceModelError | None = None
        self._closing = False
        self._commands: frozenset[str] | None = None

    # ------------------------------------------------------------------ connection

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        domid: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> QmpClient:
        """Construct and :meth:`connect` in one step."""
        client = cls(domid=domid)
        await client.connect(path, timeout=timeout)
        return client

    async def connect(
        self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """Connect to the QMP socket at ``path``, read the greeting, negotiate.

        A socket that does not exist, or that nobody listens on, is an
        immediate :class:`DeviceModelError` (no retry: a device model's QMP
        socket exists for as long as the device model does; the simulated
        host binds it before QEMU starts).  The greeting and
        ``qmp_capabilities`` must complete within ``timeout``.
        """
        if self._client is not None:
            raise DeviceModelError("QMP client already connected", domid=self.domid)
        self._path = os.fspath(path)
        self._commands = None  # perhaps another QEMU than last time
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, self._path), timeout)
        except FileNotFoundError as e:
            sock.close()
            raise self._error(f"no QMP socket at {self._path}: no device model", e) from e
        except (ConnectionRefusedError, ConnectionResetError) as e:
            sock.close()
            raise self._error(f"nothing listens on the QMP socket {self._path}", e) from e
        except TimeoutError as e:
            sock.close()
            raise self._timeout(f"connecting to {self._path}", timeout) from e
        except OSError as e:
            sock.close()
            raise self._error(f"cannot connect to the QMP socket {self._path}: {e}", e) from e

        client = QMPClient(self._name)
        # Quirk: the default listener (which cannot be removed) queues and keeps every
        # event forever.  Its filter (a public attribute) sees each event first: take the
        # event there and reject it, so nothing is queued or kept.
        client.events.event_filter = self._tap
        self._sock = sock
        try:
            await asyncio.wait_for(client.connect(sock), timeout)
        except TimeoutError as e:
            self._abort_socket()
            raise self._timeout(f"QMP greeting from {self._path}", timeout) from e
        except QMPError as e:
            self._abort_socket()
            cause = getattr(e, "exc", e)
            raise self._error(f"QMP handshake with {self._path} failed: {cause!r}", e) from e
        except AssertionError as e:
            # Quirk: a server that hangs up right after the handshake makes connect()
            # fail its own `runstate == RUNNING` assertion (the reader already died).
            self._abort_socket()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 1.0)
            raise self._error(f"QMP connection to {self._path} lost during the handshake", e) from e
        self._client = client
        self._lost = None
        self._watcher = asyncio.create_task(self._watch(client), name=f"qmp-watch-{self._path}")

    @property
    def connected(self) -> bool:
        """True while the connection is up."""
        return self._client is not None and self._lost is None

    @property
    def greeting(self) -> Mapping[str, Any] | None:
        """The server's QMP greeting (``{"QMP": {"version": ..., "capabilities": ...}}``)."""
        if self._client is None or self._client.greeting is None:
            return None
        return self._client.greeting._asdict()

    async def close(self, *, timeout: float = 2.0) -> None:
        """Disconnect; never raises for a connection that already died, never hangs."""
        client, self._client = self._client, None
        if client is None:
            return
        self._closing = True
        try:
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._watcher
            try:
                await asyncio.wait_for(client.disconnect(), timeout)
            except TimeoutError:
                # Quirk: disconnect() flushes the writer first; a peer that never reads
                # stalls it.  Shut the socket down under the library (not close: a closed
                # fd leaves epoll silently and the transport would never hear of it).
                if self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), timeout)
            except Exception as e:  # the bottom half's error (EOF, garbage...): already lost
                log.debug("QMP %s: disconnect reported %r", self._path, e)
        finally:
            self._fail_waiters(self._error("QMP connection closed", None))
            self._abort_socket()
            self._closing = False

    async def __aenter__(self) -> QmpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ commands

    async def execute(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        QEMU's error reply is a :class:`QmpCommandError`; a lost connection a
        :class:`DeviceModelError`; no reply within ``timeout`` a :class:`Timeout`.
        """
        client = self._live()
        try:
            return await asyncio.wait_for(client.execute(cmd, args), timeout)
        except ExecuteError as e:
            raise QmpCommandError(
                f"QMP {cmd}: {e.error_class}: {e.error.error.desc}",
                command=cmd,
                error_class=e.error_class,
                desc=e.error.error.desc,
                domid=self.domid,
                cause=e,
            ) from e
        except TimeoutError as e:
            raise self._timeout(f"QMP {cmd}", timeout) from e
        except ExecInterruptedError as e:
            raise await self._lost_error(f"QMP {cmd}", e) from e
        except QMPError as e:  # StateError (disconnecting), BadReplyError...
            raise await self._lost_error(f"QMP {cmd}", e) from e

    async def query_status(self, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        """QEMU's run state: ``running``, ``paused``, ``suspended``, ``shutdown``..."""
        reply = await self.execute("query-status", timeout=timeout)
        return str(self._field(reply, "status", "query-status"))

    async def stop(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """QMP ``stop``: pause the vCPUs (libxl's first step of an HVM save).

        A guest in S3 stays ``suspended`` and no ``STOP`` event follows.
        """
        await self.execute("stop", timeout=timeout)

    async def cont(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """QMP ``cont``: resume the vCPUs (libxl resumes the device model *before*
        the domain: commit f33b4fc4ef).  A no-op on a guest in S3."""
        await self.execute("cont", timeout=timeout)

    async def save_devices_state(
        self, path: str | os.PathLike[str], live: bool = False, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """``xen-save-devices-state``: write the device state (not RAM) to ``path``.

        libxl__qmp_suspend_save sends ``stop`` first.  QEMU writes the file
        itself, so ``path`` is a path in the device model's file system.
        """
        await self.execute(
            "xen-save-devices-state", {"filename": os.fspath(path), "live": live}, timeout=timeout
        )

    async def set_global_dirty_log(self, enable: bool, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """``xen-set-global-dirty-log``: QEMU's log-dirty on or off (its VRAM), what
        libxl's ``switch_qemu_logdirty`` sends for an HVM guest's live migration."""
        await self.execute("xen-set-global-dirty-log", {"enable": enable}, timeout=timeout)

    async def load_devices_state(
        self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """``xen-load-devices-state``: load a device state saved by :meth:`save_devices_state`.

        The guest must be stopped.  Real Xen restores a device model with
        ``-incoming`` at its start (libxl__build_device_model_args), not with
        this command (COLO uses it).  Seen here: on a plain QEMU 7.2 ``pc``
        machine it fails ("Configuration section missing") and QEMU then
        aborts in ``migration_incoming_state_destroy()`` (an assertion in
        util/yank.c): the reply never comes and the connection drops, which
        this method reports as a :class:`DeviceModelError`.
        """
        await self.execute("xen-load-devices-state", {"filename": os.fspath(path)}, timeout=timeout)

    async def system_wakeup(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """``system_wakeup``: wake a guest from S3 (``WAKEUP`` follows).

        QEMU refuses a guest that is not in S3 (a :class:`QmpCommandError`).
        """
        await self.execute("system_wakeup", timeout=timeout)

    async def wakeup_supported(self, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """``query-current-machine`` ``wakeup-suspend-support``: can QEMU wake this guest?"""
        reply = await self.execute("query-current-machine", timeout=timeout)
        return bool(self._field(reply, "wakeup-suspend-support", "query-current-machine"))

    async def commands(self, *, timeout: float = DEFAULT_TIMEOUT) -> frozenset[str]:
        """The command names ``query-commands`` lists, asked once per connection: a
        QEMU's commands are fixed for its lifetime, and the reply is a few hundred
        entries -- not a round trip to spend again while a guest is stopped."""
        if self._commands is None:
            reply = await self.execute("query-commands", timeout=timeout)
            if not isinstance(reply, list):
                raise self._error(f"query-commands: unexpected reply {reply!r}", None)
            self._commands = frozenset(
                str(c["name"]) for c in reply if isinstance(c, dict) and "name" in c
            )
        return self._commands

    async def human_monitor_command(self, line: str, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Run one HMP command line (``xp /4wx 0x1000``...) and return its output."""
        reply = await self.execute("human-monitor-command", {"command-line": line}, timeout=timeout)
        return str(reply)

    # ------------------------------------------------------------------ events

    def event_mark(self) -> int:
        """The ``seq`` the next event will get: pass it as ``since=`` to catch an
        event that arrives before :meth:`wait_event` is called."""
        return self._next_seq

    def events_since(self, mark: int) -> list[QmpEvent]:
        """Events with ``seq >= mark`` still in the (bounded) history."""
        return [e for e in self._history if e.seq >= mark]

    async def wait_event(
        self,
        names: str | Iterable[str],
        *,
        timeout: float,
        since: int | None = None,
        match: Callable[[QmpEvent], bool] | None = None,
    ) -> QmpEvent:
        """Wait for one of ``names`` (and ``match``, if given).

        With ``since`` (an :meth:`event_mark`), an event already received at
        or after that mark satisfies the wait.  A lost connection raises
        :class:`DeviceModelError`; the deadline :class:`Timeout`.
        """
        wanted = frozenset([names] if isinstance(names, str) else names)
        if since is not None:
            for ev in self._history:
                if ev.seq >= since and ev.name in wanted and (match is None or match(ev)):
                    return ev
        if self._lost is not None:
            raise self._lost
        self._live()
        fut: asyncio.Future[QmpEvent] = asyncio.get_running_loop().create_future()
        entry = (wanted, match, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError as e:
            raise self._timeout(f"waiting for QMP event {'/'.join(sorted(wanted))}", timeout) from e
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def subscribe(
        self, callback: Callable[[QmpEvent], None], names: Iterable[str] | None = None
    ) -> Callable[[], None]:
        """Call ``callback(event)`` for each event (of ``names``) as it arrives.

        The callback runs in the reader's dispatch, on the event loop: keep it
        short and non-blocking; its exceptions are logged, never propagated.
        Returns a function that unsubscribes.
        """
        key = next(self._sub_ids)
        self._subscribers[key] = (None if names is None else frozenset(names), callback)

        def unsubscribe() -> None:
            self._subscribers.pop(key, None)

        return unsubscribe

    # ------------------------------------------------------------------ internals

    def _tap(self, msg: Message) -> bool:
        self._on_event(msg)
        return False

    def _on_event(self, msg: Message) -> None:
        ev = _event_from(msg, next(self._seq))
        self._next_seq = ev.seq + 1
        self._history.append(ev)
        for wanted, match, fut in list(self._waiters):
            if fut.done() or ev.name not in wanted:
                continue
            try:
                ok = match is None or match(ev)
            except Exception as e:
                fut.set_exception(e)
                continue
            if ok:
                fut.set_result(ev)
        for names, callback in list(self._subscribers.values()):
            if names is None or ev.name in names:
                try:
                    callback(ev)
                except Exception:
                    log.exception("QMP event subscriber failed on %s", ev.name)

    async def _watch(self, client: QMPClient) -> None:
        """Turn a connection that dies under us into an error for every waiter."""
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        if self._closing:
            return
        cause: BaseException | None = None
        try:
            await asyncio.wait_for(client.disconnect(), 2.0)
        except Exception as e:  # EOFError, a protocol error, a timeout
            cause = e
        if cause is None:
            what = "the device model closed the QMP connection"
        else:
            what = f"QMP connection lost: {type(cause).__name__}: {cause}"
        self._lost = self._error(what, cause)
        self._fail_waiters(self._lost)

    def _fail_waiters(self, err: DeviceModelError) -> None:
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(err)

    def _live(self) -> QMPClient:
        if self._lost is not None:
            raise self._lost
        if self._client is None:
            raise self._error("QMP client is not connected", None)
        return self._client

    async def _lost_error(self, what: str, exc: BaseException) -> DeviceModelError:
        client = self._client
        if self._lost is None and client is not None and client.runstate == Runstate.RUNNING:
            # The connection is up: a reply qemu.qmp could not make sense of (an
            # error object without class/desc: BadReplyError).  Nothing to wait for.
            return self._error(f"{what}: bad reply: {exc}", exc)
        # Let the watcher name the bottom half's cause (EOF, garbage...) if it can.
        if self._watcher is not None and not self._watcher.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._watcher), 1.0)
        if self._lost is not None:
            return self._error(f"{what}: {self._lost.message}", self._lost.cause or exc)
        return self._error(f"{what}: connection lost ({exc})", exc)

    def _abort_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _field(self, reply: Any, key: str, cmd: str) -> Any:
        if not isinstance(reply, dict) or key not in reply:
            raise self._error(f"{cmd}: reply without {key!r}: {reply!r}", None)
        return reply[key]

    def _error(self, message: str, cause: BaseException | None) -> DeviceModelError:
        return DeviceModelError(message, domid=self.domid, cause=cause)

    def _timeout(self, what: str, timeout: float) -> Timeout:
        return Timeout(
            f"{what}: no answer within {timeout:g} s", deadline=timeout, domid=self.domid
        )


#: The name the design gives the device-model client.
DeviceModel = QmpClient


# ---------------------------------------------------------------------- qemu-ga


class GuestAgent:
    """A client of the QEMU guest agent (qemu-ga) protocol.

    qemu-ga speaks QMP's JSON without a greeting or capabilities.  Its
    channel may hold stale replies (from a client that gave up), so a session
    starts with :meth:`sync`: a 0xFF byte resets the agent's JSON parser, and
    ``guest-sync-delimited`` echoes a random id after a 0xFF sentinel; what
    comes before is discarded (qga/qapi-schema.json, guest-sync-delimited).
    """

    def __init__(self, *, domid: int | None = None) -> None:
        self.domid = domid
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._path = ""
        self._pending_reply: asyncio.Future[dict[str, Any]] | None = None

    async def connect(
        self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """Connect to the agent's socket (the host end of its virtio-serial channel)."""
        self._path = os.fspath(path)
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self._path), timeout
            )
        except TimeoutError as e:
            raise Timeout(
                f"connecting to the guest agent at {self._path}", deadline=timeout, domid=self.domid
            ) from e
        except OSError as e:
            raise DeviceModelError(
                f"cannot connect to the guest agent at {self._path}: {e}", domid=self.domid, cause=e
            ) from e

    async def close(self) -> None:
        """Close the channel."""
        pending, self._pending_reply = self._pending_reply, None
        if pending is not None and not pending.done():
            pending.cancel()
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def __aenter__(self) -> GuestAgent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def sync(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Flush the channel: ``guest-sync-delimited`` with a fresh id."""
        token = random.randrange(1, 2**31)
        async with self._lock:
            await self._run(self._sync(token), "guest-sync-delimited", timeout)

    async def execute(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run one agent command and return its ``return`` value."""
        async with self._lock:
            return await self._run(self._command(cmd, args), cmd, timeout)

    async def ping(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """``guest-ping``."""
        await self.execute("guest-ping", timeout=timeout)

    async def suspend_ram(self, confirmed: Awaitable[object], *, timeout: float) -> None:
        """``guest-suspend-ram``: ask the guest OS to enter S3.

        qemu-ga sends no reply on success (the guest is asleep); it replies
        only with an error.  Success is seen on the device model's QMP, so the
        caller passes ``confirmed`` (e.g. ``qmp.wait_event("SUSPEND", since=mark,
        ...)``): this returns when it completes, raises
        :class:`DeviceModelError` on an error reply, :class:`Timeout` if
        neither comes within ``timeout``.
        """
        confirm = asyncio.ensure_future(confirmed)
        try:
            async with self._lock:
                writer, reader = self._io()
                self._send(writer, {"execute": "guest-suspend-ram"})
                reply = asyncio.ensure_future(self._read_message(reader))
                try:
                    done, _ = await asyncio.wait(
                        {confirm, reply}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    reply.cancel()
                if confirm in done:
                    confirm.result()
                    return
                if reply in done and not reply.cancelled():
                    bad = reply.exception()
                    if bad is not None:  # EOF, garbage, an overlong line...
                        raise DeviceModelError(
                            f"guest-suspend-ram: {type(bad).__name__}: {bad}",
                            domid=self.domid,
                            cause=bad,
                        ) from bad
                    msg = reply.result()
                    if "error" in msg:
                        raise self._agent_error("guest-suspend-ram", msg)
                    raise DeviceModelError(
                        f"guest-suspend-ram: unexpected reply {msg!r}", domid=self.domid
                    )
                raise Timeout(
                    f"guest-suspend-ram: guest not asleep within {timeout:g} s",
                    deadline=timeout,
                    domid=self.domid,
                )
        finally:
            if not confirm.done():
                confirm.cancel()
                with contextlib.suppress(BaseException):
                    await confirm

    async def request_suspend_ram(
        self, on_error: Callable[[DeviceModelError], None], *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """Send ``guest-suspend-ram`` and return: ask, don't wait.

        For a caller that waits for the sleep itself (torpor's orchestrator,
        on the device model's ``SUSPEND`` event).  The channel is flushed
        first (``guest-sync-delimited``), which also proves the agent answers.
        qemu-ga replies only on failure: if it does, ``on_error`` is called
        with the error (in this loop).  The channel then belongs to that reply:
        other commands raise :class:`DeviceModelError` until :meth:`close`.
        """
        await self.sync(timeout=timeout)
        async with self._lock:
            writer, reader = self._io()
            self._send(writer, {"execute": "guest-suspend-ram"})
            try:
                await asyncio.wait_for(writer.drain(), timeout)
            except (OSError, TimeoutError) as e:
                raise DeviceModelError(
                    f"guest-suspend-ram: cannot send to the agent: {e}", domid=self.domid, cause=e
                ) from e

        def settled(task: asyncio.Future[dict[str, Any]]) -> None:
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                return  # the agent went away: the guest may well be asleep
            msg = task.result()
            if "error" in msg:
                on_error(self._agent_error("guest-suspend-ram", msg))
            else:
                on_error(
                    DeviceModelError(
                        f"guest-suspend-ram: unexpected reply {msg!r}", domid=self.domid
                    )
                )

        self._pending_reply = asyncio.ensure_future(self._read_message(reader))
        self._pending_reply.add_done_callback(settled)

    # internals

    def _io(self) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
        if self._writer is None or self._reader is None:
            raise DeviceModelError("guest agent is not connected", domid=self.domid)
        if self._pending_reply is not None and not self._pending_reply.done():
            # Its reader owns the stream (a second reader is a RuntimeError).
            raise DeviceModelError(
                "guest agent channel awaits the guest-suspend-ram reply; close it first",
                domid=self.domid,
            )
        return self._writer, self._reader

    async def _run(self, coro: Awaitable[T], what: str, timeout: float) -> T:
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError as e:
            raise Timeout(
                f"guest agent {what}: no answer within {timeout:g} s",
                deadline=timeout,
                domid=self.domid,
            ) from e
        except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as e:
            raise DeviceModelError(
                f"guest agent {what}: {type(e).__name__}: {e}", domid=self.domid, cause=e
            ) from e

    def _send(
        self, writer: asyncio.StreamWriter, msg: Mapping[str, object], *, flush: bool = False
    ) -> None:
        data = json.dumps(msg).encode() + b"\n"
        writer.write((b"\xff" if flush else b"") + data)

    async def _read_message(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        line = b""
        while not line:
            raw = await reader.readline()
            if not raw:
                raise EOFError("the guest agent closed the channel")
            line = raw.lstrip(b"\xff").strip()
        try:
            msg = json.loads(line)
        except RecursionError as e:  # not a JSONDecodeError: nested deeper than Python goes
            raise ValueError("guest agent sent JSON nested too deep") from e
        if not isinstance(msg, dict):
            raise ValueError(f"guest agent sent a non-object: {msg!r}"[:200])
        return msg

    async def _sync(self, token: int) -> None:
        writer, reader = self._io()
        self._send(
            writer, {"execute": "guest-sync-delimited", "arguments": {"id": token}}, flush=True
        )
        await writer.drain()
        # Discard everything up to the 0xFF sentinel, then replies until ours.
        await reader.readuntil(b"\xff")
        while True:
            msg = await self._read_message(reader)
            if msg.get("return") == token:
                return
            if "error" in msg:
                raise self._agent_error("guest-sync-delimited", msg)

    async def _command(self, cmd: str, args: Mapping[str, object] | None) -> Any:
        writer, reader = self._io()
        msg: dict[str, object] = {"execute": cmd}
        if args:
            msg["arguments"] = dict(args)
        self._send(writer, msg)
        await writer.drain()
        reply = await self._read_message(reader)
        if "error" in reply:
            raise self._agent_error(cmd, reply)
        if "return" not in reply:
            raise DeviceModelError(
                f"guest agent {cmd}: unexpected reply {reply!r}", domid=self.domid
            )
        return reply["return"]

    def _agent_error(self, cmd: str, msg: Mapping[str, Any]) -> QmpCommandError:
        err = msg.get("error") or {}
        cls = str(err.get("class", "GenericError")) if isinstance(err, dict) else "GenericError"
        desc = str(err.get("desc", err)) if isinstance(err, dict) else str(err)
        return QmpCommandError(
            f"guest agent {cmd}: {cls}: {desc}",
            command=cmd,
            error_class=cls,
            desc=desc,
            domid=self.domid,
        )

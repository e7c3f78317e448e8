"""torpor's xenstore adapter: pyxs 0.4.1, wrapped so it cannot hang or lie.

Every part of torpor talks to xenstore through :class:`Xenstore`.  It keeps
pyxs for what pyxs does well -- the Unix-socket transport, packet framing,
path validation and the router thread that demultiplexes replies -- and
handles, in this module and nowhere else, the quirks of pyxs that a toolstack
cannot live with (each has a test in tests/test_xenstore_hostile.py):

=====================================  =============================================
pyxs 0.4.1 quirk                       handled by
=====================================  =============================================
bytes-only API                         str paths and values; ``raw=True`` for bytes
rejects empty values (``write(p,b"")``  packets are built here, not by
and any byte outside 7-bit ASCII)      ``Client.execute_command``; ``""`` is legal
privileged calls refused client-side   requests go straight to xenstored, which
unless ``Client.SU``                   decides (EACCES), as libxenstore does
a router-thread error (socket closed,  :class:`_Router` catches it, fails every
unknown req_id, garbage) makes every   pending call and marks the connection lost:
pending and later call hang forever    pending and later calls raise
                                       :class:`~torpor.errors.XenstoreConnectionLost`
``Monitor.wait()`` has no timeout and  ``Monitor`` is not used: one dispatcher routes
spins at 100 % CPU on an event whose   events by token to callbacks; waits have
path is outside the watched subtree    deadlines (:meth:`Xenstore.wait`)
an XS_ERROR without its trailing NUL   :func:`torpor.xs_wire.decode_error`
decodes as errno 0
a length field is trusted: a hostile   :class:`_Connection` refuses a payload over
header makes it allocate 4 GiB         ``XENSTORE_PAYLOAD_MAX`` and drops the link
two send() calls per packet (header,   one buffer, one ``sendall``
then payload)
req_id counter is process-global and   per-connection 32-bit req_ids
overflows the 32-bit wire field
=====================================  =============================================

Threading model: one pyxs router thread per connection reads replies and
watch events.  Callers may use the connection from any number of threads
(synchronous methods block on their own reply, with a deadline) and from
asyncio (:attr:`Xenstore.aio`: each reply resolves a future through
``call_soon_threadsafe``).  Watch callbacks run on the router thread: they must
only hand the event off (set an event, schedule a callback) and never call
xenstore themselves -- the router would be waiting on itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar, overload

import attrs
import pyxs
import pyxs.client
import pyxs.connection
import pyxs.exceptions
import pyxs.helpers
from pyxs._internal import Packet as _PyxsPacket

from torpor.errors import (
    BackendUnavailable,
    Timeout,
    TransactionConflict,
    UsageError,
    XenstoreConnectionLost,
    XenstoreError,
)
from torpor.xs_wire import HEADER, PAYLOAD_MAX, Op, decode_error

__all__ = [
    "DEFAULT_SOCKET",
    "AsyncXenstore",
    "Perm",
    "Transaction",
    "Watch",
    "Xenstore",
    "default_socket_path",
]

T = TypeVar("T")

#: Where Xen's C xenstored listens in dom0.
DEFAULT_SOCKET = "/var/run/xenstored/socket"
_NUL = b"\0"
_SPECIAL_WATCHES = frozenset({"@introduceDomain", "@releaseDomain"})
#: How many times :meth:`Xenstore.run_transaction` retries a conflicting commit.
DEFAULT_TX_ATTEMPTS = 16


def default_socket_path() -> str:
    """The socket libxenstore would use: ``$XENSTORED_PATH``, else the rundir's."""
    return os.environ.get("XENSTORED_PATH") or os.path.join(
        os.environ.get("XENSTORED_RUNDIR", "/var/run/xenstored"), "socket"
    )


@attrs.frozen
class Perm:
    """One xenstore permission entry, ``<access><domid>`` on the wire.

    The first entry of a node's list names its owner and the access every
    domain not listed gets; later entries grant ``domid`` its ``access``:
    ``n`` none, ``r`` read, ``w`` write, ``b`` both.
    """

    domid: int
    access: Literal["n", "r", "w", "b"]

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        if len(text) < 2 or text[0] not in "nrwb" or not text[1:].isdigit():
            raise UsageError(f"invalid xenstore permission {text!r} (want e.g. 'r0', 'b5')")
        return cls(int(text[1:]), text[0])  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# pyxs, made to fail loudly


def _packet(op: int, rq_id: int, tx_id: int, payload: bytes) -> Any:
    """A pyxs Packet, built without ``Packet()``: it rejects op codes pyxs does
    not know (RESET_WATCHES, DIRECTORY_PART) and payloads we have checked."""
    return tuple.__new__(_PyxsPacket, (op, rq_id, tx_id, len(payload), payload))


class _Connection(pyxs.connection.UnixSocketConnection):  # type: ignore[misc]
    """pyxs's Unix-socket transport with the header checked before the payload.

    pyxs trusts the length field and allocates whatever it says; a payload over
    ``XENSTORE_PAYLOAD_MAX`` can only come from a broken or hostile server.
    """

    def send(self, packet: Any) -> None:
        # pyxs sends header and payload with two sendall()s: two syscalls, and
        # two releases of the GIL to contend for again.  One buffer, one send.
        if not self.is_connected:
            raise pyxs.exceptions.ConnectionError("not connected")
        try:
            self.transport.send(
                HEADER.pack(packet.op, packet.rq_id, packet.tx_id, packet.size) + packet.payload
            )
        except OSError as e:
            self.close()
            raise pyxs.exceptions.ConnectionError(f"writing to {self.path!r}: {e}") from e

    def recv(self) -> Any:
        if not self.is_connected:
            raise pyxs.exceptions.ConnectionError("not connected")
        try:
            header = self.transport.recv(HEADER.size)
            op, rq_id, tx_id, size = HEADER.unpack(header)
            if size > PAYLOAD_MAX:
                raise pyxs.exceptions.ConnectionError(
                    f"xenstored sent a {size}-byte payload (max {PAYLOAD_MAX})"
                )
            payload = self.transport.recv(size) if size else b""
        except OSError as e:
            self.close()
            raise pyxs.exceptions.ConnectionError(f"reading from {self.path!r}: {e}") from e
        return _packet(op, rq_id, tx_id, payload)


class _Pending:
    """A request awaiting its reply; ``deliver``/``fail`` run on the router thread."""

    __slots__ = ("on_done", "op", "path", "tx_id")

    def __init__(
        self,
        op: Op,
        tx_id: int,
        path: str | None,
        on_done: Callable[[bytes | None, BaseException | None], None],
    ) -> None:
        self.op = op
        self.tx_id = tx_id
        self.path = path
        self.on_done = on_done

    # pyxs's router calls ``rvar.set(packet)`` for the reply to this req_id.
    def set(self, packet: Any) -> None:
        if packet.op == Op.ERROR:
            code = decode_error(packet.payload)
            self.on_done(None, XenstoreError.from_errno(code, op=self.op.name, path=self.path))
        elif packet.op != self.op or packet.tx_id != self.tx_id:
            # The stream can no longer be trusted: fail this call, then let the
            # router die (which fails every other one).
            self.on_done(
                None,
                XenstoreConnectionLost(
                    f"xenstored answered {self.op.name} with type {packet.op} tx {packet.tx_id}"
                ),
            )
            raise pyxs.exceptions.UnexpectedPacket(packet)
        else:
            self.on_done(packet.payload, None)


class _EventSink:
    """Stands in for pyxs's per-token Monitor list: every watch event comes here."""

    def __init__(self, dispatch: Callable[[bytes, bytes], None]) -> None:
        self._dispatch = dispatch
        self.events = self  # the router does ``monitor.events.put(event)``

    def put(self, event: Any) -> None:
        self._dispatch(event.path, event.token)


class _Monitors(dict[bytes, list[_EventSink]]):
    def __init__(self, sink: _EventSink) -> None:
        super().__init__()
        self._sink = [sink]

    def __missing__(self, key: bytes) -> list[_EventSink]:
        return self._sink


class _Router(pyxs.client.Router):  # type: ignore[misc]
    """pyxs's router thread, which fails every waiter when it dies.

    pyxs lets the thread die on any error and leaves waiters blocked forever;
    here the death is caught, recorded, and every pending request is failed
    with :class:`XenstoreConnectionLost`, as is every later one.
    """

    def __init__(
        self,
        connection: _Connection,
        on_event: Callable[[bytes, bytes], None],
        on_lost: Callable[[XenstoreConnectionLost], None],
    ) -> None:
        super().__init__(connection)
        self.monitors = _Monitors(_EventSink(on_event))
        self.thread.name = f"torpor-xenstore-router({connection.path})"
        self.lost: XenstoreConnectionLost | None = None
        self._on_lost = on_lost
        self._closing = False

    def __call__(self) -> None:
        reason: BaseException | None = None
        try:
            super().__call__()
        except BaseException as e:  # anything at all kills the stream
            reason = e
        why = (
            "connection closed by torpor"
            if self._closing
            else (
                f"xenstore connection lost: {reason!r}"
                if reason
                else "xenstored closed the connection"
            )
        )
        self._die(XenstoreConnectionLost(why, cause=reason))

    def _die(self, err: XenstoreConnectionLost) -> None:
        with self.send_lock:
            if self.lost is None:
                self.lost = err
            pending = list(self.rvars.values())
            self.rvars.clear()
        for p in pending:
            with contextlib.suppress(Exception):
                p.on_done(None, self.lost)
        self._on_lost(self.lost)

    def submit(self, packet: Any, pending: _Pending) -> None:
        with self.send_lock:
            if self.lost is not None:
                raise self.lost
            self.rvars[packet.rq_id] = pending
            try:
                self.connection.send(packet)
            except Exception as e:
                self.rvars.pop(packet.rq_id, None)
                raise XenstoreConnectionLost(f"xenstore send failed: {e}", cause=e) from e

    def terminate(self) -> None:
        self._closing = True
        # pyxs wakes the router's select() and joins the thread; a router blocked
        # in recv() on half a frame (a server that stalled mid-reply) never sees
        # the wake-up and the join never returns.  Shut the socket down under it.
        sock = getattr(getattr(self.connection, "transport", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            super().terminate()


# --------------------------------------------------------------------------
# request encoding, shared by the sync and async front-ends


def _check_path(path: str, *, watch: bool = False) -> bytes:
    if not isinstance(path, str):
        raise UsageError(f"xenstore path must be str, not {type(path).__name__}")
    if "\0" in path:  # pyxs lets a trailing NUL through: it would end the path early
        raise UsageError(f"invalid xenstore path {path!r}")
    try:
        raw = path.encode("ascii")
        if watch and path.startswith("@"):
            if path not in _SPECIAL_WATCHES:
                raise pyxs.exceptions.InvalidPath(raw)
        else:
            pyxs.helpers.check_path(raw)
    except (UnicodeEncodeError, pyxs.exceptions.InvalidPath) as e:
        raise UsageError(f"invalid xenstore path {path!r}", cause=e) from e
    return raw


def _absorb(fut: asyncio.Future[Any]) -> None:
    """A reply nobody waits for: retrieve its outcome (no 'never retrieved' warning)."""
    if not fut.cancelled():
        fut.exception()


def _value_bytes(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(data) > PAYLOAD_MAX:
        raise UsageError(f"xenstore value of {len(data)} bytes exceeds {PAYLOAD_MAX}")
    return data


def _decode(payload: bytes, raw: bool) -> str | bytes:
    return payload if raw else payload.decode("utf-8", "surrogateescape")


def _split(payload: bytes) -> list[str]:
    parts = payload.split(_NUL)
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def _expect_ok(payload: bytes) -> None:
    if payload.rstrip(_NUL) != b"OK":
        raise XenstoreError(f"xenstore: expected OK, got {payload!r}", errno=errno.EPROTO)


# What a broken or hostile xenstored may answer is never trusted: a reply that
# does not parse is an XenstoreError (EPROTO), not a ValueError or IndexError.


def _protocol_error(op: Op, reply: bytes) -> XenstoreError:
    return XenstoreError(f"xenstore: {op.name} answered {reply[:64]!r}", errno=errno.EPROTO)


def _tx_id(reply: bytes) -> int:
    text = reply.rstrip(_NUL)
    if not text.isdigit() or len(text) > 10 or not 0 < int(text) <= 0xFFFFFFFF:
        raise _protocol_error(Op.TRANSACTION_START, reply)
    return int(text)


def _one_string(reply: bytes, op: Op) -> str:
    parts = _split(reply)
    if len(parts) != 1 or not parts[0]:
        raise _protocol_error(op, reply)
    return parts[0]


def _perms(reply: bytes) -> list[Perm]:
    try:
        return [Perm.parse(p) for p in _split(reply)]
    except UsageError:
        raise _protocol_error(Op.GET_PERMS, reply) from None


def _domid_arg(domid: int) -> bytes:
    if not isinstance(domid, int) or isinstance(domid, bool) or not 0 <= domid < 0x7FF0:
        raise UsageError(f"invalid domid {domid!r}")
    return str(domid).encode() + _NUL


# --------------------------------------------------------------------------
# watches


class Watch:
    """A registered xenstore watch; events go to ``callback(path, token)``.

    The callback runs on the router thread (see the module docstring).
    """

    def __init__(self, xs: Xenstore, path: str, token: str, callback: Callable[[str, str], None]):
        self.xs = xs
        self.path = path
        self.token = token
        self.callback = callback
        self.active = True

    def unwatch(self) -> None:
        """Remove the watch; a no-op if already removed or the connection is gone."""
        if not self.active:
            return
        self.active = False
        self.xs._forget_watch(self)
        if self.xs.lost is None:
            with contextlib.suppress(XenstoreConnectionLost, XenstoreError, Timeout):
                self.xs._call(
                    Op.UNWATCH,
                    _check_path(self.path, watch=True) + _NUL + self.token.encode() + _NUL,
                    path=self.path,
                )

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unwatch()


# --------------------------------------------------------------------------
# the connection


class Xenstore:
    """One xenstore connection (dom0's toolstack view), safe to share across threads.

    :param socket_path: the xenstored socket; default :func:`default_socket_path`.
    :param timeout: the deadline, in seconds, of every request without its own.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._req_ids = itertools.count(1)
        self._id_lock = threading.Lock()
        self._watches: dict[str, Watch] = {}
        self._watch_lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._lost_callbacks: list[Callable[[XenstoreConnectionLost], None]] = []
        self._router: _Router | None = None
        self.aio = AsyncXenstore(self)

    # -- lifecycle ---------------------------------------------------------

    def connect(self) -> Xenstore:
        """Open the connection; BackendUnavailable if nothing listens there."""
        if self._router is not None:
            return self
        conn = _Connection(self.socket_path)
        router = _Router(conn, self._dispatch_event, self._on_lost)
        try:
            router.start()
        except pyxs.exceptions.ConnectionError as e:
            raise BackendUnavailable(
                f"cannot connect to xenstored at {self.socket_path}: {e}", cause=e
            ) from e
        self._router = router
        return self

    def close(self) -> None:
        """Close the connection; pending calls fail with XenstoreConnectionLost."""
        router, self._router = self._router, None
        if router is not None:
            router.terminate()

    def __enter__(self) -> Xenstore:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def lost(self) -> XenstoreConnectionLost | None:
        """Why the connection died, or ``None`` while it lives."""
        router = self._router
        if router is None:
            return XenstoreConnectionLost("xenstore connection is not open")
        return router.lost

    def on_lost(self, callback: Callable[[XenstoreConnectionLost], None]) -> None:
        """Call ``callback(err)`` (on the router thread) if the connection dies."""
        self._lost_callbacks.append(callback)

    def _on_lost(self, err: XenstoreConnectionLost) -> None:
        with self._watch_lock:
            watches = list(self._watches.values())
        # Wake every waiter: they re-check, see ``lost`` and raise it.
        for w in watches:
            with contextlib.suppress(Exception):
                w.callback(w.path, w.token)
        for cb in list(self._lost_callbacks):
            with contextlib.suppress(Exception):
                cb(err)

    # -- the request core --------------------------------------------------

    def _next_req_id(self) -> int:
        with self._id_lock:
            rid = next(self._req_ids)
            if rid >= 0xFFFFFFFF:  # the wire field is 32 bits
                self._req_ids = itertools.count(1)
                rid = next(self._req_ids)
            return rid

    def _submit(
        self,
        op: Op,
        payload: bytes,
        tx_id: int,
        path: str | None,
        on_done: Callable[[bytes | None, BaseException | None], None],
    ) -> None:
        router = self._router
        if router is None:
            raise XenstoreConnectionLost("xenstore connection is not open")
        if len(payload) > PAYLOAD_MAX:
            raise UsageError(f"xenstore request of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
        packet = _packet(int(op), self._next_req_id(), tx_id, payload)
        router.submit(packet, _Pending(op, tx_id, path, on_done))

    def _call(
        self,
        op: Op,
        payload: bytes,
        *,
        tx_id: int = 0,
        path: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        done = threading.Event()
        box: list[Any] = [None, None]

        def on_done(reply: bytes | None, err: BaseException | None) -> None:
            box[0], box[1] = reply, err
            done.set()

        self._submit(op, payload, tx_id, path, on_done)
        limit = self.timeout if timeout is None else timeout
        if not done.wait(limit):
            # The pending entry stays registered so a late reply is absorbed
            # instead of tripping pyxs's "unexpected packet".
            raise Timeout(
                f"xenstore {op.name} {path or ''} got no reply within {limit:g}s".replace(
                    "  ", " "
                ),
                deadline=limit,
            )
        if box[1] is not None:
            raise box[1]
        reply: bytes = box[0]
        return reply

    # -- operations --------------------------------------------------------

    @overload
    def read(
        self, path: str, *, tx: Transaction | None = ..., raw: Literal[False] = ...
    ) -> str: ...
    @overload
    def read(self, path: str, *, tx: Transaction | None = ..., raw: Literal[True]) -> bytes: ...
    def read(self, path: str, *, tx: Transaction | None = None, raw: bool = False) -> str | bytes:
        """The node's value (``XS_READ``); XenstoreError(ENOENT) if it does not exist."""
        reply = self._call(Op.READ, _check_path(path) + _NUL, tx_id=_tx(tx), path=path)
        return _decode(reply, raw)

    def read_or(self, path: str, default: T, *, tx: Transaction | None = None) -> str | T:
        """The node's value, or ``default`` if it does not exist."""
        try:
            return self.read(path, tx=tx)
        except XenstoreError as e:
            if e.errno == errno.ENOENT:
                return default
            raise

    def write(self, path: str, value: str | bytes, *, tx: Transaction | None = None) -> None:
        """Create or overwrite a node (``XS_WRITE``); the empty value is legal."""
        payload = _check_path(path) + _NUL + _value_bytes(value)
        _expect_ok(self._call(Op.WRITE, payload, tx_id=_tx(tx), path=path))

    def mkdir(self, path: str, *, tx: Transaction | None = None) -> None:
        """Create a node and missing parents with empty values (``XS_MKDIR``)."""
        _expect_ok(self._call(Op.MKDIR, _check_path(path) + _NUL, tx_id=_tx(tx), path=path))

    def rm(self, path: str, *, tx: Transaction | None = None) -> None:
        """Remove a node and its children (``XS_RM``); ENOENT if it is absent."""
        _expect_ok(self._call(Op.RM, _check_path(path) + _NUL, tx_id=_tx(tx), path=path))

    def ls(self, path: str, *, tx: Transaction | None = None) -> list[str]:
        """The names of a node's children (``XS_DIRECTORY``)."""
        return _split(self._call(Op.DIRECTORY, _check_path(path) + _NUL, tx_id=_tx(tx), path=path))

    def exists(self, path: str, *, tx: Transaction | None = None) -> bool:
        """Whether the node exists (EACCES is raised, not taken for absence)."""
        try:
            self._call(Op.READ, _check_path(path) + _NUL, tx_id=_tx(tx), path=path)
        except XenstoreError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def get_perms(self, path: str, *, tx: Transaction | None = None) -> list[Perm]:
        """The node's permission list (``XS_GET_PERMS``), owner first."""
        reply = self._call(Op.GET_PERMS, _check_path(path) + _NUL, tx_id=_tx(tx), path=path)
        return _perms(reply)

    def set_perms(
        self, path: str, perms: list[Perm] | list[str], *, tx: Transaction | None = None
    ) -> None:
        """Replace the node's permission list (``XS_SET_PERMS``)."""
        entries = [p if isinstance(p, Perm) else Perm.parse(p) for p in perms]
        if not entries:
            raise UsageError("a permission list needs at least the owner entry")
        payload = _check_path(path) + _NUL + b"".join(str(p).encode() + _NUL for p in entries)
        _expect_ok(self._call(Op.SET_PERMS, payload, tx_id=_tx(tx), path=path))

    def get_domain_path(self, domid: int) -> str:
        """``/local/domain/<domid>`` as xenstored says (``XS_GET_DOMAIN_PATH``)."""
        return _one_string(self._call(Op.GET_DOMAIN_PATH, _domid_arg(domid)), Op.GET_DOMAIN_PATH)

    def introduce(self, domid: int, mfn: int, port: int) -> None:
        """Tell xenstored to serve a domain's ring (``XS_INTRODUCE``, dom0 only)."""
        payload = _domid_arg(domid) + f"{mfn}".encode() + _NUL + f"{port}".encode() + _NUL
        _expect_ok(self._call(Op.INTRODUCE, payload))

    def release(self, domid: int) -> None:
        """Tell xenstored to drop a domain (``XS_RELEASE``, dom0 only)."""
        _expect_ok(self._call(Op.RELEASE, _domid_arg(domid)))

    def resume(self, domid: int) -> None:
        """Clear xenstored's shutdown latch for a domain (``XS_RESUME``).

        xenstored fires ``@releaseDomain`` once per shutdown and re-arms only
        here: without it the domain's next suspend is never noticed.
        """
        _expect_ok(self._call(Op.RESUME, _domid_arg(domid)))

    def is_introduced(self, domid: int) -> bool:
        """Whether xenstored serves the domain (``XS_IS_DOMAIN_INTRODUCED``)."""
        reply = self._call(Op.IS_DOMAIN_INTRODUCED, _domid_arg(domid)).rstrip(_NUL)
        return reply == b"T"

    def set_target(self, domid: int, target: int) -> None:
        """Let ``domid`` act with ``target``'s rights (``XS_SET_TARGET``, dom0 only)."""
        _expect_ok(self._call(Op.SET_TARGET, _domid_arg(domid) + _domid_arg(target)))

    # -- transactions ------------------------------------------------------

    def transaction_start(self) -> Transaction:
        """``XS_TRANSACTION_START``; prefer :meth:`transaction` / :meth:`run_transaction`."""
        reply = self._call(Op.TRANSACTION_START, _NUL)
        return Transaction(self, _tx_id(reply))

    def transaction_end(self, tx: Transaction, *, commit: bool) -> bool:
        """End ``tx``; True if committed, False if the commit met EAGAIN (a conflict)."""
        tx.closed = True
        try:
            reply = self._call(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx_id=tx.tx_id)
        except XenstoreError as e:
            if commit and e.errno == errno.EAGAIN:
                return False
            raise
        _expect_ok(reply)
        return True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One attempt: commit on success (EAGAIN raises TransactionConflict), abort on error."""
        tx = self.transaction_start()
        try:
            yield tx
        except BaseException:
            if not tx.closed:
                with contextlib.suppress(XenstoreError, XenstoreConnectionLost, Timeout):
                    self.transaction_end(tx, commit=False)
            raise
        if not tx.closed and not self.transaction_end(tx, commit=True):
            raise TransactionConflict("xenstore transaction conflicted (EAGAIN)", attempts=1)

    def run_transaction(
        self, body: Callable[[Transaction], T], *, attempts: int = DEFAULT_TX_ATTEMPTS
    ) -> T:
        """Run ``body(tx)`` in a transaction, retrying on EAGAIN up to ``attempts`` times.

        ``body`` must be safe to repeat.  Gives up with TransactionConflict.
        """
        for _ in range(attempts):
            tx = self.transaction_start()
            try:
                result = body(tx)
            except BaseException:
                if not tx.closed:
                    with contextlib.suppress(XenstoreError, XenstoreConnectionLost, Timeout):
                        self.transaction_end(tx, commit=False)
                raise
            if tx.closed or self.transaction_end(tx, commit=True):
                return result
        raise TransactionConflict(
            f"xenstore transaction still conflicted (EAGAIN) after {attempts} attempts",
            attempts=attempts,
        )

    # -- watches -----------------------------------------------------------

    def watch(self, path: str, callback: Callable[[str, str], None]) -> Watch:
        """Register a watch (``XS_WATCH``); ``callback(path, token)`` on each event.

        xenstored fires one event for ``path`` at once; the callback runs on the
        router thread and must only hand off.
        """
        raw = _check_path(path, watch=True)
        token = f"torpor/{next(self._tokens)}"
        w = Watch(self, path, token, callback)
        with self._watch_lock:
            self._watches[token] = w
        try:
            _expect_ok(self._call(Op.WATCH, raw + _NUL + token.encode() + _NUL, path=path))
        except BaseException:
            self._forget_watch(w)
            raise
        return w

    def _forget_watch(self, w: Watch) -> None:
        with self._watch_lock:
            self._watches.pop(w.token, None)

    def watch_count(self) -> int:
        """How many watches this connection holds (for leak checks)."""
        with self._watch_lock:
            return len(self._watches)

    def _dispatch_event(self, path: bytes, token: bytes) -> None:
        w = self._watches.get(token.decode("ascii", "replace"))
        # An event for a token we no longer hold (it raced an unwatch) is
        # dropped: pyxs's Monitor spun forever on such events.
        if w is not None and w.active:
            w.callback(path.decode("utf-8", "surrogateescape"), w.token)

    def wait(
        self,
        path: str,
        predicate: Callable[[str | None], bool],
        *,
        timeout: float,
        what: str | None = None,
    ) -> str | None:
        """Block until ``predicate(value)`` holds for the node (``None`` = absent).

        Evaluated once at once and again on every watch event; raises
        :class:`~torpor.errors.Timeout` at the deadline and
        XenstoreConnectionLost if the connection dies meanwhile.
        """
        wake = threading.Event()
        deadline = time.monotonic() + timeout
        w = self.watch(path, lambda _p, _t: wake.set())
        try:
            while True:
                wake.clear()
                if self.lost is not None:
                    raise self.lost
                value = self.read_or(path, None)
                if predicate(value):
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not wake.wait(remaining):
                    raise Timeout(
                        f"{what or 'xenstore ' + path} did not happen within {timeout:g}s",
                        deadline=timeout,
                    )
        finally:
            w.unwatch()


def _tx(tx: Transaction | None) -> int:
    if tx is None:
        return 0
    if tx.closed:
        raise UsageError(f"xenstore transaction {tx.tx_id} already ended")
    return tx.tx_id


class Transaction:
    """An open xenstore transaction; pass it as ``tx=`` or use its methods."""

    def __init__(self, xs: Xenstore, tx_id: int) -> None:
        self.xs = xs
        self.tx_id = tx_id
        self.closed = False

    def read(self, path: str) -> str:
        return self.xs.read(path, tx=self)

    def read_or(self, path: str, default: T) -> str | T:
        return self.xs.read_or(path, default, tx=self)

    def write(self, path: str, value: str | bytes) -> None:
        self.xs.write(path, value, tx=self)

    def mkdir(self, path: str) -> None:
        self.xs.mkdir(path, tx=self)

    def rm(self, path: str) -> None:
        self.xs.rm(path, tx=self)

    def ls(self, path: str) -> list[str]:
        return self.xs.ls(path, tx=self)

    def exists(self, path: str) -> bool:
        return self.xs.exists(path, tx=self)

    def set_perms(self, path: str, perms: list[Perm] | list[str]) -> None:
        self.xs.set_perms(path, perms, tx=self)

    def __repr__(self) -> str:
        return f"<Transaction {self.tx_id}{' closed' if self.closed else ''}>"


# --------------------------------------------------------------------------
# asyncio front-end


class AsyncXenstore:
    """The same connection, for asyncio code: each call awaits its reply.

    Replies are delivered from the router thread through
    ``loop.call_soon_threadsafe``; nothing blocks the event loop.
    """

    def __init__(self, xs: Xenstore) -> None:
        self.xs = xs

    def _start(
        self,
        op: Op,
        payload: bytes,
        *,
        tx_id: int = 0,
        path: str | None = None,
        timeout: float | None = None,
    ) -> asyncio.Future[bytes]:
        """Send a request now; the returned future resolves to its reply (or fails).

        The deadline is armed at once: the future fails with Timeout if no
        reply comes in time, whether or not anyone awaits it yet.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        limit = self.xs.timeout if timeout is None else timeout

        def settle(reply: bytes | None, err: BaseException | None) -> None:
            if fut.done():
                return
            expiry.cancel()
            if err is not None:
                fut.set_exception(err)
            else:
                assert reply is not None
                fut.set_result(reply)

        def expire() -> None:
            if not fut.done():
                fut.set_exception(
                    Timeout(
                        f"xenstore {op.name} {path or ''} got no reply within {limit:g}s",
                        deadline=limit,
                    )
                )

        def on_done(reply: bytes | None, err: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(settle, reply, err)

        expiry = loop.call_later(limit, expire)
        try:
            self.xs._submit(op, payload, tx_id, path, on_done)
        except BaseException:
            expiry.cancel()
            raise
        return fut

    async def _call(
        self,
        op: Op,
        payload: bytes,
        *,
        tx_id: int = 0,
        path: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        return await self._start(op, payload, tx_id=tx_id, path=path, timeout=timeout)

    def write_nowait(self, path: str, value: str | bytes) -> asyncio.Future[bytes]:
        """Send a write without waiting: it is on the wire when this returns.

        Requests on one connection are processed in order, so a later
        request is seen after this write; await the future for its outcome.
        """
        return self._start(Op.WRITE, _check_path(path) + _NUL + _value_bytes(value), path=path)

    def rm_nowait(self, path: str) -> asyncio.Future[bytes]:
        """Send a removal without waiting (see :meth:`write_nowait`)."""
        return self._start(Op.RM, _check_path(path) + _NUL, path=path)

    async def read(self, path: str, *, tx: Transaction | None = None) -> str:
        reply = await self._call(Op.READ, _check_path(path) + _NUL, tx_id=_tx(tx), path=path)
        return reply.decode("utf-8", "surrogateescape")

    async def read_or(self, path: str, default: T, *, tx: Transaction | None = None) -> str | T:
        try:
            return await self.read(path, tx=tx)
        except XenstoreError as e:
            if e.errno == errno.ENOENT:
                return default
            raise

    async def write(self, path: str, value: str | bytes, *, tx: Transaction | None = None) -> None:
        payload = _check_path(path) + _NUL + _value_bytes(value)
        _expect_ok(await self._call(Op.WRITE, payload, tx_id=_tx(tx), path=path))

    async def mkdir(self, path: str, *, tx: Transaction | None = None) -> None:
        _expect_ok(await self._call(Op.MKDIR, _check_path(path) + _NUL, tx_id=_tx(tx), path=path))

    async def rm(self, path: str, *, tx: Transaction | None = None) -> None:
        _expect_ok(await self._call(Op.RM, _check_path(path) + _NUL, tx_id=_tx(tx), path=path))

    async def ls(self, path: str, *, tx: Transaction | None = None) -> list[str]:
        reply = await self._call(Op.DIRECTORY, _check_path(path) + _NUL, tx_id=_tx(tx), path=path)
        return _split(reply)

    async def exists(self, path: str, *, tx: Transaction | None = None) -> bool:
        try:
            await self._call(Op.READ, _check_path(path) + _NUL, tx_id=_tx(tx), path=path)
        except XenstoreError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    async def get_perms(self, path: str, *, tx: Transaction | None = None) -> list[Perm]:
        reply = await self._call(Op.GET_PERMS, _check_path(path) + _NUL, tx_id=_tx(tx), path=path)
        return _perms(reply)

    async def set_perms(
        self, path: str, perms: list[Perm] | list[str], *, tx: Transaction | None = None
    ) -> None:
        entries = [p if isinstance(p, Perm) else Perm.parse(p) for p in perms]
        if not entries:
            raise UsageError("a permission list needs at least the owner entry")
        payload = _check_path(path) + _NUL + b"".join(str(p).encode() + _NUL for p in entries)
        _expect_ok(await self._call(Op.SET_PERMS, payload, tx_id=_tx(tx), path=path))

    async def resume(self, domid: int) -> None:
        _expect_ok(await self._call(Op.RESUME, _domid_arg(domid)))

    async def transaction_start(self) -> Transaction:
        reply = await self._call(Op.TRANSACTION_START, _NUL)
        return Transaction(self.xs, _tx_id(reply))

    async def transaction_end(self, tx: Transaction, *, commit: bool) -> bool:
        tx.closed = True
        try:
            reply = await self._call(
                Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx_id=tx.tx_id
            )
        except XenstoreError as e:
            if commit and e.errno == errno.EAGAIN:
                return False
            raise
        _expect_ok(reply)
        return True

    async def run_transaction(
        self,
        body: Callable[[Transaction], Awaitable[T]],
        *,
        attempts: int = DEFAULT_TX_ATTEMPTS,
    ) -> T:
        """Run ``await body(tx)`` in a transaction, retrying on EAGAIN (bounded)."""
        for _ in range(attempts):
            tx = await self.transaction_start()
            try:
                result = await body(tx)
            except BaseException:
                if not tx.closed:
                    with contextlib.suppress(XenstoreError, XenstoreConnectionLost, Timeout):
                        await self.transaction_end(tx, commit=False)
                raise
            if tx.closed or await self.transaction_end(tx, commit=True):
                return result
        raise TransactionConflict(
            f"xenstore transaction still conflicted (EAGAIN) after {attempts} attempts",
            attempts=attempts,
        )

    async def watch(self, path: str, callback: Callable[[str, str], None]) -> Watch:
        """Register a watch; ``callback`` runs *in this event loop* on each event."""
        loop = asyncio.get_running_loop()
        raw = _check_path(path, watch=True)
        token = f"torpor/{next(self.xs._tokens)}"

        def hop(p: str, t: str) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback, p, t)

        w = Watch(self.xs, path, token, hop)
        with self.xs._watch_lock:
            self.xs._watches[token] = w
        try:
            _expect_ok(await self._call(Op.WATCH, raw + _NUL + token.encode() + _NUL, path=path))
        except BaseException:
            self.xs._forget_watch(w)
            raise
        return w

    async def unwatch(self, w: Watch) -> None:
        if not w.active:
            return
        w.active = False
        self.xs._forget_watch(w)
        if self.xs.lost is None:
            with contextlib.suppress(XenstoreConnectionLost, XenstoreError, Timeout):
                await self._call(
                    Op.UNWATCH,
                    _check_path(w.path, watch=True) + _NUL + w.token.encode() + _NUL,
                    path=w.path,
                )

    def unwatch_nowait(self, w: Watch) -> None:
        """:meth:`unwatch` without waiting for xenstored's reply: the watch is
        forgotten here at once (a late event for it is dropped), the request is
        on the wire when this returns, and its reply -- which :meth:`unwatch`
        ignores too -- is absorbed when it comes.  Saves an operation's last
        round trip."""
        if not w.active:
            return
        w.active = False
        self.xs._forget_watch(w)
        if self.xs.lost is not None:
            return
        with contextlib.suppress(XenstoreConnectionLost, UsageError):
            fut = self._start(
                Op.UNWATCH,
                _check_path(w.path, watch=True) + _NUL + w.token.encode() + _NUL,
                path=w.path,
            )
            fut.add_done_callback(_absorb)

    async def wait(
        self,
        path: str,
        predicate: Callable[[str | None], bool],
        *,
        timeout: float,
        what: str | None = None,
    ) -> str | None:
        """Await ``predicate(value)`` for the node, re-checked on each watch event."""
        wake = asyncio.Event()
        deadline = time.monotonic() + timeout
        w = await self.watch(path, lambda _p, _t: wake.set())
        try:
            while True:
                wake.clear()
                if self.xs.lost is not None:
                    raise self.xs.lost
                value = await self.read_or(path, None)
                if predicate(value):
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(wake.wait(), remaining)
                except TimeoutError:
                    break
            raise Timeout(
                f"{what or 'xenstore ' + path} did not happen within {timeout:g}s",
                deadline=timeout,
            )
        finally:
            await self.unwatch(w)

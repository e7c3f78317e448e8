"""A simulated xenstored: Xen 4.17's C xenstored, in asyncio, for the sim host.

It speaks ``xen/include/public/io/xs_wire.h`` on Unix sockets (so pyxs and
Debian's ``xenstore-*`` tools, pointed at it with ``XENSTORED_PATH``, cannot
tell it from the real daemon) and offers in-process "rings"
(:meth:`Xenstored.connect`) for simulated guest kernels.  Every request, from a
socket or a ring, goes through one code path that follows the C daemon in
Xen 4.17 (tools/xenstore/xenstored_{core,domain,watch,transaction}.c): the
same permission model, quotas and errnos, transaction conflict detection by
generation counts, watch firing rules, the ``@releaseDomain`` latch.

Connections and privilege.  C xenstored treats a Unix-socket client as the
privileged dom0 and a ring as its domain.  Here a listener is bound to a domid:
``listen(path, domid=0)`` serves dom0 as C does; ``listen(path, domid=N)``
serves connections that act exactly like domain N's ring (unprivileged,
relative paths under ``/local/domain/N``, its quotas), so that real client
tools can be run *as a guest*.

Run it alone with ``python -m torpor_sim.xenstored --socket PATH``.

Knowingly left out (each is timing or resource policing, not semantics):
write rate limiting (wrl_*), the outstanding-request limit and the stall of a
domain above its hard memory quota (both only pause reading a ring), watch
event time-outs, dropping a duplicate of a still-queued watch event (events
are handed to the transport promptly, so there is hardly ever a queue), live update,
and the memory accounting of queued replies (node records and watches are
accounted).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import inspect
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import attrs

from torpor.errors import XenstoreConnectionLost, XenstoreError
from torpor.model import DomainInfo
from torpor.xs_wire import HEADER, PAYLOAD_MAX, REL_PATH_MAX, Op, decode_error, encode_error
from torpor_sim.xenstore_tree import (
    NO_GENERATION,
    PERM_IGNORE,
    PERM_NONE,
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    Accessed,
    Node,
    Perm,
    Record,
    Transaction,
    basename,
    c_atoi,
    child_name,
    format_perm,
    get_parent,
    is_valid_nodename,
    parse_perm,
)

__all__ = [
    "DOMID_SELF",
    "NodeSnapshot",
    "Quotas",
    "RingClient",
    "RingConnection",
    "WatchRecord",
    "Xenstored",
    "XenstoredThread",
    "main",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: DOMID_SELF (xen/include/public/xen.h): XS_IS_DOMAIN_INTRODUCED answers T for it.
DOMID_SELF = 0x7FF0

_ALL = PERM_READ | PERM_WRITE | PERM_OWNER
_U32 = 0xFFFFFFFF

# access_node() types (xenstored_transaction.h: enum node_access_type)
_READ, _WRITE, _DELETE = 0, 1, 2

# wire_funcs[] flags (xenstored_core.c)
_NOTID = 1  # XS_FLAG_NOTID: ignore the header's transaction id
_PRIV = 2  # XS_FLAG_PRIV: privileged domains only, else EACCES

_OK = b"OK\0"
_SPECIAL = ("@releaseDomain", "@introduceDomain")


@attrs.frozen
class Quotas:
    """xenstored's quotas, with Xen 4.17's defaults (xenstored_core.c globals).

    Each is enforced where, and with the errno, the C daemon uses:

    ============================ ======= ==========================================
    quota                        errno   where (Xen 4.17, tools/xenstore/)
    ============================ ======= ==========================================
    ``entries_per_domain``       ENOSPC  create_node(): a new node while the
                                         connection's domain owns ``>=`` this many;
                                         also do_transaction_end() if a commit
                                         would leave it ``>=`` this many
    ``entry_size``               ENOSPC  write_node_raw(): an unprivileged
                                         connection writes a record (24-byte header
                                         + 8 per permission + value + child names)
                                         of ``>=`` this many bytes
    ``watches_per_domain``       E2BIG   do_watch(): domain has ``>`` this many
                                         (so 129 fit with the default 128)
    ``transactions_per_domain``  ENOSPC  do_transaction_start(): connection has
                                         ``>`` this many open (so 11 fit)
    ``perms_per_node``           ENOSPC  do_set_perms(): unprivileged, more entries
    ``transaction_nodes``        ENOSPC  access_node(): an unprivileged transaction
                                         touches this many distinct nodes (the
                                         transaction is also doomed: commit ENOMEM)
    ``path_max``                 EINVAL  is_valid_nodename(): path longer than this
                                         beyond ``/local/domain/<id>/``
    ``memory_per_domain``        ENOMEM  domain_memory_add(): an unprivileged
                                         domain's records + watches would reach it
    ============================ ======= ==========================================

    The payload of one message is limited by the protocol (4096, XENSTORE_PAYLOAD_MAX),
    not by a quota: an over-long message makes xenstored drop the connection.
    ``0`` disables ``memory_per_domain``, as ``-Q memory=0`` does.
    """

    entries_per_domain: int = 1000  # quota_nb_entry_per_domain, -E
    entry_size: int = 2048  # quota_max_entry_size, -S
    watches_per_domain: int = 128  # quota_nb_watch_per_domain, -W
    transactions_per_domain: int = 10  # quota_max_transaction, -t
    perms_per_node: int = 5  # quota_nb_perms_per_node, -A
    transaction_nodes: int = 1024  # quota_trans_nodes, -Q transaction-nodes=
    path_max: int = REL_PATH_MAX  # quota_max_path_len, -M (XENSTORE_REL_PATH_MAX)
    memory_per_domain: int = 2 * 1024 * 1024 + 512 * 1024  # quota_memory_per_domain_hard

    def max_value_size(self, n_perms: int = 1, childlen: int = 0) -> int:
        """The largest value an unprivileged domain can write to a node."""
        return self.entry_size - 1 - 24 - 8 * n_perms - childlen


@attrs.frozen
class WatchRecord:
    """One registered watch, for leak tests: who set it, on what, with which token."""

    domid: int
    conn_id: int
    path: str
    token: str


@attrs.frozen
class NodeSnapshot:
    """One node of :meth:`Xenstored.tree_snapshot`."""

    value: bytes
    perms: tuple[str, ...]
    children: tuple[str, ...]
    generation: int


class _XsErr(Exception):
    """Internal: a request fails with this errno (what the C handlers return)."""

    __slots__ = ("errno",)

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.errno = code


class _Domain:
    """``struct domain`` (xenstored_domain.c): what xenstored knows of one domid."""

    __slots__ = (
        "domid",
        "generation",
        "introduced",
        "memory",
        "mfn",
        "nbentry",
        "nbwatch",
        "port",
        "shutdown",
        "target",
    )

    def __init__(self, domid: int, generation: int) -> None:
        self.domid = domid
        #: Global generation count when allocated: permissions in nodes written
        #: before it do not apply to this incarnation (chk_domain_generation()).
        self.generation = generation
        self.introduced = False
        #: The @releaseDomain latch: set when a shutdown was noticed, cleared by XS_RESUME.
        self.shutdown = False
        self.port = 0
        self.mfn = 0
        self.nbentry = 0
        self.nbwatch = 0
        self.memory = 0
        self.target: int | None = None


class _Watch:
    __slots__ = ("conn", "node", "relative", "seq", "token")

    def __init__(self, conn: _Conn, node: str, token: bytes, relative: str | None, seq: int):
        self.conn = conn
        self.node = node
        self.token = token
        #: The implicit path stripped from event paths of a relative watch.
        self.relative = relative
        self.seq = seq


class _Conn:
    """``struct connection``: one client, acting as ``domid``."""

    is_ring = False

    def __init__(self, server: Xenstored, conn_id: int, domid: int) -> None:
        self._server = server
        self.id = conn_id
        self.domid = domid
        self.watches: list[_Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self.next_transaction_id = 0
        #: The transaction of the request being processed (conn->transaction).
        self.transaction: Transaction | None = None
        self.closed = False
        # Header of the request being processed, echoed by the reply.
        self.req_type = 0
        self.req_id = 0
        self.req_tx = 0

    def _send(self, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def _event(self, payload: bytes, path: str, token: bytes) -> None:
        raise NotImplementedError

    def _shutdown_transport(self) -> None:
        """Drop the transport (the server already forgot the connection)."""


class _SocketConn(_Conn):
    def __init__(
        self, server: Xenstored, conn_id: int, domid: int, transport: asyncio.Transport
    ) -> None:
        super().__init__(server, conn_id, domid)
        self.transport = transport
        #: While a batch of requests is processed, output is gathered here and
        #: written with one send (order is kept; see _XsProtocol.data_received).
        self.out: list[bytes] | None = None

    def _send(self, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        data = HEADER.pack(mtype, req_id, tx_id, len(payload)) + payload
        if self.out is not None:
            self.out.append(data)
        else:
            self.transport.write(data)

    def _event(self, payload: bytes, path: str, token: bytes) -> None:
        data = HEADER.pack(Op.WATCH_EVENT, 0, 0, len(payload)) + payload
        if self.out is not None:
            self.out.append(data)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        out, self.out = self.out, None
        if out:
            self.transport.write(b"".join(out))

    def _shutdown_transport(self) -> None:
        # Like destroy_conn(): pending output is flushed, then the socket closed.
        self.flush()
        self.transport.close()


class _XsProtocol(asyncio.Protocol):
    """Reads xsd_sockmsg frames off one Unix socket and feeds them to the server."""

    def __init__(self, server: Xenstored, domid: int) -> None:
        self._server = server
        self._domid = domid
        self._buf = bytearray()
        self._conn: _SocketConn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._conn = self._server._new_socket_conn(self._domid, transport)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        buf = self._buf
        buf += data
        conn.out = []
        try:
            self._consume(conn, buf)
        finally:
            conn.flush()

    def _consume(self, conn: _SocketConn, buf: bytearray) -> None:
        n = len(buf)
        off = 0
        process = self._server._process
        while n - off >= 16:
            mtype, req_id, tx_id, length = HEADER.unpack_from(buf, off)
            if length > PAYLOAD_MAX:
                # handle_input(): "Client tried to feed us" -> ignore_connection(),
                # which drops a socket connection at once.
                log.warning("xenstored: connection %d sent length %d; dropped", conn.id, length)
                self._server._ignore_connection(conn)
                buf.clear()
                return
            end = off + 16 + length
            if end > n:
                break
            payload = bytes(buf[off + 16 : end])
            off = end
            process(conn, mtype, req_id, tx_id, payload)
            if conn.closed:
                buf.clear()
                return
        if off:
            del buf[:off]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._server._drop_conn(self._conn)


class RingConnection(_Conn):
    """An in-process connection standing for domain ``domid``'s shared ring.

    Requests go through exactly the processing socket requests go through.
    Watch events are delivered by calling ``on_event(path, token)`` in the
    loop, in the order xenstored produced them; an event caused by a request
    is delivered before that request's reply, as on a real ring.
    """

    is_ring = True

    def __init__(
        self,
        server: Xenstored,
        conn_id: int,
        domid: int,
        on_event: Callable[[str, str], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(server, conn_id, domid)
        self._on_event = on_event
        self._loop = loop
        self._reply: tuple[int, bytes] | None = None
        self._next_req = 0

    def _send(self, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        self._reply = (mtype, payload)

    def _event(self, payload: bytes, path: str, token: bytes) -> None:
        self._loop.call_soon(self._deliver, path, token.decode("utf-8", "surrogateescape"))

    def _deliver(self, path: str, token: str) -> None:
        if not self.closed:
            self._on_event(path, token)

    async def request(self, op: Op | int, payload: bytes, tx_id: int = 0) -> tuple[Op, bytes]:
        """Send one request; return the reply's type (``Op.ERROR`` on failure) and payload.

        :raises XenstoreConnectionLost: the ring was closed (domain released or
            destroyed, :meth:`close`), or this request was over-long and
            xenstored gave up on the ring.
        """
        if self.closed:
            raise XenstoreConnectionLost(f"xenstore ring of domain {self.domid} is closed")
        if len(payload) > PAYLOAD_MAX:
            self._server._ignore_connection(self)
            raise XenstoreConnectionLost(
                f"request of {len(payload)} bytes exceeds XENSTORE_PAYLOAD_MAX; ring dropped",
                domid=self.domid,
            )
        self._next_req = (self._next_req + 1) & _U32
        self._reply = None
        self._server._process(self, int(op), self._next_req, tx_id & _U32, payload)
        reply = self._reply
        self._reply = None
        if reply is None:
            raise XenstoreConnectionLost(
                f"xenstore ring of domain {self.domid} closed during a request", domid=self.domid
            )
        # Resolve through the loop so that events queued by this request
        # (call_soon above) reach on_event before the caller sees the reply.
        fut: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        self._loop.call_soon(_set_result, fut, reply)
        mtype, data = await fut
        return Op(mtype), data

    def close(self) -> None:
        """Disconnect the ring: its watches and transactions go, as for a vanished client."""
        if not self.closed:
            self._server._drop_conn(self)


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


class RingClient:
    """Async str API over a :class:`RingConnection`, for simulated guest kernels.

    Every method raises :class:`torpor.errors.XenstoreError` (``.errno``) when
    xenstored answers XS_ERROR; a commit that conflicts raises it with EAGAIN.
    Paths may be relative (to ``/local/domain/<domid>``), as on the wire.
    """

    def __init__(self, conn: RingConnection) -> None:
        self.conn = conn

    @property
    def domid(self) -> int:
        return self.conn.domid

    async def _call(self, op: Op, payload: bytes, tx: int = 0, path: str | None = None) -> bytes:
        rtype, data = await self.conn.request(op, payload, tx)
        if rtype == Op.ERROR:
            raise XenstoreError.from_errno(
                decode_error(data), op=op.name, path=path, domid=self.conn.domid
            )
        return data

    @staticmethod
    def _p(path: str) -> bytes:
        return path.encode("utf-8") + b"\0"

    async def read(self, path: str, tx: int = 0) -> str:
        data = await self._call(Op.READ, self._p(path), tx, path)
        return data.decode("utf-8", "surrogateescape")

    async def write(self, path: str, value: str, tx: int = 0) -> None:
        payload = self._p(path) + value.encode("utf-8", "surrogateescape")
        await self._call(Op.WRITE, payload, tx, path)

    async def mkdir(self, path: str, tx: int = 0) -> None:
        await self._call(Op.MKDIR, self._p(path), tx, path)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self._call(Op.RM, self._p(path), tx, path)

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        data = await self._call(Op.DIRECTORY, self._p(path), tx, path)
        return _split_strings(data)

    async def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return _split_strings(await self._call(Op.GET_PERMS, self._p(path), tx, path))

    async def set_perms(self, path: str, perms: list[str] | tuple[str, ...], tx: int = 0) -> None:
        payload = self._p(path) + b"".join(p.encode("ascii") + b"\0" for p in perms)
        await self._call(Op.SET_PERMS, payload, tx, path)

    async def watch(self, path: str, token: str) -> None:
        await self._call(Op.WATCH, self._p(path) + self._p(token), 0, path)

    async def unwatch(self, path: str, token: str) -> None:
        await self._call(Op.UNWATCH, self._p(path) + self._p(token), 0, path)

    async def transaction_start(self) -> int:
        data = await self._call(Op.TRANSACTION_START, b"\0")
        return int(data.rstrip(b"\0"))

    async def transaction_end(self, tx: int, commit: bool = True) -> None:
        await self._call(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    async def get_domain_path(self, domid: int) -> str:
        data = await self._call(Op.GET_DOMAIN_PATH, self._p(str(domid)))
        return data.rstrip(b"\0").decode("ascii")

    async def reset_watches(self) -> None:
        await self._call(Op.RESET_WATCHES, b"")


def _split_strings(data: bytes) -> list[str]:
    if not data:
        return []
    return [s.decode("utf-8", "surrogateescape") for s in data.rstrip(b"\0").split(b"\0")]


def _onearg(payload: bytes) -> str | None:
    """onearg(): exactly one NUL, at the end."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        return None
    return payload[:-1].decode("latin-1")


def _strings(payload: bytes) -> list[bytes]:
    """get_strings(): the NUL-terminated strings (bytes after the last NUL ignored)."""
    parts = payload.split(b"\0")
    parts.pop()
    return parts


def _ancestors(name: str) -> Iterator[str]:
    """``name``, its parent, ... up to ``/``: every watch path is_child() matches."""
    yield name
    while name != "/":
        name = get_parent(name)
        yield name


class Xenstored:
    """The simulated xenstored, bound to the running asyncio loop.

    :param quotas: limits and their errnos; Xen 4.17's defaults if omitted.
    :param domain_info: the hypervisor's view of a domid, what C xenstored
        asks ``xc_domain_getinfo`` -- a :class:`~torpor.model.DomainInfo`, or
        None if the domain does not exist.  Without it every domid exists and
        runs.  Dom0 always exists.
    :param loop: the loop to run in (default: the running one).

    All methods must be called in the loop's thread.
    """

    def __init__(
        self,
        quotas: Quotas | None = None,
        domain_info: Callable[[int], DomainInfo | None] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.quotas = quotas if quotas is not None else Quotas()
        self._domain_info = domain_info
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        #: The data base: path or "<tx generation>/<path>" -> record.
        self._db: dict[str, Record] = {}
        #: The global generation count (xenstored_transaction.c ``generation``).
        self._generation = 0
        self._domains: dict[int, _Domain] = {}
        self._conns: dict[int, _Conn] = {}
        self._next_conn_id = 1
        self._watch_index: dict[str, list[_Watch]] = {}
        self._watch_seq = 0
        self._servers: dict[str, asyncio.AbstractServer] = {}
        #: Futures of wait_until() callers, woken whenever the state may have changed.
        self._waiters: list[asyncio.Future[None]] = []
        #: priv_domid (-p): the domain besides dom0 that is privileged.
        self.priv_domid = 0
        # dom_release_perms / dom_introduce_perms: only dom0 may see these by default.
        self._special_perms: dict[str, tuple[Perm, ...]] = {
            name: ((0, PERM_NONE),) for name in _SPECIAL
        }
        self._wire: dict[int, tuple[Callable[[_Conn, bytes], bytes | None], int]] = {
            Op.DEBUG: (self._do_control, _PRIV),
            Op.DIRECTORY: (self._do_directory, 0),
            Op.READ: (self._do_read, 0),
            Op.GET_PERMS: (self._do_get_perms, 0),
            Op.WATCH: (self._do_watch, _NOTID),
            Op.UNWATCH: (self._do_unwatch, _NOTID),
            Op.TRANSACTION_START: (self._do_transaction_start, 0),
            Op.TRANSACTION_END: (self._do_transaction_end, 0),
            Op.INTRODUCE: (self._do_introduce, _PRIV),
            Op.RELEASE: (self._do_release, _PRIV),
            Op.GET_DOMAIN_PATH: (self._do_get_domain_path, 0),
            Op.WRITE: (self._do_write, 0),
            Op.MKDIR: (self._do_mkdir, 0),
            Op.RM: (self._do_rm, 0),
            Op.SET_PERMS: (self._do_set_perms, 0),
            Op.IS_DOMAIN_INTRODUCED: (self._do_is_domain_introduced, _PRIV),
            Op.RESUME: (self._do_resume, _PRIV),
            Op.SET_TARGET: (self._do_set_target, _PRIV),
            Op.RESET_WATCHES: (self._do_reset_watches, 0),
            Op.DIRECTORY_PART: (self._do_directory_part, 0),
        }
        # dom0_init(): dom0 is introduced (generation 0) before the tree exists.
        dom0 = self._alloc_domain(0)
        dom0.introduced = True
        self._setup_structure()

    # -- public API: serving ------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def listen(self, path: str, *, domid: int = 0) -> None:
        """Serve a Unix socket whose connections act as ``domid``.

        ``domid=0`` is C xenstored's socket (privileged).  Any other domid makes
        each connection behave as that domain's ring, for permission tests.
        A stale socket file at ``path`` is replaced, as xenstored does.
        """
        if path in self._servers:
            raise ValueError(f"already listening on {path}")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        server = await self._loop.create_unix_server(lambda: _XsProtocol(self, domid), path)
        self._servers[path] = server

    async def unlisten(self, path: str) -> None:
        """Stop accepting on ``path`` (its open connections stay) and remove the socket."""
        server = self._servers.pop(path, None)
        if server is None:
            return
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    async def close(self) -> None:
        """Close every listener and every connection."""
        servers = list(self._servers.values())
        for path in list(self._servers):
            await self.unlisten(path)
        for conn in list(self._conns.values()):
            self._drop_conn(conn)
        for server in servers:
            await server.wait_closed()

    def connect(self, domid: int, on_event: Callable[[str, str], None]) -> RingConnection:
        """An in-process connection as ``domid``: a simulated guest's xenstore ring."""
        conn = RingConnection(self, self._next_conn_id, domid, on_event, self._loop)
        self._next_conn_id += 1
        self._conns[conn.id] = conn
        self._find_or_alloc(domid)
        return conn

    # -- public API: the hypervisor's side --------------------------------------

    def introduce(self, domid: int, mfn: int, port: int) -> None:
        """What dom0's XS_INTRODUCE does; fires ``@introduceDomain`` the first time."""
        self._run_api(Op.INTRODUCE, lambda: self._introduce(domid, mfn, port))

    def release(self, domid: int) -> None:
        """What dom0's XS_RELEASE does: forget the domain, fire ``@releaseDomain``."""
        self._run_api(Op.RELEASE, lambda: self._release(domid))

    def resume(self, domid: int) -> None:
        """What dom0's XS_RESUME does: re-arm the ``@releaseDomain`` latch."""
        self._run_api(Op.RESUME, lambda: self._resume(domid))

    def domain_exc(self) -> None:
        """A VIRQ_DOM_EXC arrived: check_domains() (xenstored_domain.c).

        Every known domain is re-checked through ``domain_info``.  An introduced
        domain that is gone or dying is cleaned up (its connections closed, the
        nodes it owns removed) and ``@releaseDomain`` fires.  One newly seen
        shut down sets its latch; if any did, ``@releaseDomain`` fires once.  A
        latched domain does not fire again until XS_RESUME clears the latch.
        """
        notify = False
        restart = True
        while restart:
            restart = False
            for dom in list(self._domains.values()):
                if dom.domid == 0:
                    continue  # dom0 never goes away under its own xenstored
                info = self._get_info(dom.domid)
                if not dom.introduced:
                    if info is None:
                        self._destroy_domain(dom)
                        restart = True
                        break
                    continue
                if info is not None:
                    if info.shutdown and not dom.shutdown:
                        dom.shutdown = True
                        notify = True
                    if not info.dying:
                        continue
                self._destroy_domain(dom)
                notify = False  # destroy_domain() fired the watch
                restart = True
                break
        if notify:
            self._fire_watches(None, "@releaseDomain", None, True, None)

    def is_introduced(self, domid: int) -> bool:
        dom = self._domains.get(domid)
        return dom is not None and dom.introduced

    def is_latched(self, domid: int) -> bool:
        """Has xenstored noticed this domain's shutdown (and not seen XS_RESUME since)?"""
        dom = self._domains.get(domid)
        return dom is not None and dom.shutdown

    # -- public API: introspection ----------------------------------------------

    def watches(self) -> list[WatchRecord]:
        """Every registered watch (absolute path), in connection then registration order."""
        out = []
        for conn in self._conns.values():
            for w in conn.watches:
                token = w.token.decode("utf-8", "surrogateescape")
                out.append(WatchRecord(conn.domid, conn.id, w.node, token))
        return out

    def connection_count(self) -> int:
        return len(self._conns)

    def transaction_count(self) -> int:
        return sum(len(c.transactions) for c in self._conns.values())

    def node_count(self, owner_domid: int) -> int:
        """How many nodes in the store are owned by ``owner_domid``."""
        return sum(1 for k, r in self._db.items() if k[0] == "/" and r.perms[0][0] == owner_domid)

    def entry_count(self, domid: int) -> int:
        """xenstored's own count of the domain's nodes (what the entry quota checks)."""
        dom = self._domains.get(domid)
        return dom.nbentry if dom is not None else 0

    def domain_memory(self, domid: int) -> int:
        dom = self._domains.get(domid)
        return dom.memory if dom is not None else 0

    def tree_snapshot(self) -> dict[str, NodeSnapshot]:
        """The committed tree: path -> value, permissions, children, generation."""
        out = {}
        for key in sorted(k for k in self._db if k[0] == "/"):
            rec = self._db[key]
            out[key] = NodeSnapshot(
                rec.data, tuple(format_perm(p) for p in rec.perms), rec.children, rec.generation
            )
        return out

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checked after each request and hang-up.

        For leak tests: e.g. ``wait_until(lambda: xs.connection_count() == 1)``
        once a client closed its socket.

        :raises TimeoutError: it did not hold within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not predicate():
                fut: asyncio.Future[None] = self._loop.create_future()
                self._waiters.append(fut)
                await fut

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def dump(self) -> str:
        """The tree as text (``path = "value" [perms]``), for debugging."""
        lines = []
        for path, node in self.tree_snapshot().items():
            lines.append(f"{path} = {node.value!r} [{' '.join(node.perms)}]")
        return "\n".join(lines)

    # -- connections -------------------------------------------------------------

    def _new_socket_conn(self, domid: int, transport: asyncio.Transport) -> _SocketConn:
        conn = _SocketConn(self, self._next_conn_id, domid, transport)
        self._next_conn_id += 1
        self._conns[conn.id] = conn
        if domid != 0:
            self._find_or_alloc(domid)
        return conn

    def _drop_conn(self, conn: _Conn) -> None:
        """destroy_conn(): the connection went; so do its watches and transactions."""
        if conn.closed:
            return
        conn.closed = True
        self._delete_all_watches(conn)
        self._delete_all_transactions(conn)
        self._conns.pop(conn.id, None)
        conn._shutdown_transport()
        if self._waiters:
            self._wake()

    def _ignore_connection(self, conn: _Conn) -> None:
        """ignore_connection(): a protocol violation; for us, the connection is dropped."""
        self._drop_conn(conn)

    def _domain_conns(self, domid: int) -> list[_Conn]:
        """The connections that *are* domain ``domid`` (C: domain->conn).

        Dom0's sockets are C's socket connections, which belong to no domain;
        only its rings do.
        """
        return [c for c in self._conns.values() if c.domid == domid and (domid != 0 or c.is_ring)]

    def _unpriv(self, conn: _Conn | None) -> bool:
        """domain_is_unprivileged()."""
        return conn is not None and conn.domid not in (0, self.priv_domid)

    def _domid_unpriv(self, domid: int) -> bool:
        return domid not in (0, self.priv_domid)

    # -- request processing --------------------------------------------------------

    def _process(self, conn: _Conn, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        """process_message() (xenstored_core.c)."""
        conn.req_type = mtype
        conn.req_id = req_id
        conn.req_tx = tx_id
        spec = self._wire.get(mtype)
        if spec is None:
            # Unknown types, RESTRICT (removed), WATCH_EVENT and ERROR: no handler.
            self._send_error(conn, errno.ENOSYS)
            return
        func, flags = spec
        if flags & _PRIV and self._unpriv(conn):
            self._send_error(conn, errno.EACCES)
            return
        trans = None
        if not flags & _NOTID and tx_id:
            trans = conn.transactions.get(tx_id)
            if trans is None:
                self._send_error(conn, errno.ENOENT)
                return
        conn.transaction = trans
        try:
            reply = func(conn, payload)
        except _XsErr as e:
            reply = None
            self._send_error(conn, e.errno)
        except Exception:
            # Never let a bug take the daemon (or the sim host's loop) down.
            log.exception("xenstored: internal error on %s", _op_name(mtype))
            reply = None
            self._send_error(conn, errno.EIO)
        finally:
            conn.transaction = None
        if reply is not None:
            self._send_reply(conn, reply)
        if self._waiters:
            self._wake()

    def _send_reply(self, conn: _Conn, payload: bytes) -> None:
        """send_reply(): the reply echoes the request's type, req_id and tx_id."""
        if conn.closed:
            return
        if len(payload) > PAYLOAD_MAX:
            self._send_error(conn, errno.E2BIG)
            return
        conn._send(conn.req_type, conn.req_id, conn.req_tx, payload)

    def _send_error(self, conn: _Conn, code: int) -> None:
        if not conn.closed:
            conn._send(Op.ERROR, conn.req_id, conn.req_tx, encode_error(code))

    def _run_api(self, op: Op, fn: Callable[[], None]) -> None:
        try:
            fn()
        except _XsErr as e:
            raise XenstoreError.from_errno(e.errno, op=op.name) from None

    # -- domains -------------------------------------------------------------------

    def _get_info(self, domid: int) -> DomainInfo | None:
        """get_domain_info(): None unless the hypervisor knows exactly this domid."""
        if self._domain_info is None or domid == 0:
            return DomainInfo(domid=domid, flags=0)
        info = self._domain_info(domid)
        if info is None or info.domid != domid:
            return None
        return info

    def _alloc_domain(self, domid: int) -> _Domain:
        dom = _Domain(domid, self._generation)
        self._domains[domid] = dom
        return dom

    def _find_or_alloc(self, domid: int) -> _Domain:
        dom = self._domains.get(domid)
        return dom if dom is not None else self._alloc_domain(domid)

    def _find_or_alloc_existing(self, domid: int) -> _Domain | None:
        dom = self._domains.get(domid)
        if dom is None and self._get_info(domid) is not None:
            dom = self._alloc_domain(domid)
        return dom

    def _introduce(self, domid: int, mfn: int, port: int) -> None:
        """do_introduce() / introduce_domain()."""
        domid &= _U32
        port &= _U32
        if port == 0:
            raise _XsErr(errno.EINVAL)
        dom = self._domains.get(domid)
        if dom is None or not dom.introduced:
            # map_interface() fails for a domain the hypervisor does not have.
            if self._get_info(domid) is None:
                raise _XsErr(errno.EINVAL)
            dom = self._find_or_alloc(domid)
            dom.port = port
            dom.mfn = mfn
            dom.shutdown = False
            dom.introduced = True
            if domid != 0:
                self._fire_watches(None, "@introduceDomain", None, True, None)
        else:
            # XS_INTRODUCE of an introduced domain re-binds its event channel
            # and domain_conn_reset() drops its watches and transactions.  (C
            # resets on the first introduction too, when the ring is brand
            # new; a sim guest may connect before it, so only a re-introduction
            # resets here.)
            dom.port = port
            dom.mfn = mfn
            for conn in self._domain_conns(domid):
                self._delete_all_watches(conn)
                self._delete_all_transactions(conn)

    def _connected_domain(self, domid: int) -> _Domain:
        """find_connected_domain(): ENOENT unless introduced."""
        dom = self._domains.get(domid)
        if dom is None or not dom.introduced:
            raise _XsErr(errno.ENOENT)
        return dom

    def _onearg_domain(self, domid: int) -> _Domain:
        """onearg_domain(): domid 0 is EINVAL."""
        if domid == 0:
            raise _XsErr(errno.EINVAL)
        return self._connected_domain(domid)

    def _release(self, domid: int) -> None:
        self._destroy_domain(self._onearg_domain(domid & _U32))

    def _resume(self, domid: int) -> None:
        self._onearg_domain(domid & _U32).shutdown = False

    def _destroy_domain(self, dom: _Domain) -> None:
        """Free the domain's connection, then destroy_domain()."""
        for conn in self._domain_conns(dom.domid):
            self._drop_conn(conn)
        self._domain_tree_remove(dom)
        self._domains.pop(dom.domid, None)
        if dom.introduced:
            self._fire_watches(None, "@releaseDomain", None, True, None)

    def _domain_tree_remove(self, dom: _Domain) -> None:
        """domain_tree_remove(): delete the nodes the dead domain owns; forget its perms."""
        stack = ["/"]
        while stack and dom.nbentry > 0:
            name = stack.pop()
            rec = self._db.get(name)
            if rec is None:
                continue
            if rec.perms[0][0] == dom.domid:
                try:
                    self._rm_node(None, name)
                except _XsErr as e:
                    log.error("xenstored: removing orphaned %s: %s", name, e.errno)
                continue
            stack.extend(child_name(name, c) for c in reversed(rec.children))
        # remove_domid_from_perm() on the special nodes.
        for special, perms in self._special_perms.items():
            owner, flags = perms[0]
            if owner == dom.domid:
                owner = self.priv_domid
            rest = tuple(p for p in perms[1:] if p[0] != dom.domid)
            self._special_perms[special] = ((owner, flags), *rest)

    # -- accounting ------------------------------------------------------------------

    def _mem_add(self, domid: int, mem: int, no_quota_check: bool) -> None:
        """domain_memory_add(): ENOMEM when an unprivileged domain would reach its quota."""
        dom = self._domains.get(domid)
        if dom is None:
            dom = self._find_or_alloc_existing(domid)
            if dom is None:
                return
        limit = self.quotas.memory_per_domain
        if (
            not no_quota_check
            and limit
            and mem > 0
            and dom.memory + mem >= limit
            and self._domid_unpriv(domid)
        ):
            raise _XsErr(errno.ENOMEM)
        dom.memory += mem

    def _mem_sub(self, domid: int, mem: int) -> None:
        dom = self._domains.get(domid)
        if dom is not None:
            dom.memory -= mem

    def _entry_inc(self, conn: _Conn | None, node: Node) -> None:
        """domain_entry_inc(): the node's owner has one node more."""
        owner = node.perms[0][0]
        if conn is not None and conn.transaction is not None:
            cd = conn.transaction.changed_domains
            cd[owner] = cd.get(owner, 0) + 1
            return
        dom = self._domains.get(owner)
        if dom is None:
            if conn is not None and owner == conn.domid:
                dom = self._alloc_domain(owner)
            else:
                dom = self._find_or_alloc_existing(owner)
            if dom is None:
                raise _XsErr(errno.ENOMEM)
        dom.nbentry += 1

    def _entry_dec(self, conn: _Conn | None, node: Node) -> None:
        owner = node.perms[0][0]
        if conn is not None and conn.transaction is not None:
            cd = conn.transaction.changed_domains
            cd[owner] = cd.get(owner, 0) - 1
            return
        dom = self._domains.get(owner)
        if dom is not None:
            dom.nbentry -= 1

    def _domain_entry(self, conn: _Conn | None) -> int:
        """domain_entry(): the connection's domain's node count (0 if privileged)."""
        if not self._unpriv(conn):
            return 0
        assert conn is not None
        return self._find_or_alloc(conn.domid).nbentry

    def _fix_domains(self, trans: Transaction, chk_quota: bool, update: bool) -> None:
        """transaction_fix_domains() / domain_entry_fix()."""
        for domid, num in trans.changed_domains.items():
            if update:
                dom = self._domains.get(domid)
                if dom is not None:
                    dom.nbentry = max(0, dom.nbentry + num)
                continue
            dom = self._find_or_alloc_existing(domid)
            if dom is None:
                raise _XsErr(errno.ENOMEM)
            cnt = max(0, dom.nbentry + num) if self._domid_unpriv(domid) else 0
            if chk_quota and cnt >= self.quotas.entries_per_domain:
                raise _XsErr(errno.ENOSPC)

    # -- permissions ------------------------------------------------------------------

    def _target(self, conn: _Conn) -> int | None:
        dom = self._domains.get(conn.domid)
        return dom.target if dom is not None else None

    def _perm_for_conn(self, conn: _Conn | None, perms: tuple[Perm, ...]) -> int:
        """perm_for_conn() (xenstored_core.c)."""
        if conn is None or not self._unpriv(conn):
            return _ALL
        owner = perms[0][0]
        me = conn.domid
        tgt = self._target(conn)
        if owner == me or (tgt is not None and owner == tgt):
            return _ALL
        for pid, flags in perms[1:]:
            if not flags & PERM_IGNORE and (pid == me or (tgt is not None and pid == tgt)):
                return flags & _ALL
        return perms[0][1] & _ALL

    def _adjust_perms(self, node: Node) -> None:
        """domain_adjust_node_perms(): ACL entries of domains younger than the node lapse."""
        perms = node.perms
        changed = False
        out = [perms[0]]
        for pid, flags in perms[1:]:
            new_flags = flags
            if not flags & PERM_IGNORE:
                dom = self._domains.get(pid)
                if dom is None or dom.generation > node.generation:
                    new_flags = flags | PERM_IGNORE
                    changed = True
            out.append((pid, new_flags))
        if changed:
            node.perms = tuple(out)

    # -- the data base -----------------------------------------------------------------

    def _setup_structure(self) -> None:
        """setup_structure(): /, /tool, /tool/xenstored, owned by dom0, no access for others."""
        for name, child in (("/", "tool"), ("/tool", "xenstored"), ("/tool/xenstored", None)):
            node = Node(name, perms=((0, PERM_NONE),))
            if child is not None:
                node.add_child(child)
            self._write_node(None, node, False)
        self._domains[0].nbentry += 3

    def _tdb_write(self, conn: _Conn | None, key: str, rec: Record, no_quota_check: bool) -> None:
        """do_tdb_write(): store, moving the record's size between domains' accounts.

        A transaction's private copy is accounted to the connection's domain,
        a committed node to its owner (get_acc_domid()).
        """
        ta = key[0] != "/" and conn is not None
        old = self._db.get(key)
        old_dom = old_mem = 0
        if old is not None:
            old_dom = conn.domid if ta and conn is not None else old.perms[0][0]
            old_mem = old.size() + len(key)
            self._mem_sub(old_dom, old_mem)
        new_dom = conn.domid if ta and conn is not None else rec.perms[0][0]
        try:
            self._mem_add(new_dom, rec.size() + len(key), no_quota_check)
        except _XsErr:
            if old is not None:
                self._mem_sub(old_dom, -old_mem)
            raise
        self._db[key] = rec

    def _tdb_delete(self, conn: _Conn | None, key: str) -> None:
        old = self._db.pop(key, None)
        if old is not None:
            ta = key[0] != "/" and conn is not None
            dom = conn.domid if ta and conn is not None else old.perms[0][0]
            self._mem_sub(dom, old.size() + len(key))

    def _access(self, conn: _Conn | None, node: Node, kind: int) -> str | None:
        """access_node() (xenstored_transaction.c).

        A modifying access takes a new generation.  In a transaction, the first
        access records the node (a read also copies it to the transaction's
        private key).  Returns the key to write/delete, or None for "nothing
        to delete" (a delete as first access).
        """
        if kind != _READ:
            self._generation += 1
            node.generation = self._generation
        trans = conn.transaction if conn is not None else None
        if trans is None:
            return node.name
        assert conn is not None
        acc = trans.accessed.get(node.name)
        introduce = False
        if acc is None:
            if trans.nodes >= self.quotas.transaction_nodes and self._unpriv(conn):
                trans.fail = True
                raise _XsErr(errno.ENOSPC)
            acc = Accessed(trans.key_for(node.name))
            if node.generation != NO_GENERATION and node.perms:
                acc.perms = node.perms
            introduce = True
            if kind == _READ:
                acc.generation = node.generation
                acc.check_gen = True
                if node.generation != NO_GENERATION:
                    try:
                        self._write_raw(conn, acc.trans_name, node, True)
                    except _XsErr:
                        trans.fail = True
                        raise
                    acc.ta_node = True
            trans.nodes += 1
            trans.accessed[node.name] = acc
        if kind != _READ:
            acc.modified = True
            if introduce and kind == _DELETE:
                return None
            acc.ta_node = kind == _WRITE
        return acc.trans_name

    def _read_node(self, conn: _Conn | None, name: str) -> Node:
        """read_node(): the node as ``conn`` sees it (its transaction's copy if any)."""
        trans = conn.transaction if conn is not None else None
        key = name
        if trans is not None:
            acc = trans.accessed.get(name)
            if acc is not None:
                key = acc.trans_name
        rec = self._db.get(key)
        if rec is None:
            if trans is not None:
                self._access(conn, Node(name), _READ)
            raise _XsErr(errno.ENOENT)
        node = Node.from_record(name, rec)
        if len(node.perms) > 1:
            self._adjust_perms(node)
        if trans is not None:
            self._access(conn, node, _READ)
        return node

    def _write_raw(self, conn: _Conn | None, key: str, node: Node, no_quota_check: bool) -> None:
        """write_node_raw(): the entry-size quota applies to unprivileged connections."""
        if len(node.perms) > 1:
            self._adjust_perms(node)
        if not no_quota_check and self._unpriv(conn) and node.size() >= self.quotas.entry_size:
            raise _XsErr(errno.ENOSPC)
        self._tdb_write(conn, key, node.to_record(), no_quota_check)

    def _write_node(self, conn: _Conn | None, node: Node, no_quota_check: bool) -> None:
        key = self._access(conn, node, _WRITE)
        assert key is not None
        node.key = key
        try:
            self._write_raw(conn, key, node, no_quota_check)
        except _XsErr:
            if conn is not None and conn.transaction is not None:
                conn.transaction.fail = True
            raise

    def _canonicalize(self, conn: _Conn, name: str) -> str:
        """canonicalize(): relative paths are under /local/domain/<domid>."""
        if name.startswith(("/", "@")):
            return name
        return f"/local/domain/{conn.domid}/{name}"

    def _get_node(self, conn: _Conn, name: str | None, perm: int) -> Node:
        """get_node(): read with a permission check; don't leak what is hidden."""
        if name is None or not is_valid_nodename(name, self.quotas.path_max):
            raise _XsErr(errno.EINVAL)
        try:
            node = self._read_node(conn, name)
        except _XsErr as e:
            err = e.errno
        else:
            if (self._perm_for_conn(conn, node.perms) & perm) == perm:
                return node
            err = errno.EACCES
        if err in (errno.ENOMEM, errno.ENOSPC):
            raise _XsErr(err)
        raise _XsErr(self._errno_from_parents(conn, name, err, perm))

    def _errno_from_parents(self, conn: _Conn, name: str, err: int, perm: int) -> int:
        """errno_from_parents(): EACCES unless the nearest existing ancestor grants ``perm``."""
        if err == errno.ENOMEM:
            return err
        parent_perm = PERM_NONE
        while True:
            name = get_parent(name)
            try:
                node = self._read_node(conn, name)
            except _XsErr as e:
                if e.errno in (errno.ENOMEM, errno.ENOSPC):
                    return e.errno
                if name == "/":
                    break
                continue
            parent_perm = self._perm_for_conn(conn, node.perms)
            break
        return err if parent_perm & perm else errno.EACCES

    def _construct_node(self, conn: _Conn, name: str) -> Node:
        """construct_node(): the missing path down to ``name``, perms inherited.

        Each new node copies its parent's permissions; a node an unprivileged
        domain creates is owned by that domain.
        """
        names = []
        parentname = name
        while True:
            names.append(parentname)
            parentname = get_parent(parentname)
            try:
                parent = self._read_node(conn, parentname)
                break
            except _XsErr as e:
                if e.errno != errno.ENOENT or parentname == "/":
                    raise
        unpriv = self._unpriv(conn)
        node = parent
        for new in reversed(names):
            parent.add_child(basename(new))
            perms = parent.perms
            if unpriv:
                perms = ((conn.domid, perms[0][1]), *perms[1:])
            node = Node(new, perms=perms)
            node.parent = parent
            parent = node
        return node

    def _create_node(self, conn: _Conn, name: str, data: bytes) -> Node:
        """create_node(): write the new nodes bottom-up, undoing all on failure."""
        node = self._construct_node(conn, name)
        if conn.transaction is not None:
            conn.transaction.node_created = True
        node.data = data
        cur: Node | None = node
        try:
            while cur is not None:
                if cur.parent is not None and (
                    self._domain_entry(conn) >= self.quotas.entries_per_domain
                ):
                    raise _XsErr(errno.ENOSPC)
                self._write_node(conn, cur, False)
                if cur.parent is not None:
                    try:
                        self._entry_inc(conn, cur)
                    except _XsErr:
                        self._tdb_delete(conn, cur.key)
                        raise
                cur = cur.parent
        except _XsErr:
            j: Node | None = node
            while j is not None and j is not cur:
                # destroy_node(): remove it again; a transaction cannot be mended.
                self._tdb_delete(conn, j.key)
                self._entry_dec(conn, j)
                if conn.transaction is not None:
                    conn.transaction.fail = True
                j = j.parent
            raise
        return node

    def _rm_node(self, conn: _Conn | None, name: str) -> None:
        """rm_node(): delete ``name`` and everything below, children first.

        Each removed node fires its own watches (exact); the removed root also
        fires its ancestors' watches (delnode_sub()).
        """
        try:
            parent = self._read_node(conn, get_parent(name))
        except _XsErr as e:
            if e.errno in (errno.ENOMEM, errno.ENOSPC):
                raise
            raise _XsErr(errno.EINVAL) from None
        root = self._read_node(conn, name)
        stack: list[tuple[Node, Iterator[str]]] = [(root, iter(root.children))]
        while stack:
            node, kids = stack[-1]
            child = next(kids, None)
            if child is not None:
                try:
                    cnode = self._read_node(conn, child_name(node.name, child))
                except _XsErr as e:
                    if e.errno == errno.ENOENT:
                        log.error("xenstored: child %s of %s missing", child, node.name)
                        raise _XsErr(errno.EIO) from None
                    raise
                cnode.parent = node
                stack.append((cnode, iter(cnode.children)))
                continue
            stack.pop()
            key = self._access(conn, node, _DELETE)
            if key is not None:
                self._tdb_delete(conn, key)
            self._fire_watches(conn, node.name, node, node.name != name, None)
            self._entry_dec(conn, node)
        # delete_child(): unlink the root from its parent.
        if not parent.remove_child(basename(name)):
            log.error("xenstored: %s not listed in %s", basename(name), parent.name)
            raise _XsErr(errno.EIO)
        self._write_node(conn, parent, True)

    # -- watches -----------------------------------------------------------------------

    def _watch_permitted(
        self, conn: _Conn, name: str, node: Node | None, perms: tuple[Perm, ...] | None
    ) -> bool:
        """watch_permitted(): the watcher may read the node (or had, or its parent)."""
        if perms is not None and self._perm_for_conn(conn, perms) & PERM_READ:
            return True
        if node is None:
            rec = self._db.get(name)
            if rec is None:
                return False
            node = Node.from_record(name, rec)
            if len(node.perms) > 1:
                self._adjust_perms(node)
        if self._perm_for_conn(conn, node.perms) & PERM_READ:
            return True
        parent = node.parent
        if parent is None:
            pname = get_parent(node.name)
            prec = self._db.get(pname)
            if prec is None:
                return False
            parent = Node.from_record(pname, prec)
            if len(parent.perms) > 1:
                self._adjust_perms(parent)
        return bool(self._perm_for_conn(conn, parent.perms) & PERM_READ)

    def _fire_watches(
        self,
        conn: _Conn | None,
        name: str,
        node: Node | None,
        exact: bool,
        perms: tuple[Perm, ...] | None,
    ) -> None:
        """fire_watches() (xenstored_watch.c).

        In a transaction the event is queued on the accessed node and fired at
        commit.  ``exact`` fires only watches on ``name``; otherwise watches on
        ``name`` and its ancestors.  A connection gets the event only if it may
        read the node, its parent, or (``perms``) the node before the change;
        special events follow the special node's permissions.
        """
        if conn is not None and conn.transaction is not None:
            acc = conn.transaction.accessed.get(name)
            if acc is None:
                conn.transaction.fail = True
            elif not acc.fire_watch:
                acc.fire_watch = True
                acc.watch_exact = exact
            elif not exact:
                acc.watch_exact = False
            return
        index = self._watch_index
        if exact:
            cands = index.get(name)
            if not cands:
                return
            matched = list(cands)
        else:
            matched = []
            for anc in _ancestors(name):
                ws = index.get(anc)
                if ws:
                    matched.extend(ws)
            if not matched:
                return
        by_conn: dict[int, list[_Watch]] = {}
        for w in matched:
            by_conn.setdefault(w.conn.id, []).append(w)
        special = name.startswith("@")
        for cid in sorted(by_conn):
            watcher = self._conns.get(cid)
            if watcher is None:
                continue
            if special:
                sp = self._special_perms.get(name)
                if sp is None or not self._perm_for_conn(watcher, sp) & PERM_READ:
                    continue
            elif not self._watch_permitted(watcher, name, node, perms):
                continue
            ws = by_conn[cid]
            if len(ws) > 1:
                ws.sort(key=lambda w: w.seq)
            for w in ws:
                self._send_event(watcher, self._watch_path(w, name), w.token)

    @staticmethod
    def _watch_path(w: _Watch, name: str) -> str:
        """get_watch_path(): a relative watch sees paths relative to its domain."""
        if w.relative is None:
            return name
        path = name[len(w.relative) :]
        return path[1:] if path.startswith("/") else path

    def _send_event(self, conn: _Conn, path: str, token: bytes) -> None:
        """send_event(): over-long events are not sent."""
        payload = path.encode("latin-1") + b"\0" + token + b"\0"
        if len(payload) > PAYLOAD_MAX or conn.closed:
            return
        conn._event(payload, path, token)

    def _delete_watch(self, conn: _Conn, w: _Watch) -> None:
        conn.watches.remove(w)
        lst = self._watch_index.get(w.node)
        if lst is not None:
            lst.remove(w)
            if not lst:
                del self._watch_index[w.node]
        self._mem_sub(conn.domid, len(w.node) + len(w.token))
        dom = self._domains.get(conn.domid)
        if dom is not None and dom.nbwatch:
            dom.nbwatch -= 1

    def _delete_all_watches(self, conn: _Conn) -> None:
        for w in list(conn.watches):
            self._delete_watch(conn, w)

    def _delete_all_transactions(self, conn: _Conn) -> None:
        for trans in list(conn.transactions.values()):
            self._destroy_transaction(conn, trans)
        conn.transaction = None

    def _destroy_transaction(self, conn: _Conn, trans: Transaction) -> None:
        """destroy_transaction(): drop its private copies."""
        for acc in trans.accessed.values():
            if acc.ta_node:
                self._tdb_delete(conn, acc.trans_name)
        trans.accessed.clear()
        conn.transactions.pop(trans.id, None)

    # -- the operations (wire_funcs[]) ------------------------------------------------

    def _do_read(self, conn: _Conn, payload: bytes) -> bytes:
        arg = _onearg(payload)
        name = None if arg is None else self._canonicalize(conn, arg)
        return self._get_node(conn, name, PERM_READ).data

    def _do_directory(self, conn: _Conn, payload: bytes) -> bytes:
        arg = _onearg(payload)
        name = None if arg is None else self._canonicalize(conn, arg)
        return self._get_node(conn, name, PERM_READ).children_bytes()

    def _do_directory_part(self, conn: _Conn, payload: bytes) -> bytes:
        """send_directory_part(): ``<generation>\\0`` then children from byte offset."""
        if payload.count(b"\0") != 2:
            raise _XsErr(errno.EINVAL)
        raw, offstr, _ = payload.split(b"\0")
        node = self._get_node(conn, self._canonicalize(conn, raw.decode("latin-1")), PERM_READ)
        off = c_atoi(offstr.decode("latin-1")) & _U32
        gen = str(node.generation).encode() + b"\0"
        children = node.children_bytes()
        childlen = len(children)
        if off >= childlen:
            return gen + b"\0"
        maxlen = PAYLOAD_MAX - len(gen) - 1
        length = 0
        pos = off
        while True:
            nul = children.index(b"\0", pos)
            slen = nul - pos
            if length + slen >= maxlen:
                break
            length += slen + 1
            pos = nul + 1
            if off + length == childlen:
                break
        data = gen + children[off : off + length]
        if off + length == childlen:
            data += b"\0"
        return data

    def _do_get_perms(self, conn: _Conn, payload: bytes) -> bytes:
        arg = _onearg(payload)
        name = None if arg is None else self._canonicalize(conn, arg)
        node = self._get_node(conn, name, PERM_READ)
        return b"".join(format_perm(p).encode() + b"\0" for p in node.perms)

    def _do_write(self, conn: _Conn, payload: bytes) -> bytes:
        nul = payload.find(b"\0")
        if nul < 0:
            raise _XsErr(errno.EINVAL)
        name = self._canonicalize(conn, payload[:nul].decode("latin-1"))
        data = payload[nul + 1 :]
        try:
            node = self._get_node(conn, name, PERM_WRITE)
        except _XsErr as e:
            if e.errno != errno.ENOENT:
                raise
            node = self._create_node(conn, name, data)
        else:
            node.data = data
            self._write_node(conn, node, False)
        self._fire_watches(conn, name, node, False, None)
        return _OK

    def _do_mkdir(self, conn: _Conn, payload: bytes) -> bytes:
        arg = _onearg(payload)
        name = None if arg is None else self._canonicalize(conn, arg)
        try:
            self._get_node(conn, name, PERM_WRITE)
        except _XsErr as e:
            if e.errno != errno.ENOENT or name is None:
                raise
            node = self._create_node(conn, name, b"")
            self._fire_watches(conn, name, node, False, None)
        return _OK

    def _do_rm(self, conn: _Conn, payload: bytes) -> bytes:
        arg = _onearg(payload)
        name = None if arg is None else self._canonicalize(conn, arg)
        try:
            self._get_node(conn, name, PERM_WRITE)
        except _XsErr as e:
            if e.errno != errno.ENOENT or name is None:
                raise
            # Removing what is not there is fine if its parent is.
            try:
                self._read_node(conn, get_parent(name))
            except _XsErr as pe:
                if pe.errno in (errno.ENOMEM, errno.ENOSPC):
                    raise
                raise _XsErr(errno.ENOENT) from None
            return _OK
        assert name is not None  # _get_node() refuses None
        if name == "/":
            raise _XsErr(errno.EINVAL)
        self._rm_node(conn, name)
        return _OK

    def _do_set_perms(self, conn: _Conn, payload: bytes) -> bytes:
        nuls = payload.count(b"\0")
        if nuls < 2:
            raise _XsErr(errno.EINVAL)
        num = nuls - 1
        if self._unpriv(conn) and num > self.quotas.perms_per_node:
            raise _XsErr(errno.ENOSPC)
        strings = payload.split(b"\0")
        raw = strings[0].decode("latin-1")
        parsed: list[Perm] = []
        for s in strings[1 : 1 + num]:
            p = parse_perm(s.decode("latin-1"))
            if p is None:
                raise _XsErr(errno.EINVAL)
            parsed.append(p)
        # domain_alloc_permrefs(): entries for domains that don't exist lapse.
        for i, (pid, flags) in enumerate(parsed):
            if pid not in self._domains:
                if self._get_info(pid) is None:
                    parsed[i] = (pid, flags | PERM_IGNORE)
                else:
                    self._alloc_domain(pid)
        if parsed[0][1] & PERM_IGNORE:
            raise _XsErr(errno.ENOENT)
        perms = tuple(parsed)
        if raw.startswith("@"):
            self._set_perms_special(conn, raw, perms)
            return _OK
        name = self._canonicalize(conn, raw)
        node = self._get_node(conn, name, PERM_WRITE | PERM_OWNER)
        if self._unpriv(conn) and perms[0][0] != node.perms[0][0]:
            raise _XsErr(errno.EPERM)
        old_perms = node.perms
        self._entry_dec(conn, node)
        node.perms = perms
        try:
            self._entry_inc(conn, node)
        except _XsErr:
            node.perms = old_perms
            self._entry_inc(conn, node)
            raise
        try:
            self._write_node(conn, node, False)
        except _XsErr:
            self._entry_dec(conn, node)
            node.perms = old_perms
            self._entry_inc(conn, node)
            raise
        self._fire_watches(conn, name, node, False, old_perms)
        return _OK

    def _set_perms_special(self, conn: _Conn, name: str, perms: tuple[Perm, ...]) -> None:
        """set_perms_special(): only the two special nodes; needs write+owner on them."""
        current = self._special_perms.get(name)
        if current is None:
            raise _XsErr(errno.EINVAL)
        need = PERM_WRITE | PERM_OWNER
        if self._perm_for_conn(conn, current) & need != need:
            raise _XsErr(errno.EACCES)
        self._special_perms[name] = perms

    def _do_watch(self, conn: _Conn, payload: bytes) -> None:
        if payload.count(b"\0") != 2:
            raise _XsErr(errno.EINVAL)
        raw, token, _ = payload.split(b"\0")
        path = raw.decode("latin-1")
        relative: str | None = None
        if path.startswith("@"):
            if len(path) > REL_PATH_MAX:
                raise _XsErr(errno.EINVAL)
        else:
            if not path.startswith("/"):
                relative = f"/local/domain/{conn.domid}"
            path = self._canonicalize(conn, path)
            if not is_valid_nodename(path, self.quotas.path_max):
                raise _XsErr(errno.EINVAL)
        for w in conn.watches:
            if w.node == path and w.token == token:
                raise _XsErr(errno.EEXIST)
        dom = self._domains.get(conn.domid)
        if self._unpriv(conn) and dom is not None and dom.nbwatch > self.quotas.watches_per_domain:
            raise _XsErr(errno.E2BIG)
        self._mem_add(conn.domid, len(path) + len(token), False)
        self._watch_seq += 1
        w = _Watch(conn, path, token, relative, self._watch_seq)
        conn.watches.append(w)
        self._watch_index.setdefault(path, []).append(w)
        if dom is not None:
            dom.nbwatch += 1
        self._send_reply(conn, _OK)
        # "We fire once up front: simplifies clients and restart." (do_watch())
        self._send_event(conn, self._watch_path(w, path), token)

    def _do_unwatch(self, conn: _Conn, payload: bytes) -> bytes:
        if payload.count(b"\0") != 2:
            raise _XsErr(errno.EINVAL)
        raw, token, _ = payload.split(b"\0")
        path = self._canonicalize(conn, raw.decode("latin-1"))
        for w in conn.watches:
            if w.node == path and w.token == token:
                self._delete_watch(conn, w)
                return _OK
        raise _XsErr(errno.ENOENT)

    def _do_transaction_start(self, conn: _Conn, payload: bytes) -> bytes:
        if conn.transaction is not None:
            raise _XsErr(errno.EBUSY)  # no nested transactions
        if self._unpriv(conn) and len(conn.transactions) > self.quotas.transactions_per_domain:
            raise _XsErr(errno.ENOSPC)
        self._generation += 1
        # Pick an unused id; 0 means "no transaction".
        while True:
            tx_id = conn.next_transaction_id
            conn.next_transaction_id = (tx_id + 1) & _U32
            if tx_id != 0 and tx_id not in conn.transactions:
                break
        conn.transactions[tx_id] = Transaction(tx_id, self._generation, conn.id)
        return str(tx_id).encode() + b"\0"

    def _do_transaction_end(self, conn: _Conn, payload: bytes) -> bytes:
        arg = _onearg(payload)
        if arg not in ("T", "F"):
            raise _XsErr(errno.EINVAL)
        trans = conn.transaction
        if trans is None:
            raise _XsErr(errno.ENOENT)
        conn.transaction = None
        try:
            if arg == "T":
                if trans.fail:
                    raise _XsErr(errno.ENOMEM)
                chk_quota = trans.node_created and self._unpriv(conn)
                self._fix_domains(trans, chk_quota, False)
                self._finalize(conn, trans)
                self._fix_domains(trans, False, True)
        finally:
            self._destroy_transaction(conn, trans)
        return _OK

    def _finalize(self, conn: _Conn, trans: Transaction) -> None:
        """finalize_transaction(): EAGAIN if a node it read changed; else publish."""
        db = self._db
        for name, acc in list(trans.accessed.items()):
            if acc.check_gen:
                rec = db.get(name)
                gen = NO_GENERATION if rec is None else rec.generation
                if acc.generation != gen:
                    raise _XsErr(errno.EAGAIN)
            if not acc.modified:
                if acc.ta_node:
                    self._tdb_delete(conn, acc.trans_name)
                del trans.accessed[name]
        items = list(trans.accessed.items())
        trans.accessed.clear()
        for name, acc in items:
            if acc.ta_node:
                rec = db.get(acc.trans_name)
                if rec is not None:
                    self._generation += 1
                    rec = Record(self._generation, rec.perms, rec.data, rec.children, rec.childlen)
                    self._tdb_write(conn, name, rec, True)
                    self._tdb_delete(conn, acc.trans_name)
                else:
                    log.error("xenstored: transaction copy of %s missing", name)
            elif acc.generation != NO_GENERATION:
                self._tdb_delete(conn, name)
            if acc.fire_watch:
                self._fire_watches(conn, name, None, acc.watch_exact, acc.perms)

    def _do_introduce(self, conn: _Conn, payload: bytes) -> bytes:
        vec = _strings(payload)
        if len(vec) < 3:
            raise _XsErr(errno.EINVAL)
        domid = c_atoi(vec[0].decode("latin-1")) & _U32
        mfn = c_atoi(vec[1].decode("latin-1")) & _U32
        port = c_atoi(vec[2].decode("latin-1")) & _U32
        self._introduce(domid, mfn, port)
        return _OK

    def _onearg_domid(self, payload: bytes) -> int:
        arg = _onearg(payload)
        if arg is None:
            raise _XsErr(errno.EINVAL)
        return c_atoi(arg) & _U32

    def _do_release(self, conn: _Conn, payload: bytes) -> bytes:
        self._release(self._onearg_domid(payload))
        return _OK

    def _do_resume(self, conn: _Conn, payload: bytes) -> bytes:
        self._resume(self._onearg_domid(payload))
        return _OK

    def _do_set_target(self, conn: _Conn, payload: bytes) -> bytes:
        vec = _strings(payload)
        if len(vec) < 2:
            raise _XsErr(errno.EINVAL)
        domid = c_atoi(vec[0].decode("latin-1")) & _U32
        tdomid = c_atoi(vec[1].decode("latin-1")) & _U32
        dom = self._connected_domain(domid)
        self._connected_domain(tdomid)
        dom.target = tdomid
        return _OK

    def _do_get_domain_path(self, conn: _Conn, payload: bytes) -> bytes:
        return f"/local/domain/{self._onearg_domid(payload)}\0".encode()

    def _do_is_domain_introduced(self, conn: _Conn, payload: bytes) -> bytes:
        domid = self._onearg_domid(payload)
        yes = domid == DOMID_SELF or self.is_introduced(domid)
        return b"T\0" if yes else b"F\0"

    def _do_reset_watches(self, conn: _Conn, payload: bytes) -> bytes:
        self._delete_all_watches(conn)
        self._delete_all_transactions(conn)
        return _OK

    def _do_control(self, conn: _Conn, payload: bytes) -> bytes:
        """do_control(), with the commands a daemon without live update has."""
        nul = payload.find(b"\0")
        if nul < 0:
            raise _XsErr(errno.EINVAL)
        vec = [s.decode("latin-1") for s in _strings(payload)]
        cmd, args = vec[0], vec[1:]
        if cmd in ("check", "help") and args:
            raise _XsErr(errno.EINVAL)
        if cmd == "check":
            return _OK
        if cmd == "log":
            if args not in (["on"], ["off"]):
                raise _XsErr(errno.EINVAL)
            return _OK
        if cmd in ("print", "logfile"):
            if len(args) != 1:
                raise _XsErr(errno.EINVAL)
            if cmd == "print":
                log.info("control: %s", args[0])
            return _OK
        if cmd == "memreport":
            if len(args) > 1:
                raise _XsErr(errno.EINVAL)
            return _OK
        if cmd == "help":
            text = "".join(f"{c}\t{p}\n" for c, p in _CONTROL_HELP)
            return text.encode() + b"\0"
        if cmd == "quota":
            return self._control_quota(args)
        raise _XsErr(errno.EINVAL)

    def _control_quota(self, args: list[str]) -> bytes:
        if not args:
            q = self.quotas
            rows = [
                ("nodes", q.entries_per_domain),
                ("watches", q.watches_per_domain),
                ("transactions", q.transactions_per_domain),
                ("node-size", q.entry_size),
                ("permissions", q.perms_per_node),
                ("path-max", q.path_max),
                ("transaction-nodes", q.transaction_nodes),
                ("memory", q.memory_per_domain),
            ]
            return "".join(f"{n:<17}: {v:8d}\n" for n, v in rows).encode() + b"\0"
        if len(args) != 1:
            raise _XsErr(errno.EINVAL)
        domid = c_atoi(args[0]) & _U32
        dom = self._domains.get(domid)
        if dom is None:
            raise _XsErr(errno.ENOENT)
        ta = sum(len(c.transactions) for c in self._domain_conns(domid))
        rows = [
            ("nodes", dom.nbentry),
            ("watches", dom.nbwatch),
            ("transactions", ta),
            ("outstanding", 0),
            ("memory", dom.memory),
        ]
        text = f"Domain {domid}:\n" + "".join(f"{n:<16}: {v:8d}\n" for n, v in rows)
        return text.encode() + b"\0"


_CONTROL_HELP = (
    ("check", ""),
    ("log", "on|off"),
    ("logfile", "<file>"),
    ("memreport", "[<file>]"),
    ("print", "<string>"),
    ("quota", "[<domid>]"),
    ("help", ""),
)


def _op_name(mtype: int) -> str:
    try:
        return Op(mtype).name
    except ValueError:
        return f"type {mtype}"


class XenstoredThread:
    """A :class:`Xenstored` running in its own event loop on a background thread.

    ``start()`` returns once every socket listens; ``call(fn, *args)`` runs
    ``fn`` in the loop (awaiting it if it returns an awaitable) and returns the
    result; ``stop()`` closes everything and joins the thread.

    :param socket_path: dom0's socket, if any.
    :param guest_sockets: domid -> socket path, served as that domain.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        quotas: Quotas | None = None,
        domain_info: Callable[[int], DomainInfo | None] | None = None,
        guest_sockets: Mapping[int, str] | None = None,
        call_timeout: float = 30.0,
    ) -> None:
        self.socket_path = socket_path
        self._quotas = quotas
        self._domain_info = domain_info
        self._guest_sockets = dict(guest_sockets or {})
        self.call_timeout = call_timeout
        self.loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        self._xenstored: Xenstored | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._boot_error: BaseException | None = None

    @property
    def xenstored(self) -> Xenstored:
        if self._xenstored is None:
            raise RuntimeError("XenstoredThread not started")
        return self._xenstored

    def start(self) -> XenstoredThread:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="sim-xenstored", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._boot_error is not None:
            self._thread.join()
            raise RuntimeError("simulated xenstored failed to start") from self._boot_error
        return self

    async def _boot(self) -> None:
        xs = Xenstored(self._quotas, self._domain_info, loop=self.loop)
        self._xenstored = xs
        if self.socket_path is not None:
            await xs.listen(self.socket_path, domid=0)
        for domid, path in self._guest_sockets.items():
            await xs.listen(path, domid=domid)

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._boot())
        except BaseException as e:
            self._boot_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                if self._xenstored is not None:
                    loop.run_until_complete(self._xenstored.close())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the loop thread; await it if it returns an awaitable."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("XenstoredThread is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("call() from the loop thread would deadlock")

        async def invoke() -> Any:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            return result

        fut = asyncio.run_coroutine_threadsafe(invoke(), self.loop)
        try:
            return fut.result(self.call_timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def stop(self) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join()

    def __enter__(self) -> XenstoredThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- command line ------------------------------------------------------------------


def _guest_socket(text: str) -> tuple[int, str]:
    domid, sep, path = text.partition(":")
    if not sep or not domid.isdigit() or not path:
        raise argparse.ArgumentTypeError("expected DOMID:PATH")
    return int(domid), path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torpor_sim.xenstored",
        description="Simulated Xen 4.17 xenstored on a Unix socket (foreground).",
    )
    p.add_argument("--socket", required=True, help="dom0's socket (XENSTORED_PATH)")
    p.add_argument(
        "--guest-socket",
        type=_guest_socket,
        action="append",
        default=[],
        metavar="DOMID:PATH",
        help="also serve PATH as domain DOMID's connection (repeatable)",
    )
    d = Quotas()
    p.add_argument("--entry-nb", type=int, default=d.entries_per_domain)
    p.add_argument("--entry-size", type=int, default=d.entry_size)
    p.add_argument("--watch-nb", type=int, default=d.watches_per_domain)
    p.add_argument("--transaction", type=int, default=d.transactions_per_domain)
    p.add_argument("--perm-nb", type=int, default=d.perms_per_node)
    p.add_argument("--path-max", type=int, default=d.path_max)
    return p


async def _serve(args: argparse.Namespace) -> None:
    quotas = Quotas(
        entries_per_domain=args.entry_nb,
        entry_size=args.entry_size,
        watches_per_domain=args.watch_nb,
        transactions_per_domain=args.transaction,
        perms_per_node=args.perm_nb,
        path_max=args.path_max,
    )
    xs = Xenstored(quotas)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await xs.listen(args.socket, domid=0)
    for domid, path in args.guest_socket:
        await xs.listen(path, domid=domid)
    print(f"torpor-sim-xenstored: ready on {args.socket}", flush=True)
    await stop.wait()
    await xs.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m torpor_sim.xenstored --socket PATH``: serve until SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

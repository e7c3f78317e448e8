"""Test helpers for the simulated xenstored: a raw wire client and a sync ring wrapper."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

from torpor.errors import XenstoreError
from torpor.model import DomainInfo
from torpor.xs_wire import Op, decode_error
from torpor_sim.xenstored import Quotas, RingClient, Xenstored

HDR = struct.Struct("<IIII")


class WireError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, code))
        self.errno = code


class RawXs:
    """A bare xs_wire client on a Unix socket, for what pyxs cannot send.

    Every wait has a deadline (socket timeout); nothing sleeps.
    """

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[tuple[str, str]] = []
        self.req_id = 100

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, op: int, payload: bytes, req_id: int | None = None, tx_id: int = 0) -> int:
        if req_id is None:
            self.req_id += 1
            req_id = self.req_id
        self.sock.sendall(HDR.pack(op, req_id, tx_id, len(payload)) + payload)
        return req_id

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv(self) -> tuple[int, int, int, bytes]:
        """The next message; raises EOFError when the server closed the socket."""
        if not self._fill(16):
            raise EOFError
        mtype, req_id, tx_id, length = HDR.unpack_from(self.buf)
        if not self._fill(16 + length):
            raise EOFError
        payload = self.buf[16 : 16 + length]
        self.buf = self.buf[16 + length :]
        return mtype, req_id, tx_id, payload

    def is_closed_by_peer(self) -> bool:
        """Wait (bounded by the socket timeout) for EOF; True if the server hung up."""
        try:
            while True:
                self.recv()
        except EOFError:
            return True
        except TimeoutError:
            return False

    def request(self, op: int, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
        """Send; return the reply (type, payload); watch events seen meanwhile go to .events."""
        req_id = self.send(op, payload, tx_id=tx_id)
        while True:
            mtype, rid, _tx, data = self.recv()
            if mtype == Op.WATCH_EVENT:
                self.events.append(_event(data))
                continue
            assert rid == req_id, (rid, req_id)
            return mtype, data

    def call(self, op: int, payload: bytes, tx_id: int = 0) -> bytes:
        mtype, data = self.request(op, payload, tx_id)
        if mtype == Op.ERROR:
            raise WireError(decode_error(data))
        assert mtype == op
        return data

    def next_event(self) -> tuple[str, str]:
        if self.events:
            return self.events.pop(0)
        mtype, _rid, _tx, data = self.recv()
        assert mtype == Op.WATCH_EVENT, mtype
        return _event(data)

    # conveniences
    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else value
        self.call(Op.WRITE, path.encode() + b"\0" + v, tx)

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.call(Op.READ, path.encode() + b"\0", tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.call(Op.MKDIR, path.encode() + b"\0", tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.call(Op.RM, path.encode() + b"\0", tx)

    def ls(self, path: str, tx: int = 0) -> list[str]:
        data = self.call(Op.DIRECTORY, path.encode() + b"\0", tx)
        return [] if not data else data.rstrip(b"\0").decode().split("\0")

    def set_perms(self, path: str, *perms: str) -> None:
        self.call(Op.SET_PERMS, path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms))

    def get_perms(self, path: str) -> list[str]:
        return self.call(Op.GET_PERMS, path.encode() + b"\0").rstrip(b"\0").decode().split("\0")

    def watch(self, path: str, token: str) -> None:
        self.call(Op.WATCH, path.encode() + b"\0" + token.encode() + b"\0")

    def tx_start(self) -> int:
        return int(self.call(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))

    def tx_end(self, tx: int, commit: bool = True) -> None:
        self.call(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)


def _event(data: bytes) -> tuple[str, str]:
    path, token, rest = data.split(b"\0")
    assert rest == b""
    return path.decode(), token.decode()


class SyncRing:
    """A RingClient driven synchronously on the test's own loop; events collected."""

    def __init__(self, sim: LoopSim, domid: int) -> None:
        self.sim = sim
        self.events: list[tuple[str, str]] = []
        self.conn = sim.xs.connect(domid, lambda p, t: self.events.append((p, t)))
        self.client = RingClient(self.conn)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        meth = getattr(self.client, name)

        def run(*args: Any, **kw: Any) -> Any:
            return self.sim.run(meth(*args, **kw))

        return run

    def errno_of(self, name: str, *args: Any) -> int:
        """The errno a call fails with (the test fails if it succeeds)."""
        try:
            getattr(self, name)(*args)
        except XenstoreError as e:
            return e.errno
        raise AssertionError(f"{name}{args} succeeded")

    def take_events(self) -> list[tuple[str, str]]:
        out, self.events[:] = list(self.events), []
        return out


class FakeHypervisor:
    """The domain_info callback a sim host would give: domid -> DomainInfo."""

    def __init__(self) -> None:
        self.domains: dict[int, DomainInfo] = {0: DomainInfo(domid=0, flags=0)}

    def __call__(self, domid: int) -> DomainInfo | None:
        return self.domains.get(domid)

    def create(self, domid: int) -> None:
        self.domains[domid] = DomainInfo(domid=domid, flags=DomainInfo.make_flags(running=True))

    def shutdown(self, domid: int, reason: int) -> None:
        self.domains[domid] = DomainInfo(
            domid=domid, flags=DomainInfo.make_flags(shutdown_reason=reason)
        )

    def run(self, domid: int) -> None:
        self.create(domid)

    def dying(self, domid: int) -> None:
        self.domains[domid] = DomainInfo(domid=domid, flags=DomainInfo.make_flags(dying=True))

    def destroy(self, domid: int) -> None:
        self.domains.pop(domid, None)


async def _noop() -> None:
    return None


class LoopSim:
    """A Xenstored on a private event loop that the test drives synchronously."""

    def __init__(
        self,
        quotas: Quotas | None = None,
        domain_info: Callable[[int], DomainInfo | None] | None = None,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.xs = Xenstored(quotas, domain_info, loop=self.loop)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def ring(self, domid: int) -> SyncRing:
        return SyncRing(self, domid)

    def settle(self) -> None:
        """Run the callbacks already scheduled (event deliveries); nothing is waited for."""
        self.loop.run_until_complete(_noop())

    def close(self) -> None:
        self.run(self.xs.close())
        self.loop.close()

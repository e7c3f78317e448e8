"""Fuzzing both ends of the simulated host's ``hypervisor.sock`` (newline-delimited JSON).

Client side: :class:`torpor.hypervisor.remote.RemoteHypervisor` against a
hostile server whose answer to each request hypothesis draws -- a correct
reply, a stale or foreign id, garbage, JSON that is not an object or nests
too deep, an error object of any shape, a result of the wrong type, a line
trickled a byte at a time, silence, a hang-up; and event-channel lines of any
shape.  Every call returns the right type or raises a
:class:`~torpor.errors.TorporError` within its deadline (the deadline is the
whole call's, not each recv()'s).

Server side: :class:`torpor_sim.control.ControlServer` on a real
:class:`~torpor_sim.host.SimHost`, fed random and mutated request lines by
several clients at once while a bystander keeps making correct calls: no
handler may die with an unhandled exception, every well-framed line gets one
reply, the bystander is answered correctly throughout, and nothing a client
opened (event-channel handles, image transfers) outlives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given
from xs_hostile import HostileServer

from torpor.errors import TorporError
from torpor.hypervisor.remote import RemoteHypervisor
from torpor.model import DomainInfo
from torpor_sim.control import MAX_LINE
from torpor_sim.host import SimHost

from . import budget

T = 0.15
SLACK = 0.5

INFO = {"domid": 1, "flags": 0, "uuid": "00000000-0000-0000-0000-000000000001"}
ACTIONS = ["ok", "ok", "ok", "stale_id", "foreign_id", "no_id", "garbage", "not_object"]
ACTIONS += ["deep", "error_junk", "result_junk", "trickle", "silence", "close", "partial_close"]
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=8,
)
ERROR_JUNK = st.one_of(
    JUNK,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["HypervisorError", "UsageError", None, 5]), "errno": JUNK}
    ),
    st.fixed_dictionaries({"message": JUNK, "domid": JUNK}),
)
RESULT_JUNK = st.one_of(
    JUNK,
    st.fixed_dictionaries({"domid": JUNK, "flags": JUNK}),
    st.just({**INFO, "flags": "0"}),
    st.just({**INFO, "flags": True}),
    st.just({**INFO, "extra": 1}),
    st.just([{**INFO, "flags": None}]),
    st.just("12"),
    st.just(2**80),
)


def good_result(op: str) -> Any:
    return {
        "domain_info": INFO,
        "domain_info_list": [INFO, {**INFO, "domid": 2}],
        "get_hvm_param": 7,
        "evtchn_open": 1,
        "evtchn_bind_interdomain": 5,
    }.get(op)


class Script:
    """The hostile server: one action per request line, then correct replies."""

    def __init__(self, actions: list[str], junk: list[Any], events: list[bytes]) -> None:
        self.actions = actions
        self.junk = junk or [None]
        self.events = events
        self.release = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        n = 0
        for line in f:
            try:
                req = json.loads(line)
            except ValueError:
                return
            rid, op = req.get("id"), req.get("op")
            if op == "evtchn_attach":  # the event stream
                conn.sendall(json.dumps({"id": rid, "result": None}).encode() + b"\n")
                for ev in self.events:
                    conn.sendall(ev)
                self.release.wait(30)
                return
            action = self.actions[n] if n < len(self.actions) else "ok"
            junk = self.junk[n % len(self.junk)]
            n += 1
            ok = {"id": rid, "result": good_result(op)}
            out: bytes | None = None
            if action == "ok":
                out = json.dumps(ok).encode() + b"\n"
            elif action == "stale_id":
                out = json.dumps({**ok, "id": rid - 1}).encode() + b"\n"
            elif action == "foreign_id":
                out = json.dumps({**ok, "id": junk}).encode() + b"\n"
            elif action == "no_id":
                out = json.dumps({"result": ok["result"]}).encode() + b"\n"
            elif action == "garbage":
                out = b"\x00\xff{{not json\n"
            elif action == "not_object":
                out = json.dumps([rid, junk]).encode() + b"\n"
            elif action == "deep":
                out = b"[" * 100_000 + b"\n"
            elif action == "error_junk":
                out = json.dumps({"id": rid, "error": junk}).encode() + b"\n"
            elif action == "result_junk":
                out = json.dumps({"id": rid, "result": junk}).encode() + b"\n"
            elif action == "trickle":
                # A byte at a time, under the per-recv timeout, never a newline.
                for _ in range(int(4 * T / 0.02)):
                    if self.release.wait(0.02):
                        return
                    conn.sendall(b" ")
                return
            elif action == "silence":
                continue
            elif action == "close":
                return
            elif action == "partial_close":
                conn.sendall(json.dumps(ok).encode()[:5])
                return
            if out is not None:
                conn.sendall(out)


def _info(hv: RemoteHypervisor) -> None:
    i = hv.domain_info(1)
    assert isinstance(i, DomainInfo)
    assert all(
        isinstance(getattr(i, f), int) and not isinstance(getattr(i, f), bool)
        for f in ("domid", "flags", "tot_pages", "max_pages", "emulation_flags")
    )
    assert isinstance(i.uuid, str)
    i.state_word()  # what the orchestrator does with it: flags must be an int


def _info_list(hv: RemoteHypervisor) -> None:
    rows = hv.domain_info_list()
    assert isinstance(rows, list)
    for i in rows:
        assert isinstance(i, DomainInfo) and isinstance(i.flags, int)
        i.state_word()


def _param(hv: RemoteHypervisor) -> None:
    v = hv.get_hvm_param(1, 0)
    assert isinstance(v, int) and not isinstance(v, bool)


def _events(hv: RemoteHypervisor) -> None:
    # Binding opens the event stream; then drain what the server sent there.
    hv.evtchn_bind_interdomain(1, 3)
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        port = hv.evtchn_pending()
        if port is None:
            break
        assert isinstance(port, int) and not isinstance(port, bool)


CLIENT_OPS: dict[str, Callable[[RemoteHypervisor], None]] = {
    "domain_info": _info,
    "domain_info_list": _info_list,
    "get_hvm_param": _param,
    "pause": lambda hv: hv.pause(1),
    "resume": lambda hv: hv.resume(1, fast=True),
    "events": _events,
}
#: requests an op may make (its deadline is per request)
REQUESTS = {"events": 3}


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="fzh", dir="/tmp")
    yield os.path.join(d, "hypervisor.sock")
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


@budget.fuzz(ci_examples=50)
@given(
    actions=st.lists(st.sampled_from(ACTIONS), max_size=6),
    junk=st.lists(st.one_of(ERROR_JUNK, RESULT_JUNK), max_size=3),
    events=st.lists(
        st.one_of(
            st.builds(lambda p: json.dumps({"port": p}).encode() + b"\n", JUNK),
            st.binary(max_size=20).map(lambda b: b + b"\n"),
            st.just(b"[" * 50_000 + b"\n"),
        ),
        max_size=3,
    ),
    ops=st.lists(st.sampled_from(sorted(CLIENT_OPS)), min_size=1, max_size=5),
)
def test_remote_hypervisor_against_a_hostile_server(
    sock_path: str, actions: list[str], junk: list[Any], events: list[bytes], ops: list[str]
) -> None:
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    script = Script(actions, junk, events)
    server = HostileServer(sock_path, script, hang_up=True)
    try:
        hv = RemoteHypervisor(sock_path, timeout=T)
        try:
            for name in ops:
                t0 = time.monotonic()
                try:
                    CLIENT_OPS[name](hv)
                    budget.STATS["hypervisor.sock client: calls answered"] += 1
                except TorporError:
                    budget.STATS["hypervisor.sock client: calls that raised a TorporError"] += 1
                took = time.monotonic() - t0
                limit = REQUESTS.get(name, 1) * T + SLACK
                assert took < limit, f"{name} took {took:.2f}s (limit {limit:.2f}s)"
        finally:
            hv.close()
    finally:
        script.release.set()
        server.close()
    budget.STATS["hypervisor.sock client: examples"] += 1


# ---------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def host() -> Iterator[SimHost]:
    d = tempfile.mkdtemp(prefix="fzc", dir="/tmp")
    h = SimHost(d, qemu=False)
    h.start()
    h.create_guest("pv")
    h.create_guest("pvhvm")
    yield h
    h.stop()
    import shutil

    shutil.rmtree(d, ignore_errors=True)


#: Ops a hostile client may name, destructive ones aimed at a domain that does not exist.
SERVER_OPS = [
    "domain_info",
    "domain_info_list",
    "pause",
    "unpause",
    "shutdown",
    "resume",
    "destroy",
    "get_hvm_param",
    "set_hvm_param",
    "evtchn_open",
    "evtchn_bind_interdomain",
    "evtchn_notify",
    "evtchn_unbind",
    "evtchn_unmask",
    "evtchn_subscribe",
    "evtchn_attach",
    "sim_status",
    "sim_guest",
    "sim_save",
    "transfer_open",
    "transfer_read",
    "transfer_write",
    "transfer_close",
    "sim_restore",
    "bogus",
]


def _as_int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return None


def _aim_elsewhere(args: dict[str, Any]) -> dict[str, Any]:
    """Hostile clients may do anything dom0 may, to domain 77 (there is none)."""
    if _as_int(args.get("domid")) in (0, 1, 2):
        args["domid"] = 77
    return args


ARG_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 99, -1, 2**31, 2**64, 10**30, "1", "x", None, True, [], {}, 1.5]),
    JUNK,
)
# domid 1 and 2 are the host's guests: hostile clients aim at 77 (no such domain) so that
# what they may legitimately do (the socket is dom0's) does not change the bystander's view.
ARGS = st.dictionaries(
    st.sampled_from(["domid", "reason", "fast", "param", "value", "port", "remote_port"])
    | st.sampled_from(["local_port", "handle", "transfer", "offset", "length", "data"])
    | st.sampled_from(["first_domid", "max_domains"]),
    ARG_VALUES,
    max_size=4,
).map(_aim_elsewhere)


@st.composite
def request_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["request"] * 20 + ["junk_json", "bytes", "deep", "long"]))
    if kind == "request":
        msg: Any = {"id": draw(ARG_VALUES), "op": draw(st.sampled_from(SERVER_OPS) | JUNK)}
        if draw(st.booleans()):
            msg["args"] = draw(ARGS | JUNK)
        line = json.dumps(msg).encode()
    elif kind == "junk_json":
        line = json.dumps(draw(JUNK)).encode()
    elif kind == "bytes":
        line = draw(st.binary(max_size=40)).replace(b"\n", b"")
    elif kind == "deep":
        line = b"[" * draw(st.integers(1000, 200_000))
    else:
        line = b'"' + b"x" * (MAX_LINE + 10) + b'"'
    return line + b"\n"


def _bystander(path: str) -> RemoteHypervisor:
    return RemoteHypervisor(path, timeout=5)


def _read_replies(sock: socket.socket, deadline: float) -> list[bytes]:
    buf = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 20)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        buf += chunk
    return [ln for ln in buf.split(b"\n") if ln]


@budget.fuzz(ci_examples=60)
@given(
    streams=st.lists(
        st.lists(request_line(), min_size=1, max_size=8),
        min_size=1,
        max_size=3,
    )
)
def test_control_server_against_hostile_clients(
    host: SimHost, caplog: Any, streams: list[list[bytes]]
) -> None:
    control = host.control
    before = host.run(_status(host))
    with caplog.at_level(logging.ERROR), contextlib.closing(_bystander(control.path)) as by:
        caplog.clear()
        socks = []
        for _ in streams:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(control.path)
            socks.append(s)
        try:
            for i, lines in enumerate(streams):
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    socks[i].sendall(b"".join(lines))
                assert by.domain_info(1).domid == 1  # the bystander, between clients
            for s in socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 10
            for i, lines in enumerate(streams):
                replies = _read_replies(socks[i], deadline)
                # One JSON reply per request line until the server gives up on the client
                # (a malformed or overlong line is answered, then the client is dropped).
                assert len(replies) <= len(lines)
                for r in replies:
                    msg = json.loads(r)
                    assert isinstance(msg, dict) and ("result" in msg or "error" in msg)
                budget.STATS["hypervisor.sock server: lines sent"] += len(lines)
                budget.STATS["hypervisor.sock server: replies"] += len(replies)
        finally:
            for s in socks:
                s.close()
        assert [d.domid for d in by.domain_info_list()] == [0, 1, 2]
        assert host.run(_status(host)) == before
        # Every hostile client was hung up on (EOF read above), and its handler's
        # clean-up ran before that: nothing it opened outlives it.
        assert host.run(_leftovers(host)) == (1, {}, {})
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    budget.STATS["hypervisor.sock server: examples"] += 1


async def _status(host: SimHost) -> list[Any]:
    return [(s.domid, s.state) for s in await host._status()]


async def _leftovers(host: SimHost) -> tuple[int, dict[int, Any], dict[int, Any]]:
    """(open connections, event-channel handles, image transfers) of the control server."""
    c = host.control
    return len(c._writers), dict(c.handles), {k: len(v) for k, v in c.transfers.items()}


def test_control_server_serves_others_while_clients_stall_or_never_read(host: SimHost) -> None:
    """A client stopped mid-line, and one that floods requests and never reads a
    reply (its handler then waits on a full socket): neither blocks the others."""
    path = host.control.path
    stall = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (stall, flood):
        s.connect(path)
    try:
        stall.sendall(b'{"id": 1, "op": "domain_in')
        line = json.dumps({"id": 1, "op": "sim_status"}).encode() + b"\n"
        flood.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 64 << 20:
                sent += flood.send(line * 64)
        with contextlib.closing(_bystander(path)) as by:
            for _ in range(20):
                assert by.domain_info(1).domid == 1
                assert len(by.domain_info_list()) == 3
    finally:
        stall.close()
        flood.close()

"""The plugin conformance suite: mixin classes a guest-type plugin's tests subclass.

Like fsspec's ``tests/abstract`` and SQLAlchemy's ``testing/suite``, the
suite is a set of classes *without* the ``Test`` prefix; a plugin author
subclasses them in their own test module, says which plugins are under test
and which simulated guest they run on, and pytest runs every test::

    from torpor.testing import ConformanceSuite
    import torpor_pvh.plugin

    class TestPvhConformance(ConformanceSuite):
        guest_kind = "pvh"                 # what the simulated host builds
        plugins = [torpor_pvh.plugin]      # exactly the plugins under test
        entry_point = "pvh"                # its name in the ``torpor`` entry-point group

Every test runs on a fresh simulated host (:mod:`torpor.testing.pytest_plugin`
fixtures) with a plugin manager holding ``torpor.protocol`` and ``plugins``
only.  What the guest type can do is read from the plugin's own
:class:`~torpor.model.GuestType` (the one its classifier returns for a guest
of ``guest_kind``); a test that needs a capability the guest type lacks is
skipped with the reason.  The expected outcome of each misbehaviour follows
from the suspend method the guest type uses (:func:`expected_failure`).
Every wait of every test has a short deadline (:meth:`ConformanceBase.timeouts`,
:meth:`ConformanceBase.bounded_timeouts`), and every test ends by checking
that the plugin left no QMP or guest-agent connection open, naming any it did.

Stability promise: the names of the mixin classes, of their ``test_*``
methods, of :class:`Capability` members and of the class attributes of
:class:`ConformanceBase` are API.  They are only removed or renamed in a new
major version of torpor; new tests and new class attributes (with defaults
that keep existing subclasses working) may be added in any release, and a
plugin that conforms to the protocol passes the new tests.  One attribute has
changed meaning (issue 13): ``capabilities`` left unset used to mean "none",
skipping every capability test; it now means "what the plugin's GuestType
says", and a value that is set must agree with the GuestType
(``test_declared_capabilities_match_the_guest_type``).  ``guest_type``,
``also_claims``, ``entry_point`` and the ``*_timeout`` deadlines are new, with
defaults.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import inspect
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import attrs
import pytest

from torpor import errors
from torpor.hookspecs import hookimpl
from torpor.model import DomainInfo, GuestType, Phase, ShutdownReason, SuspendMethod, Timeouts

__all__ = [
    "Capability",
    "CapabilitySuite",
    "CheckpointSuite",
    "ConformanceBase",
    "ConformanceSuite",
    "DeclarationSuite",
    "Expected",
    "HookSuite",
    "LeakSuite",
    "MisbehaviourSuite",
    "RefusalSuite",
    "SuspendResumeSuite",
    "capabilities_of",
    "expected_failure",
    "requires",
]

F = TypeVar("F", bound=Callable[..., Any])


class Capability(enum.Enum):
    """What a guest type can do, as its :class:`~torpor.model.GuestType` says
    (:func:`capabilities_of`); tests needing one it lacks are skipped."""

    #: The guest answers the xenstore ``control/shutdown`` handshake (PV drivers).
    XENSTORE_HANDSHAKE = "xenstore-handshake"
    #: The guest can publish a suspend event channel (XenLinux).
    EVENT_CHANNEL = "event-channel"
    #: The guest's suspend hypercall can return 1: a fast, cooperative resume.
    COOPERATIVE_RESUME = "cooperative-resume"
    #: The guest has a QEMU device model torpor stops and continues.
    DEVICE_MODEL = "device-model"
    #: The guest can sleep in ACPI S3 (through its agent) and be woken.
    ACPI_S3 = "acpi-s3"
    #: The guest can be suspended without its cooperation (hard shutdown).
    HARD_SUSPEND = "hard-suspend"
    #: A non-cooperative resume in the same domain is safe for it.
    INPLACE_NONCOOPERATIVE = "inplace-noncooperative"


#: Each capability is one field of GuestType having one value.
_GUEST_TYPE_FIELD: dict[Capability, tuple[str, bool]] = {
    Capability.XENSTORE_HANDSHAKE: ("xenstore_handshake", True),
    Capability.EVENT_CHANNEL: ("event_channel", True),
    Capability.COOPERATIVE_RESUME: ("cooperative_resume", True),
    Capability.DEVICE_MODEL: ("device_model", True),
    Capability.ACPI_S3: ("acpi_s3", True),
    # No handshake: torpor suspends it the hard way (libxl's path for HVM without PV drivers).
    Capability.HARD_SUSPEND: ("xenstore_handshake", False),
    Capability.INPLACE_NONCOOPERATIVE: ("survives_inplace_noncooperative", True),
}


def capabilities_of(guest_type: GuestType) -> frozenset[Capability]:
    """The capabilities a :class:`~torpor.model.GuestType` declares.

    ``xenstore_handshake`` gives ``XENSTORE_HANDSHAKE`` (and its absence
    ``HARD_SUSPEND``: the orchestrator then suspends the guest the hard way);
    ``event_channel``, ``cooperative_resume``, ``device_model``, ``acpi_s3`` and
    ``survives_inplace_noncooperative`` give the capability of that name.
    """
    return frozenset(
        cap
        for cap, (field, value) in _GUEST_TYPE_FIELD.items()
        if bool(getattr(guest_type, field)) is value
    )


def requires(*caps: Capability) -> Callable[[F], F]:
    """Skip the decorated suite test unless the guest type has every capability."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: ConformanceBase, *a: Any, **kw: Any) -> Any:
            have = self.guest_capabilities()
            missing = [c for c in caps if c not in have]
            if missing:
                pytest.skip(
                    f"guest type {self.expected_guest_type()!r} lacks "
                    + ", ".join(c.value for c in missing)
                )
            return fn(self, *a, **kw)

        return wrapper  # type: ignore[return-value]

    return deco


@attrs.frozen
class Expected:
    """What a misbehaving guest's suspend must end in.

    :param error: the OperationError subclass raised (``None``: the suspend succeeds).
    :param state: ``err.state`` -- what the domain was left in.
    :param phase: the phase named by the error.
    """

    error: type[errors.OperationError] | None
    state: str
    phase: Phase | None = None


def expected_failure(misbehaviour: str, method: SuspendMethod) -> Expected:
    """The protocol's answer to a misbehaviour, by the suspend method in use.

    xenstore handshake: a request nobody takes is cancelled (AckTimeout, the
    guest left running); an ack without a suspend is a SuspendTimeout.  ACPI S3
    through an agent: there is no ack, so a guest that never sleeps is a
    SuspendTimeout; an agent that refuses is an OperationError at once.  Any
    method: a crash is UnexpectedShutdown, a vanished domain DomainVanished.
    """
    if misbehaviour == "crash_during_suspend":
        return Expected(errors.UnexpectedShutdown, "crashed", Phase.SHUTDOWN)
    if misbehaviour == "vanish":
        return Expected(errors.DomainVanished, "gone")
    if method == SuspendMethod.XENSTORE:
        if misbehaviour in ("never_ack", "unknown_command", "lose_xenstore", "slow_ack"):
            return Expected(errors.AckTimeout, "running", Phase.ACK)
        if misbehaviour == "ack_then_hang":
            return Expected(errors.SuspendTimeout, "running", Phase.SHUTDOWN)
    if method == SuspendMethod.ACPI_S3:
        if misbehaviour in ("never_ack", "ack_then_hang", "slow_ack"):
            return Expected(errors.SuspendTimeout, "running", Phase.SHUTDOWN)
        if misbehaviour == "unknown_command":
            return Expected(errors.OperationError, "running", Phase.SHUTDOWN)
        if misbehaviour == "lose_xenstore":  # no agent: the hard suspend needs none
            return Expected(None, "suspended")
    if method == SuspendMethod.HARD_SHUTDOWN:
        return Expected(None, "suspended")  # no cooperation to withhold
    if method == SuspendMethod.EVENT_CHANNEL:
        # No xenstore ack to withhold: the channel's interrupt suspends the guest.
        if misbehaviour in ("never_ack", "unknown_command", "lose_xenstore", "slow_ack"):
            return Expected(None, "suspended")
        if misbehaviour == "ack_then_hang":
            return Expected(errors.SuspendTimeout, "running", Phase.SHUTDOWN)
    raise ValueError(f"no expectation for {misbehaviour!r} with method {method}")


@attrs.frozen
class _Found:
    """What the plugins under test make of a guest of ``guest_kind``."""

    guest_type: GuestType | None
    #: why there is none (the domain, as the classifier saw it)
    why: str = ""


#: test class -> what its plugins classify its guest kind as (once per class)
_FOUND: dict[type, _Found] = {}


def _label(plugin: object) -> str:
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}()"


def _claims(
    plugins: Sequence[object], sim: Any, domid: int
) -> tuple[DomainInfo, list[tuple[str, GuestType]]]:
    """Ask the classifier of every plugin under test about one domain, in the
    order torpor asks them: ``(its DomainInfo, [(plugin, GuestType it returned)...])``
    for each plugin that claims it (torpor takes the first)."""
    from torpor.plugins import get_plugin_manager

    pm = get_plugin_manager(plugins=list(plugins), autoload=False)
    host = sim.toolstack_host()
    try:
        info: DomainInfo = host.hypervisor.domain_info(domid)

        async def ask() -> list[tuple[str, GuestType]]:
            out = []
            for impl in reversed(pm.hook.torpor_classify_domain.get_hookimpls()):
                kwargs = {"domain": info, "host": host}
                try:
                    res = impl.function(*[kwargs[a] for a in impl.argnames])
                    if inspect.isawaitable(res):
                        res = await res
                except Exception as e:
                    raise AssertionError(
                        f"{_label(impl.plugin)}: torpor_classify_domain raised on domain "
                        f"{domid}: {e!r} (a classifier looks, and answers None for a domain "
                        "it does not know)"
                    ) from e
                if res is not None:
                    if not isinstance(res, GuestType):
                        raise AssertionError(
                            f"{_label(impl.plugin)}: torpor_classify_domain returned {res!r} "
                            f"for domain {domid}, not a GuestType or None"
                        )
                    out.append((_label(impl.plugin), res))
            return out

        return info, asyncio.run(ask())
    finally:
        host.close()


def _find_guest_type(cls: type[ConformanceBase]) -> _Found:
    """Build a guest of ``cls.guest_kind`` on a simulated host of its own and
    classify it through ``cls.plugins``: the GuestType torpor would use."""
    from torpor.host import sim_module

    SimHost = sim_module("host").SimHost

    d = tempfile.mkdtemp(prefix="tpc", dir="/tmp")  # AF_UNIX paths: keep it short
    sim = SimHost(d, qemu=cls.use_qemu, name="conformance-classify")
    sim.start()
    try:
        domid = sim.create_guest(cls.guest_kind)
        info, claims = _claims(cls.plugins, sim, domid)
    finally:
        sim.stop()
        shutil.rmtree(d, ignore_errors=True)
    if claims:
        return _Found(claims[0][1])
    return _Found(
        None,
        f"no plugin under test claims a {cls.guest_kind} guest (domain {domid}: "
        f"hvm={info.hvm}, emulation flags {info.emulation_flags:#x}), so every operation "
        "on it is UnsupportedGuest",
    )


class ConformanceBase:
    """What every suite class needs; set these in your subclass.

    :cvar guest_kind: the guest the simulated host builds for each test: one of
        :data:`torpor_sim.host.GUEST_KINDS` (``pv``, ``pvhvm``, ``hvm``, ``pvh``).
    :cvar guest_type: the name the plugin's :class:`~torpor.model.GuestType` must
        have (``winpv`` for a Windows-PV-drivers type on ``pvhvm`` guests);
        default: ``guest_kind``.
    :cvar also_claims: other guest kinds the plugin claims too, by design; it must
        decline every guest of every other kind.
    :cvar plugins: the plugins under test (modules or objects); only these and
        :mod:`torpor.protocol` are registered.
    :cvar capabilities: ``None`` (default): what the plugin's GuestType says
        (:func:`capabilities_of`).  Set, it must agree with the GuestType, or
        ``test_declared_capabilities_match_the_guest_type`` fails naming each
        capability that disagrees; the tests follow the GuestType either way.
    :cvar suspend_method: how the guest type is asked to suspend by default.
    :cvar entry_point: the plugin's name in the ``torpor`` entry-point group
        (``True``: any name; ``False``: do not check).  A plugin that is not
        installed as a distribution has no entry point: the check is skipped.
    :cvar ack_timeout: / :cvar suspend_timeout: the deadlines the failure tests
        expect to expire.
    :cvar device_model_timeout: every QMP exchange (greeting included), in every test.
    :cvar wait_timeout: every other wait of a test that expects success.
    :cvar settle_timeout: torpor's ``settle`` wait (a forced in-place resume, a
        rollback waiting for a suspend under way).
    :cvar use_qemu: HVM device models on real QEMU (``None``: when installed), read
        by the ``torpor_sim_host`` fixture.
    """

    guest_kind: ClassVar[str] = ""
    guest_type: ClassVar[str] = ""
    also_claims: ClassVar[Iterable[str]] = ()
    plugins: ClassVar[Sequence[object]] = ()
    capabilities: ClassVar[Iterable[Capability] | None] = None
    suspend_method: ClassVar[SuspendMethod] = SuspendMethod.XENSTORE
    entry_point: ClassVar[str | bool] = True
    ack_timeout: ClassVar[float] = 0.3
    suspend_timeout: ClassVar[float] = 0.6
    device_model_timeout: ClassVar[float] = 2.0
    wait_timeout: ClassVar[float] = 5.0
    settle_timeout: ClassVar[float] = 1.0
    use_qemu: ClassVar[bool | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__ == __name__:  # the suite's own tests: each ends with the check
            for name, fn in list(vars(cls).items()):
                if name.startswith("test_") and callable(fn):
                    setattr(cls, name, _leaves_nothing_open(fn))

    @pytest.fixture(autouse=True)
    def _torpor_conformance_request(self, request: pytest.FixtureRequest) -> None:
        # The end-of-test check finds the test's simulated host through it.
        self._torpor_request = request
        self._qmp_guard = _QmpGuard()

    def harness_plugins(self) -> list[object]:
        """The suite's own plugins, added to every client ``torpor_client_with`` makes:
        a watch on the device model's QMP monitor (a connection the plugin left open
        is named in the failure and shut, so the test goes on without waiting)."""
        guard = getattr(self, "_qmp_guard", None)
        return [guard] if guard is not None else []

    # helpers ------------------------------------------------------------------

    @staticmethod
    def report(host: Any, domid: int) -> dict[str, Any]:
        """The simulated guest's counters, checksum and kernel log."""
        result: dict[str, Any] = host.run(host.guest_report(domid))
        return result

    def timeouts(self) -> Timeouts:
        """The failure tests' deadlines: ``ack`` and ``suspend`` expire on purpose."""
        return attrs.evolve(
            self.bounded_timeouts(), ack=self.ack_timeout, suspend=self.suspend_timeout
        )

    def bounded_timeouts(self) -> Timeouts:
        """Every other test's deadlines (``torpor_client`` uses them): long enough
        for a guest that behaves, short enough that a plugin that makes torpor
        wait fails in seconds."""
        w = self.wait_timeout
        return Timeouts(
            ack=w,
            suspend=w,
            device_model=self.device_model_timeout,
            resume=w,
            wake=w,
            settle=self.settle_timeout,
        )

    def expected_guest_type(self) -> str:
        """The GuestType name the plugin must report: ``guest_type`` or ``guest_kind``."""
        return self.guest_type or self.guest_kind

    def found_guest_type(self) -> GuestType:
        """The GuestType the plugins under test give a guest of ``guest_kind``
        (found once per test class, on a simulated host of its own); fails the
        test, saying why, if no plugin claims one."""
        cls = type(self)
        if not cls.guest_kind:
            raise pytest.UsageError(f"{cls.__name__} must set guest_kind")
        found = _FOUND.get(cls)
        if found is None:
            found = _FOUND[cls] = _find_guest_type(cls)
        if found.guest_type is None:
            pytest.fail(
                f"cannot tell what guest type {self.expected_guest_type()!r} can do: " + found.why
            )
        return found.guest_type

    def guest_capabilities(self) -> frozenset[Capability]:
        """What the guest type can do, from its GuestType (:func:`capabilities_of`)."""
        return capabilities_of(self.found_guest_type())

    def _left_open(self) -> str:
        guard = getattr(self, "_qmp_guard", None)
        lines = list(guard.found) if guard is not None else []
        request = getattr(self, "_torpor_request", None)
        if request is not None and "torpor_sim_host" in request.fixturenames:
            left = _connections_left_open(request.getfixturevalue("torpor_sim_host"))
            lines += [left] if left else []
        return "\n".join(lines)


def _unix_peers() -> list[tuple[int, str]]:
    """``(fd, path)`` for each of this process's descriptors that is a Unix socket
    connected to a named one (the client end of a connection to ``path``)."""
    peers = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except OSError:  # closed meanwhile
            continue
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        with sock:  # closes the duplicate only
            try:
                peer = sock.getpeername() if sock.family == socket.AF_UNIX else ""
            except OSError:  # not connected (any more)
                peer = ""
        if isinstance(peer, str) and peer:
            peers.append((int(name), peer))
    return peers


def _own_qmp_fd(ctx: Any) -> int | None:
    """The descriptor of the operation's own QMP connection (``ctx.device_model()``),
    -1 if it has none, ``None`` if that cannot be told."""
    if not hasattr(ctx, "_device_model"):
        return None
    client = ctx._device_model
    if client is None:
        return -1
    if not hasattr(client, "_sock"):
        return None
    sock: socket.socket | None = client._sock
    return sock.fileno() if sock is not None else -1


class _QmpGuard:
    """The suite's plugin in every client it makes: at each phase boundary, a QMP
    connection to the domain's device model that is not the operation's own is
    one the plugin under test left open.  QEMU serves one QMP client at a time, so
    torpor's own connection would wait for a greeting that never comes: record the
    connection (the test fails naming it) and shut it, so that the test goes on
    and fails at once rather than after every device-model deadline."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self._shut: set[int] = set()  # socket inodes already shut

    @hookimpl
    def torpor_phase_started(self, ctx: Any, phase: Phase) -> None:
        self._release(ctx, f"when phase {phase} of a {ctx.operation} started")

    @hookimpl
    def torpor_phase_finished(self, ctx: Any, phase: Phase, seconds: float, error: Any) -> None:
        if error is not None:
            self._release(ctx, f"when phase {phase} of a {ctx.operation} failed")

    def _release(self, ctx: Any, when: str) -> None:
        own = _own_qmp_fd(ctx)
        if own is None:  # cannot tell torpor's own: the end-of-test check still names leaks
            return
        path = ctx.host.qmp_path(ctx.domid)
        for fd, peer in _unix_peers():
            if peer != path or fd == own:
                continue
            try:
                ino = os.fstat(fd).st_ino
            except OSError:
                continue
            if ino in self._shut:
                continue  # shut already; the plugin has not closed its descriptor yet
            self._shut.add(ino)
            self.found.append(
                f"plugin left 1 QMP connection to {path} open (found {when}; "
                f"{_QMP_ONE_CLIENT}; the suite shut it)"
            )
            try:
                dup = os.dup(fd)
            except OSError:
                continue
            with socket.socket(fileno=dup) as sock, contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the connection, not the plugin's descriptor


_QMP_ONE_CLIENT = (
    "QEMU serves one QMP client at a time, so torpor's next connection waits for a "
    "greeting that never comes; close it when done, or use ctx.device_model(), which "
    "torpor closes when the operation ends"
)


def _connections_left_open(sim: Any) -> str:
    """Connections to the simulated host's device models and guest agents that
    are still open in this process once every operation has returned."""
    where = os.path.join(str(sim.dir), "qmp")
    counts = collections.Counter(p for _, p in _unix_peers() if os.path.dirname(p) == where)
    lines = []
    for path, n in sorted(counts.items()):
        base = os.path.basename(path)
        if base.startswith("qmp-libxl-"):
            what, why = "QMP connection", _QMP_ONE_CLIENT
        elif base.startswith("qga-"):
            what, why = "guest-agent connection", "close it, or register ctx.on_close()"
        else:
            what, why = "connection", "close it, or register ctx.on_close()"
        lines.append(f"plugin left {n} {what}{'s' if n > 1 else ''} to {path} open ({why})")
    return "\n".join(lines)


def _leaves_nothing_open(fn: F) -> F:
    """A suite test, then the check that nothing it made is still connected."""

    @functools.wraps(fn)
    def wrapper(self: ConformanceBase, *a: Any, **kw: Any) -> Any:
        try:
            result = fn(self, *a, **kw)
        except BaseException as e:
            left = self._left_open()
            if left:  # the symptom above (a wait that expired...), the cause here
                raise AssertionError(left) from e
            raise
        left = self._left_open()
        if left:
            raise AssertionError(left)
        return result

    return wrapper  # type: ignore[return-value]


class SuspendResumeSuite(ConformanceBase):
    """The suspend/resume cycle, both ways."""

    def test_classified_as_its_guest_type(self, torpor_guest: Any, torpor_client: Any) -> None:
        rows = {r["domid"]: r for r in torpor_client.list_domains()}
        found = rows[torpor_guest]["guest_type"]
        assert found == self.expected_guest_type(), (
            f"no plugin under test claims a {self.guest_kind} guest: torpor refuses it "
            "with UnsupportedGuest"
            if found == "?"
            else f"a {self.guest_kind} guest is classified as {found!r}, "
            f"expected {self.expected_guest_type()!r}"
        )

    def test_suspend_then_cooperative_resume(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        before = self.report(torpor_sim_host, torpor_guest)
        res = torpor_client.suspend(torpor_guest)
        assert res.outcome in ("suspended", "asleep")
        assert res.method == self.suspend_method
        assert res.guest_type == self.expected_guest_type()
        frozen = self.report(torpor_sim_host, torpor_guest)
        assert frozen["state"] in ("suspended", "S3")
        res = torpor_client.resume(torpor_guest)
        assert res.outcome == "resumed" and res.state == "running"
        after = self.report(torpor_sim_host, torpor_guest)
        assert after["counters"]["boots"] == before["counters"]["boots"], "guest rebooted"
        assert after["counters"]["ticks"] >= frozen["counters"]["ticks"]
        assert after["checksum_at_resume"] == frozen["checksum"], "memory changed"

    @requires(Capability.COOPERATIVE_RESUME)
    def test_resume_is_cooperative_by_default(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        torpor_client.suspend(torpor_guest)
        res = torpor_client.resume(torpor_guest)
        if res.cooperative is not None:  # S3 wake: no hypercall to return from
            assert res.cooperative is True
            assert self.report(torpor_sim_host, torpor_guest)["last_hypercall_return"] == 1

    def test_inplace_noncooperative_resume_refused_unless_safe(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        res = torpor_client.suspend(torpor_guest)
        if res.state != "suspended":
            pytest.skip("the guest sleeps in S3: there is no hypercall to resume from")
        if Capability.INPLACE_NONCOOPERATIVE in self.guest_capabilities():
            assert torpor_client.resume(torpor_guest, cooperative=False).outcome == "resumed"
            return
        with pytest.raises(errors.UnsafeResume) as e:
            torpor_client.resume(torpor_guest, cooperative=False)
        assert e.value.state == "suspended"
        info = torpor_sim_host.xen.domain_info(torpor_guest)
        assert info.suspended, "a refused resume must touch nothing"
        torpor_client.resume(torpor_guest)

    def test_forced_inplace_noncooperative_resume_reports_truthfully(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        res = torpor_client.suspend(torpor_guest)
        if res.state != "suspended":
            pytest.skip("the guest sleeps in S3: there is no hypercall to resume from")
        try:
            out = torpor_client.resume(torpor_guest, cooperative=False, force=True)
        except errors.ResumeFailed as e:
            info = torpor_sim_host.xen.domain_info(torpor_guest)
            assert info.shutdown and info.shutdown_reason != ShutdownReason.SUSPEND
            assert e.state == info.state_word()
        else:
            assert out.state == "running"
            assert torpor_sim_host.xen.domain_info(torpor_guest).running


class CapabilitySuite(ConformanceBase):
    """What each declared capability promises, checked on the guest type."""

    @requires(Capability.EVENT_CHANNEL)
    def test_suspend_through_event_channel(
        self, torpor_sim_host: Any, torpor_guest_factory: Any, torpor_client: Any
    ) -> None:
        domid = torpor_guest_factory(suspend_evtchn=True)
        res = torpor_client.suspend(domid)
        assert res.method == SuspendMethod.EVENT_CHANNEL
        assert Phase.ACK not in [t.phase for t in res.timings], "no ack on this path"
        assert torpor_sim_host.xen.domain_info(domid).suspended
        torpor_client.resume(domid)
        assert torpor_sim_host.xen.domain_info(domid).running

    @requires(Capability.DEVICE_MODEL)
    def test_device_model_follows_the_guest(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        res = torpor_client.suspend(torpor_guest)
        expected = "suspended" if res.state == "S3" else "paused"
        timeout = self.device_model_timeout
        status = _qmp_status(torpor_sim_host, torpor_guest, timeout)
        assert status == expected, f"device model {status} while the guest is {res.state}"
        torpor_client.resume(torpor_guest)
        status = _qmp_status(torpor_sim_host, torpor_guest, timeout)
        assert status == "running", f"device model {status} after the guest resumed"

    @requires(Capability.ACPI_S3)
    def test_sleeps_in_s3_and_wakes(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        from torpor.model import HVM_PARAM_ACPI_S_STATE

        res = torpor_client.suspend(torpor_guest)
        assert (res.method, res.state) == (SuspendMethod.ACPI_S3, "S3")
        xen = torpor_sim_host.xen
        assert xen.get_hvm_param(torpor_guest, HVM_PARAM_ACPI_S_STATE) == 3
        info = xen.domain_info(torpor_guest)
        assert not info.shutdown and not info.paused, "S3 is neither shut down nor paused"
        res = torpor_client.resume(torpor_guest)
        assert dict(res.details).get("woke_from_s3") is True
        assert xen.get_hvm_param(torpor_guest, HVM_PARAM_ACPI_S_STATE) == 0

    @requires(Capability.HARD_SUSPEND)
    def test_hard_suspend_without_cooperation(
        self, torpor_sim_host: Any, torpor_guest_factory: Any, torpor_client: Any
    ) -> None:
        domid = torpor_guest_factory(agent=False)
        res = torpor_client.suspend(domid)
        assert (res.method, res.state) == (SuspendMethod.HARD_SHUTDOWN, "suspended")
        torpor_client.resume(domid)
        assert torpor_sim_host.xen.domain_info(domid).running


def _qmp_status(host: Any, domid: int, timeout: float) -> str:
    from torpor.qmp import QmpClient

    async def status() -> str:
        client = QmpClient(domid=domid, name="conformance")
        await client.connect(host.qmp_socket(domid), timeout=timeout)
        try:
            return await client.query_status(timeout=timeout)
        finally:
            await client.close()

    return asyncio.run(status())


class CheckpointSuite(ConformanceBase):
    """Checkpoints: suspend, the caller's callback, cooperative resume."""

    @requires(Capability.COOPERATIVE_RESUME)
    def test_checkpoint_repeatedly(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        before = self.report(torpor_sim_host, torpor_guest)["counters"]
        seen: list[str] = []
        for _ in range(3):
            res = torpor_client.checkpoint(
                torpor_guest,
                lambda r: seen.append(self.report(torpor_sim_host, torpor_guest)["state"]),
            )
            assert res.outcome == "checkpointed"
        assert set(seen) <= {"suspended", "S3"} and len(seen) == 3
        after = self.report(torpor_sim_host, torpor_guest)["counters"]
        assert after["boots"] == before["boots"]

    @requires(Capability.COOPERATIVE_RESUME)
    def test_checkpoint_resumes_even_if_callback_fails(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        def boom(_r: Any) -> None:
            raise RuntimeError("callback failed on purpose")

        with pytest.raises(errors.OperationError) as e:
            torpor_client.checkpoint(torpor_guest, boom)
        assert e.value.phase == Phase.CALLBACK and e.value.state == "running"
        assert torpor_sim_host.xen.domain_info(torpor_guest).running


class MisbehaviourSuite(ConformanceBase):
    """Every misbehaviour: the specific error, in its deadline, the guest as documented."""

    def _misbehave(self, factory: Any, host: Any, client_for: Any, name: str) -> None:
        expected = expected_failure(name.partition("=")[0], self.suspend_method)
        domid = factory(name)
        client = client_for(self.timeouts())
        if expected.error is None:
            assert client.suspend(domid).state == expected.state
            client.resume(domid)
            return
        with pytest.raises(expected.error) as e:
            client.suspend(domid)
        err = e.value
        assert type(err) is expected.error or expected.error is errors.OperationError
        assert err.domid == domid
        assert err.state == expected.state, f"{name}: left {err.state}, expected {expected.state}"
        if expected.phase is not None:
            assert err.phase == expected.phase
        if expected.state == "running":
            assert host.xen.domain_info(domid).running
            xs = host.toolstack_host().xenstore
            try:  # no request is left behind
                assert xs.read_or(f"/local/domain/{domid}/control/shutdown", "") == ""
            finally:
                xs.close()

    def test_never_ack(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "never_ack")

    def test_ack_then_hang(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(
            torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "ack_then_hang"
        )

    def test_slow_ack_past_deadline(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "slow_ack=5")

    def test_slow_ack_within_deadline(
        self, torpor_misbehaving_guest: Any, torpor_client_with: Any
    ) -> None:
        domid = torpor_misbehaving_guest("slow_ack=0.1")
        client = torpor_client_with(self.bounded_timeouts())
        assert client.suspend(domid).state in ("suspended", "S3")
        client.resume(domid)

    def test_unknown_command(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(
            torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "unknown_command"
        )

    def test_crash_during_suspend(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(
            torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "crash_during_suspend"
        )

    def test_vanish(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "vanish")

    def test_lose_xenstore(
        self, torpor_misbehaving_guest: Any, torpor_sim_host: Any, torpor_client_with: Any
    ) -> None:
        self._misbehave(
            torpor_misbehaving_guest, torpor_sim_host, torpor_client_with, "lose_xenstore"
        )

    @requires(Capability.XENSTORE_HANDSHAKE)
    def test_paused_guest_times_out_and_stays_paused(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client_with: Any
    ) -> None:
        torpor_sim_host.xen.pause(torpor_guest)
        client = torpor_client_with(self.timeouts())
        with pytest.raises(errors.AckTimeout) as e:
            client.suspend(torpor_guest)
        assert e.value.state == "paused"
        torpor_sim_host.xen.unpause(torpor_guest)
        assert torpor_sim_host.xen.domain_info(torpor_guest).running


class RefusalSuite(ConformanceBase):
    """Refusals touch nothing, and stay the same when repeated."""

    def test_double_suspend_refused(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        first = torpor_client.suspend(torpor_guest)
        if first.state == "S3":
            # libxl's rule: a guest already asleep is suspended the hard way.
            deeper = torpor_client.suspend(torpor_guest)
            assert deeper.method == SuspendMethod.HARD_SHUTDOWN
            assert deeper.state == "suspended"
        for _ in range(2):
            with pytest.raises(errors.AlreadySuspended) as e:
                torpor_client.suspend(torpor_guest)
            assert e.value.phase == Phase.VALIDATE and e.value.state == "suspended"
        assert torpor_sim_host.xen.domain_info(torpor_guest).suspended
        res = torpor_client.resume(torpor_guest)
        assert res.state == "running"
        assert self.report(torpor_sim_host, torpor_guest)["state"] == "running"

    def test_resume_of_running_refused(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client: Any
    ) -> None:
        calls = dict(torpor_sim_host.xen.calls)
        for _ in range(2):
            with pytest.raises(errors.NotSuspended) as e:
                torpor_client.resume(torpor_guest)
            assert e.value.state == "running" and e.value.phase == Phase.VALIDATE
        assert torpor_sim_host.xen.calls.get("resume") == calls.get("resume")

    def test_concurrent_operation_is_busy(
        self, torpor_sim_host: Any, torpor_misbehaving_guest: Any, torpor_client: Any
    ) -> None:
        domid = torpor_misbehaving_guest("slow_ack=0.3")
        errors_seen: list[BaseException] = []
        started = threading.Event()

        def first() -> None:
            started.set()
            try:
                torpor_client.suspend(domid)
            except errors.TorporError as e:  # pragma: no cover - reported below
                errors_seen.append(e)

        th = threading.Thread(target=first)
        th.start()
        started.wait()
        busy = False
        while th.is_alive() and not busy:
            try:
                torpor_client.suspend(domid)
            except errors.DomainBusy:
                busy = True
            except errors.InvalidState:
                break
        th.join()
        assert busy and not errors_seen
        torpor_client.resume(domid)


class HookSuite(ConformanceBase):
    """The plugin's hooks run in protocol order; notifications come exactly once."""

    def test_hook_order_and_exactly_once_notifications(
        self, torpor_guest: Any, torpor_client_with: Any
    ) -> None:
        events: list[str] = []

        class Recorder:
            @hookimpl
            def torpor_before_suspend(self, ctx: Any) -> None:
                events.append("before_suspend")

            @hookimpl
            def torpor_after_suspend(self, ctx: Any, result: Any) -> None:
                events.append("after_suspend")

            @hookimpl
            def torpor_before_resume(self, ctx: Any) -> None:
                events.append("before_resume")

            @hookimpl
            def torpor_after_resume(self, ctx: Any, result: Any) -> None:
                events.append("after_resume")

            @hookimpl
            def torpor_phase_started(self, ctx: Any, phase: Any) -> None:
                events.append(f"+{phase}")

            @hookimpl
            def torpor_phase_finished(
                self, ctx: Any, phase: Any, seconds: float, error: Any
            ) -> None:
                events.append(f"-{phase}")

        client = torpor_client_with(None, extra_plugins=[Recorder()])
        client.suspend(torpor_guest)
        client.resume(torpor_guest)
        assert events.count("before_suspend") == events.count("after_suspend") == 1
        assert events.count("before_resume") == events.count("after_resume") == 1
        assert events.index("after_suspend") < events.index("before_resume")
        starts = [e[1:] for e in events if e.startswith("+")]
        ends = [e[1:] for e in events if e.startswith("-")]
        assert starts == ends, "every phase ends exactly once, in order"
        suspend_phases = starts[: starts.index("validate", 1)]
        assert suspend_phases[0] == "validate" and "request" in suspend_phases
        resume_phases = starts[starts.index("validate", 1) :]
        assert resume_phases[-1] == "verify"


class LeakSuite(ConformanceBase):
    """Nothing is left behind: watches, connections, threads, file descriptors."""

    def test_no_leaked_watches_threads_or_fds(
        self, torpor_sim_host: Any, torpor_guest: Any, torpor_client_with: Any
    ) -> None:
        xenstored = torpor_sim_host.xenstored

        def settled(conns: int) -> str:
            # The simulated xenstored lives in this process: wait until it has
            # seen closed clients hang up, so their server ends are not counted.
            try:
                torpor_sim_host.run(
                    xenstored.wait_until(
                        lambda: xenstored.connection_count() <= conns, timeout=self.wait_timeout
                    )
                )
            except TimeoutError:
                n = xenstored.connection_count() - conns
                return f"plugin left {n} xenstore connection{'s' if n > 1 else ''} open"
            return ""

        warm = torpor_client_with(None)
        warm.suspend(torpor_guest)  # let the guest settle (frontends, first watches)
        warm.resume(torpor_guest)
        conns = xenstored.connection_count() - 1
        warm.close()
        assert not (left := settled(conns)), left
        base = _Resources.now(xenstored)
        for _ in range(3):
            client = torpor_client_with(None)
            xs = client.host.xenstore
            for _ in range(2):
                client.suspend(torpor_guest)
                client.resume(torpor_guest)
            # Only the orchestrator's standing @releaseDomain watch remains.
            extra = [
                f"{w.path} (token {w.token!r})"
                for w in _Resources.now(xenstored).watches
                if w not in base.watches and w.path != "@releaseDomain"
            ]
            assert xs.watch_count() == 1, (
                f"{xs.watch_count() - 1} watch(es) left on torpor's xenstore connection after "
                "the operations ended, besides its @releaseDomain: " + "; ".join(extra)
            )
            client.close()
            assert xs.watch_count() == 0
            assert not (left := settled(conns)), left
        after = _Resources.now(xenstored)
        # Fewer is fine (a connection of the warm-up closing late); more is a leak.
        assert len(after.threads) <= len(base.threads) and len(after.fds) <= len(base.fds), (
            "after three clients' suspend/resume cycles, each client closed: "
            + after.left_since(base)
        )


@attrs.frozen
class _Resources:
    """What this process holds that a plugin could leak, at one moment."""

    watches: tuple[Any, ...]  # torpor_sim.xenstored.WatchRecord
    threads: dict[int, str]  # ident -> name
    fds: dict[int, str]  # fd -> what it is

    @classmethod
    def now(cls, xenstored: Any) -> _Resources:
        fds = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:  # closed meanwhile (or listdir's own descriptor)
                continue
        threads = {t.ident or 0: t.name for t in threading.enumerate()}
        return cls(tuple(xenstored.watches()), threads, fds)

    def left_since(self, base: _Resources) -> str:
        """The threads and file descriptors that are new since ``base``, by name."""
        threads = [name for ident, name in self.threads.items() if ident not in base.threads]
        fds = [f"{fd} -> {what}" for fd, what in self.fds.items() if base.fds.get(fd) != what]
        parts = [
            f"threads {len(base.threads)} -> {len(self.threads)}"
            + (f" (new: {', '.join(map(repr, threads))})" if threads else ""),
            f"file descriptors {len(base.fds)} -> {len(self.fds)}"
            + (f" (new: {', '.join(fds)})" if fds else ""),
        ]
        return "; ".join(parts)


class DeclarationSuite(ConformanceBase):
    """What the plugin says about itself: which domains are its, what they can do,
    and how torpor finds it."""

    def test_declines_guests_of_other_kinds(self, torpor_sim_host: Any) -> None:
        from torpor.host import sim_module

        GUEST_KINDS = sim_module("host").GUEST_KINDS

        also = set(self.also_claims)
        if unknown := also - set(GUEST_KINDS):
            raise pytest.UsageError(
                f"also_claims names {sorted(unknown)}: the simulated host builds "
                + ", ".join(GUEST_KINDS)
            )
        others = [k for k in GUEST_KINDS if k != self.guest_kind and k not in also]
        if not others:
            pytest.skip("the plugin claims every guest kind the simulated host builds")
        claimed = []
        for kind in others:
            domid = torpor_sim_host.create_guest(kind)
            _, claims = _claims(self.plugins, torpor_sim_host, domid)
            claimed += [
                f"{who} claims domain {domid}, a {kind} guest, as {gt.name!r}" for who, gt in claims
            ]
        assert not claimed, (
            "torpor_classify_domain must return None for a domain that is not the plugin's "
            "(the first plugin to claim a domain owns it; list kinds the plugin claims by "
            "design in also_claims): " + "; ".join(claimed)
        )

    def test_declared_capabilities_match_the_guest_type(self) -> None:
        gt = self.found_guest_type()
        if self.capabilities is None:
            pytest.skip(f"capabilities not declared: those of GuestType {gt.name!r} are used")
        declared = frozenset(self.capabilities)
        actual = capabilities_of(gt)
        problems = []
        for cap in Capability:
            field, _ = _GUEST_TYPE_FIELD[cap]
            if cap in declared and cap not in actual:
                problems.append(
                    f"capabilities declares {cap.value}, but GuestType {gt.name!r} has "
                    f"{field}={getattr(gt, field)!r}"
                )
            elif cap in actual and cap not in declared:
                problems.append(
                    f"capabilities leaves out {cap.value}, which GuestType {gt.name!r} has "
                    f"({field}={getattr(gt, field)!r}): its tests run all the same"
                )
        assert not problems, "; ".join(problems)

    def test_found_through_its_entry_point(self) -> None:
        if self.entry_point is False:
            pytest.skip("not checked: the test class sets entry_point = False")
        import importlib.metadata

        from torpor.plugins import ENTRY_POINT_GROUP, get_plugin_manager, plugin_distributions

        if not self.plugins:
            raise pytest.UsageError(f"{type(self).__name__} sets no plugins")
        owners = importlib.metadata.packages_distributions()
        pm = get_plugin_manager(autoload=True)
        loaded = {
            id(p): (pm.get_name(p), d)
            for p in pm.get_plugins()
            if (d := plugin_distributions(pm).get(id(p))) is not None
        }
        checked, not_installed = 0, []
        for plugin in self.plugins:
            module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
            dists = owners.get(module.partition(".")[0])
            if not dists:
                not_installed.append(module)
                continue
            checked += 1
            if id(plugin) not in loaded:
                eps = [
                    f"{ep.name} = {ep.value}"
                    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
                    if ep.dist is not None and ep.dist.name in dists
                ]
                pytest.fail(
                    f"{_label(plugin)} is installed (distribution {', '.join(sorted(set(dists)))}) "
                    f"but torpor does not load it through the {ENTRY_POINT_GROUP!r} entry-point "
                    f"group: its entry points there are {eps or 'none'}; declare "
                    f'[project.entry-points.{ENTRY_POINT_GROUP}] NAME = "{module}" and reinstall'
                )
            name, _dist = loaded[id(plugin)]
            if isinstance(self.entry_point, str):
                assert name == self.entry_point, (
                    f"{_label(plugin)} is loaded as entry point {name!r}, "
                    f"expected {self.entry_point!r}"
                )
        if not checked:
            pytest.skip(
                f"{', '.join(not_installed)} is not installed as a distribution, so it has no "
                "entry point to find (install it, or set entry_point = False)"
            )


class ConformanceSuite(
    DeclarationSuite,
    SuspendResumeSuite,
    CapabilitySuite,
    CheckpointSuite,
    MisbehaviourSuite,
    RefusalSuite,
    HookSuite,
    LeakSuite,
):
    """Every conformance test.  Subclass it as ``Test<YourGuestType>Conformance``."""

"""torpor's pytest plugin (entry point ``pytest11``): fixtures for plugin tests.

Light by design: no autouse fixture, no hooks, nothing of torpor's imported
but its package and hook markers until a fixture is used (the suite, the
simulator and the orchestrator load then).  Fixtures:

``torpor_sim_host``
    a fresh simulated Xen host (:class:`torpor_sim.host.SimHost`), stopped
    afterwards.  The test class's ``use_qemu`` (None: when installed) picks
    HVM device models.
``torpor_plugin_manager``
    exactly the plugins under test: ``torpor.protocol`` plus the test class's
    ``plugins`` (no entry points).
``torpor_guest``
    the domid of a well-behaved guest of the class's ``guest_kind``.
``torpor_guest_factory``
    a factory: ``torpor_guest_factory("never_ack", suspend_evtchn=True)`` -> domid
    (a misbehaviour, and :class:`torpor_sim.guest.Behaviour` options).
``torpor_misbehaving_guest``
    a factory: ``torpor_misbehaving_guest("never_ack")`` -> domid.
``torpor_client``
    a :class:`torpor.Torpor` on the host with that plugin manager.
``torpor_client_with``
    a factory: ``torpor_client_with(timeouts, extra_plugins=[...])`` -> Torpor.
    Without ``timeouts``: the test class's ``bounded_timeouts()`` when it has
    one (every conformance suite class does: short deadlines on every wait),
    else torpor's defaults.  A test class's ``harness_plugins()``, if it has
    one, are added to every client's plugins (the suite's QMP guard).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = [
    "torpor_client",
    "torpor_client_with",
    "torpor_guest",
    "torpor_guest_factory",
    "torpor_misbehaving_guest",
    "torpor_plugin_manager",
    "torpor_sim_host",
]


@pytest.fixture
def torpor_sim_host(request: pytest.FixtureRequest) -> Iterator[Any]:
    from torpor.host import sim_module

    SimHost = sim_module("host").SimHost

    # AF_UNIX paths are limited to 108 bytes: keep the directory short.
    d = tempfile.mkdtemp(prefix="tps", dir="/tmp")
    host = SimHost(d, qemu=getattr(request.cls, "use_qemu", None), name="conformance")
    host.start()
    yield host
    host.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def torpor_plugin_manager(request: pytest.FixtureRequest) -> Any:
    from torpor.plugins import get_plugin_manager

    plugins = list(getattr(request.cls, "plugins", ()) or ())
    return get_plugin_manager(plugins=plugins, autoload=False)


def _kind(request: pytest.FixtureRequest) -> str:
    kind = getattr(request.cls, "guest_kind", "")
    if not kind:
        raise pytest.UsageError(f"{request.cls!r} must set guest_kind")
    return str(kind)


@pytest.fixture
def torpor_guest(request: pytest.FixtureRequest, torpor_sim_host: Any) -> int:
    domid: int = torpor_sim_host.create_guest(_kind(request))
    return domid


@pytest.fixture
def torpor_guest_factory(
    request: pytest.FixtureRequest, torpor_sim_host: Any
) -> Callable[..., int]:
    from torpor.host import sim_module

    Behaviour = sim_module("guest").Behaviour

    kind = _kind(request)

    def make(misbehaviour: str | None = None, **options: Any) -> int:
        behaviour = (
            Behaviour.parse(misbehaviour, **options) if misbehaviour else Behaviour(**options)
        )
        domid: int = torpor_sim_host.create_guest(kind, behaviour=behaviour)
        return domid

    return make


@pytest.fixture
def torpor_misbehaving_guest(torpor_guest_factory: Callable[..., int]) -> Callable[[str], int]:
    return torpor_guest_factory


@pytest.fixture
def torpor_client_with(
    torpor_sim_host: Any, torpor_plugin_manager: Any, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Any]]:
    from torpor.facade import Torpor
    from torpor.plugins import get_plugin_manager

    made: list[Any] = []

    def make(timeouts: Any = None, *, extra_plugins: list[object] | None = None) -> Any:
        if timeouts is None:
            bounded = getattr(request.instance, "bounded_timeouts", None)
            timeouts = bounded() if callable(bounded) else None
        harness = getattr(request.instance, "harness_plugins", None)
        extra = [*(harness() if callable(harness) else ()), *(extra_plugins or ())]
        pm = torpor_plugin_manager
        if extra:
            plugins = [*(getattr(request.cls, "plugins", ()) or ()), *extra]
            pm = get_plugin_manager(plugins=plugins, autoload=False)
        client = Torpor(
            torpor_sim_host.toolstack_host(), plugin_manager=pm, timeouts=timeouts, own_host=True
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def torpor_client(torpor_client_with: Callable[..., Any]) -> Any:
    return torpor_client_with()

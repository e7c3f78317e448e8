"""torpor: suspend and resume Xen guest domains (PV, PVHVM, HVM) from dom0.

The library API::

    from torpor import Host, Torpor

    with Torpor(Host.open("sim:/tmp/h1"), own_host=True) as t:
        t.suspend(3)
        t.resume(3)               # cooperative (fast) resume

Plugin authors import :data:`hookimpl`; the hook specifications are in
:mod:`torpor.hookspecs`.  Names are imported lazily so that ``import torpor``
stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torpor.hookspecs import hookimpl

if TYPE_CHECKING:
    from torpor.host import Host
    from torpor.orchestrator import Orchestrator, Torpor

__all__ = ["Host", "Orchestrator", "Torpor", "__version__", "hookimpl"]

__version__ = "0.1.0"

_LAZY = {
    "Host": "torpor.host",
    "Orchestrator": "torpor.orchestrator",
    "Torpor": "torpor.orchestrator",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torpor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

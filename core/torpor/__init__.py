"""torpor: suspend and resume Xen guest domains (PV, PVHVM, HVM) from dom0.

Everything a toolstack embedding torpor or a guest-type plugin needs is
importable from here (``__all__``); each name is documented where it is
defined::

    from torpor import Host, Torpor

    with Torpor(Host.open("sim:/tmp/h1"), own_host=True) as t:
        t.suspend(3)
        t.resume(3)               # cooperative (fast) resume

- the faces: :class:`Torpor` (synchronous), :class:`Orchestrator` (asyncio),
  :class:`Host` (the machine acted on);
- plugins: :data:`hookimpl`, :class:`OperationContext`, :class:`GuestType`,
  :class:`Verdict`, :func:`get_plugin_manager` (the hook specifications are
  in :mod:`torpor.hookspecs`; the device-model steps in
  :mod:`torpor.devicemodel`);
- values: :class:`Result`, :class:`PhaseTiming`, :class:`Timeouts`,
  :class:`PrecopyPolicy`, :class:`PrecopyStats`, :class:`PrecopyRound`,
  :class:`Phase`, :class:`SuspendMethod`, :class:`ShutdownReason`,
  :class:`DomainInfo`;
- the error tree rooted at :class:`TorporError` (:mod:`torpor.errors`).

Names load lazily, so ``import torpor`` (the CLI's first step) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torpor.context import OperationContext
    from torpor.errors import (
        AckTimeout,
        AlreadySuspended,
        BackendUnavailable,
        DeviceModelError,
        DomainBusy,
        DomainVanished,
        HypervisorError,
        ImageError,
        Interrupted,
        InvalidState,
        LiveUnavailable,
        MigrationFailed,
        NameInUse,
        NoSuchDomain,
        NotSuspended,
        OperationError,
        QmpCommandError,
        ResumeFailed,
        SuspendTimeout,
        Timeout,
        TorporError,
        TransactionConflict,
        UnexpectedShutdown,
        UnsafeResume,
        UnsupportedGuest,
        UsageError,
        Vetoed,
        WrongEventLoop,
        XenstoreConnectionLost,
        XenstoreError,
    )
    from torpor.facade import Torpor
    from torpor.hookspecs import hookimpl
    from torpor.host import Host
    from torpor.model import (
        DomainInfo,
        GuestType,
        Phase,
        PhaseTiming,
        PrecopyPolicy,
        PrecopyRound,
        PrecopyStats,
        Result,
        ShutdownReason,
        SuspendMethod,
        Timeouts,
        Verdict,
    )
    from torpor.orchestrator import Orchestrator
    from torpor.plugins import get_plugin_manager

__version__ = "0.1.0"

_ERRORS = (
    "AckTimeout",
    "AlreadySuspended",
    "BackendUnavailable",
    "DeviceModelError",
    "DomainBusy",
    "DomainVanished",
    "HypervisorError",
    "ImageError",
    "Interrupted",
    "InvalidState",
    "LiveUnavailable",
    "MigrationFailed",
    "NameInUse",
    "NoSuchDomain",
    "NotSuspended",
    "OperationError",
    "QmpCommandError",
    "ResumeFailed",
    "SuspendTimeout",
    "Timeout",
    "TorporError",
    "TransactionConflict",
    "UnexpectedShutdown",
    "UnsafeResume",
    "UnsupportedGuest",
    "UsageError",
    "Vetoed",
    "WrongEventLoop",
    "XenstoreConnectionLost",
    "XenstoreError",
)
_MODEL = (
    "DomainInfo",
    "GuestType",
    "Phase",
    "PhaseTiming",
    "PrecopyPolicy",
    "PrecopyRound",
    "PrecopyStats",
    "Result",
    "ShutdownReason",
    "SuspendMethod",
    "Timeouts",
    "Verdict",
)
_LAZY = {
    "Host": "torpor.host",
    "Orchestrator": "torpor.orchestrator",
    "Torpor": "torpor.facade",
    "OperationContext": "torpor.context",
    "get_plugin_manager": "torpor.plugins",
    "hookimpl": "torpor.hookspecs",
    **dict.fromkeys(_ERRORS, "torpor.errors"),
    **dict.fromkeys(_MODEL, "torpor.model"),
}

__all__ = [
    "AckTimeout",
    "AlreadySuspended",
    "BackendUnavailable",
    "DeviceModelError",
    "DomainBusy",
    "DomainInfo",
    "DomainVanished",
    "GuestType",
    "Host",
    "HypervisorError",
    "ImageError",
    "Interrupted",
    "InvalidState",
    "LiveUnavailable",
    "MigrationFailed",
    "NameInUse",
    "NoSuchDomain",
    "NotSuspended",
    "OperationContext",
    "OperationError",
    "Orchestrator",
    "Phase",
    "PhaseTiming",
    "PrecopyPolicy",
    "PrecopyRound",
    "PrecopyStats",
    "QmpCommandError",
    "Result",
    "ResumeFailed",
    "ShutdownReason",
    "SuspendMethod",
    "SuspendTimeout",
    "Timeout",
    "Timeouts",
    "Torpor",
    "TorporError",
    "TransactionConflict",
    "UnexpectedShutdown",
    "UnsafeResume",
    "UnsupportedGuest",
    "UsageError",
    "Verdict",
    "Vetoed",
    "WrongEventLoop",
    "XenstoreConnectionLost",
    "XenstoreError",
    "__version__",
    "get_plugin_manager",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torpor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

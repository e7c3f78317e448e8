"""torpor's errors: one tree, rooted at :class:`TorporError`.

Every error torpor raises on purpose is a :class:`TorporError`.  Each carries
the domain it concerns (``domid``), the protocol phase it happened in
(``phase``, a :class:`torpor.model.Phase` value) and the underlying cause
(``cause``, also chained as ``__cause__``), so that an embedding toolstack can
report *which guest*, *where* and *why* without parsing messages::

    TorporError
     ├── UsageError                 a caller's argument is invalid (also a ValueError)
     │    └── WrongEventLoop        an Orchestrator used from a loop it is not bound to
     ├── BackendUnavailable         a backend cannot be had here (no Xen, no lib, no sim)
     ├── Timeout                    a deadline passed waiting for an event (a TimeoutError)
     ├── XenstoreError              xenstored answered XS_ERROR (errno, errname, path)
     │    └── TransactionConflict   EAGAIN on every commit, up to the retry bound
     ├── XenstoreConnectionLost     the xenstore connection died; every call fails fast
     ├── HypervisorError            a hypervisor operation failed (errno, op)
     ├── DeviceModelError           the QEMU device model or guest agent failed or vanished
     │    └── QmpCommandError       QEMU or qemu-ga answered a command with an error
     │                              (``error_class``: CommandNotFound, GenericError...; ``desc``)
     ├── ImageError                 a save image is truncated, corrupt or foreign
     └── OperationError             an orchestrated suspend / resume / save failed
          ├── NoSuchDomain          the domid does not exist (ESRCH)
          ├── UnsupportedGuest      no guest-type plugin claims the domain
          ├── DomainBusy            another torpor operation holds the domain
          ├── InvalidState          the domain is not in a state the operation needs
          │    ├── AlreadySuspended
          │    └── NotSuspended
          ├── UnsafeResume          in-place non-cooperative resume refused
          ├── Vetoed                a plugin refused the suspend before the guest was asked
          │                         (``plugin``, ``reason``; torpor_veto_suspend)
          ├── AckTimeout            the guest never acked; request cancelled, guest running
          ├── SuspendTimeout        acked but never shut down (it probably failed to freeze)
          ├── UnexpectedShutdown    shut down with a reason other than suspend
          ├── DomainVanished        the domain was destroyed during the operation
          ├── ResumeFailed          the domain could not be resumed
          ├── Interrupted           a signal or Torpor.interrupt() stopped it; rolled back
          └── MigrationFailed       save / restore / migrate failed (see ``outcome``)
               └── NameInUse        restore refused: a domain of that name exists (``holder``)

An :class:`OperationError` keeps what made it fail as ``cause``, typed: a
guest agent that refuses ``guest-suspend-ram`` is an ``OperationError`` whose
``cause`` is a :class:`QmpCommandError`, so a caller can tell an agent built
without the command from one that failed::

    except OperationError as err:
        if isinstance(err.cause, QmpCommandError) and err.cause.error_class == "CommandNotFound":
            ...  # this guest cannot sleep on request

Errors that concern no single domain (a lost xenstore connection, a missing
backend) leave ``domid`` as ``None``.  ``str(err)`` always names the domain and
the phase when they are known.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

__all__ = [
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
    "errno_name",
]


def errno_name(code: int) -> str:
    """The symbolic name of an errno value (``ENOENT``), or ``E<n>`` if unknown."""
    return _errno.errorcode.get(code, f"E{code}")


class TorporError(Exception):
    """Root of every error torpor raises on purpose.

    :param message: what went wrong, in words a dom0 operator understands.
    :param domid: the domain concerned, if any.
    :param phase: the protocol phase (a :class:`torpor.model.Phase` value).
    :param cause: the underlying exception, if any; also set as ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        domid: int | None = None,
        phase: str | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.domid = domid
        self.phase = phase
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause

    def __str__(self) -> str:
        where = []
        if self.domid is not None:
            where.append(f"domain {self.domid}")
        if self.phase is not None:
            where.append(f"phase {self.phase}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return prefix + self.message

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: error class, message, domid, phase, cause.

        ``cause`` is the ``repr()`` of the underlying exception; when that is a
        torpor error too, ``caused_by`` is its own ``to_dict()`` (with its
        typed fields: a :class:`QmpCommandError`'s ``error_class``...), else
        ``None``.
        """
        cause = self.cause
        return {
            "error": type(self).__name__,
            "message": self.message,
            "domid": self.domid,
            "phase": None if self.phase is None else str(self.phase),
            "cause": None if cause is None else repr(cause),
            "caused_by": cause.to_dict() if isinstance(cause, TorporError) else None,
        }


class UsageError(TorporError, ValueError):
    """A caller's argument is invalid: a malformed domid, path, socket or option.

    Also a :class:`ValueError`, so generic argument handling catches it.
    """


class WrongEventLoop(UsageError):
    """An :class:`~torpor.orchestrator.Orchestrator` was used from an event loop
    other than the one it is bound to (the first that used it).

    Raised at once, before anything is sent to a guest: the orchestrator's
    watches and waits live on its own loop and would never fire on another.
    """


class BackendUnavailable(TorporError):
    """A backend cannot be had on this machine: no Xen, a missing library, no sim host."""


class Timeout(TorporError, TimeoutError):
    """A deadline passed while waiting for an event.

    Also a :class:`TimeoutError` (as ``asyncio.timeout`` raises), so generic
    deadline handling catches it.

    :param deadline: the timeout that passed, in seconds.
    """

    def __init__(self, message: str, *, deadline: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.deadline = deadline


class XenstoreError(TorporError):
    """xenstored refused a request (an ``XS_ERROR`` reply).

    :param errno: the errno value (``errno.ENOENT``...).
    :param path: the xenstore path concerned, if any.
    :param op: the request type's name (``READ``, ``WRITE``...).
    """

    def __init__(
        self,
        message: str,
        *,
        errno: int,
        path: str | None = None,
        op: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.errno = errno
        self.errname = errno_name(errno)
        self.path = path
        self.op = op

    @classmethod
    def from_errno(
        cls, code: int, *, op: str | None = None, path: str | None = None, **kw: Any
    ) -> XenstoreError:
        what = f"{op} {path}" if op and path else (op or path or "request")
        text = f"xenstore {what}: {errno_name(code)} ({os.strerror(code)})"
        return cls(text, errno=code, path=path, op=op, **kw)


class TransactionConflict(XenstoreError):
    """Every commit of a transaction met EAGAIN, up to the retry bound.

    :param attempts: how many times the transaction was tried.
    """

    def __init__(self, message: str, *, attempts: int, **kw: Any) -> None:
        kw.setdefault("errno", _errno.EAGAIN)
        super().__init__(message, **kw)
        self.attempts = attempts


class XenstoreConnectionLost(TorporError):
    """The xenstore connection died (server gone, garbage, unknown req_id).

    Every pending and every later call on that connection raises this at once.
    """


class HypervisorError(TorporError):
    """A hypervisor operation failed.

    :param errno: the errno the hypervisor (or libxc) returned.
    :param op: the operation's name (``resume``, ``get_hvm_param``...).
    """

    def __init__(self, message: str, *, errno: int, op: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.errno = errno
        self.errname = errno_name(errno)
        self.op = op

    @classmethod
    def from_errno(cls, code: int, *, op: str, domid: int | None = None, **kw: Any) -> Any:
        on = f" on domain {domid}" if domid is not None else ""
        text = f"hypervisor {op}{on}: {errno_name(code)} ({os.strerror(code)})"
        return cls(text, errno=code, op=op, domid=domid, **kw)


class DeviceModelError(TorporError):
    """The QEMU device model (or a guest agent) failed, vanished, or cannot be reached."""


class QmpCommandError(DeviceModelError):
    """QEMU (QMP) or the QEMU guest agent (qemu-ga) answered a command with an error.

    The reply ``{"error": {"class": ..., "desc": ...}}``, kept typed: a guest
    agent built without ``guest-suspend-ram`` answers ``CommandNotFound``.

    :param command: the command (``guest-suspend-ram``, ``system_wakeup``...).
    :param error_class: QMP's error class (``GenericError``, ``CommandNotFound``...).
    :param desc: the description QEMU or the agent gave.
    """

    def __init__(
        self, message: str, *, command: str, error_class: str, desc: str, **kw: Any
    ) -> None:
        super().__init__(message, **kw)
        self.command = command
        self.error_class = error_class
        self.desc = desc

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(command=self.command, error_class=self.error_class, desc=self.desc)
        return out


class ImageError(TorporError):
    """A save image is truncated, corrupt, foreign or of an unknown version."""


class OperationError(TorporError):
    """An orchestrated operation (suspend, resume, checkpoint, save...) failed.

    :param state: what the domain was left in, in words (``running``,
        ``suspended``, ``crashed``...), so the caller never has to guess.
    """

    def __init__(self, message: str, *, state: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.state = state

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["state"] = self.state
        return out


class NoSuchDomain(OperationError):
    """The domain does not exist (the hypervisor says ESRCH)."""


class UnsupportedGuest(OperationError):
    """No guest-type plugin claims the domain."""


class DomainBusy(OperationError):
    """Another torpor operation on this domain is in progress."""


class InvalidState(OperationError):
    """The domain is not in a state the operation can start from; nothing was touched."""


class AlreadySuspended(InvalidState):
    """Suspend refused: the domain is already suspended (or asleep in S3)."""


class NotSuspended(InvalidState):
    """Resume refused: the domain is not suspended."""


class LiveUnavailable(InvalidState):
    """A live migration was demanded (``live=True``, ``--live``) where it cannot
    be had: the hypervisor cannot track this guest's dirty pages (a PV guest
    without shadow paging), or the host cannot save it live.  ``reason`` says
    which; nothing was touched.  Without the demand the guest migrates
    non-live (suspend, then copy) and the result says why."""

    def __init__(self, message: str, *, reason: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["reason"] = self.reason
        return out


class UnsafeResume(OperationError):
    """An in-place non-cooperative resume was refused: the guest would not survive it."""


class Vetoed(OperationError):
    """A plugin refused the suspend (``torpor_veto_suspend``); the guest was not asked.

    Raised at the end of the ``validate`` phase of a suspend, a checkpoint,
    a save or a migration, before the intent record and the request: the
    guest runs on as it was (``state`` is what was observed afterwards,
    ``running``).  A plugin that raised a :class:`TorporError` instead of
    returning a reason has it as ``cause``.

    :param plugin: the name of the plugin that vetoed.
    :param reason: the reason it gave (or its error's message).
    """

    def __init__(self, message: str, *, plugin: str, reason: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.plugin = plugin
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(plugin=self.plugin, reason=self.reason)
        return out


class AckTimeout(OperationError):
    """The guest never acknowledged the suspend request.

    The request was cancelled in a transaction and the guest keeps running.
    """


class SuspendTimeout(OperationError):
    """The guest acknowledged but never shut down with reason suspend.

    A Linux guest freezes its tasks before it suspends; a task that will not
    freeze makes the suspend fail inside the guest, and the toolstack sees only
    this timeout.
    """


class UnexpectedShutdown(OperationError):
    """The domain shut down with a reason other than suspend.

    :param reason: the shutdown reason code (0 poweroff, 1 reboot, 3 crash...).
    """

    def __init__(self, message: str, *, reason: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.reason = reason


class DomainVanished(OperationError):
    """The domain was destroyed while the operation was in progress."""


class ResumeFailed(OperationError):
    """The domain could not be resumed; ``state`` says where it was left."""


class Interrupted(OperationError):
    """The operation was interrupted (SIGINT, SIGTERM, :meth:`Torpor.interrupt`,
    ``Torpor.close()`` while it ran) and rolled back as a failure would be.

    A request the guest had not taken was withdrawn in a transaction; a guest
    that had already suspended was resumed cooperatively.  ``state`` is what
    the domain was observed in afterwards; ``actions`` what the rollback did;
    ``clean`` whether the guest is back where the operation found it (if
    not, the intent record stays for ``torpor recover``).

    :param reason: what interrupted it (``SIGINT``, ``SIGTERM``, ``closed``...).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        actions: tuple[str, ...] = (),
        clean: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.reason = reason
        self.actions = actions
        self.clean = clean

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(reason=self.reason, actions=list(self.actions), clean=self.clean)
        return out


class MigrationFailed(OperationError):
    """A save, restore or migration failed; ``state`` says which guest runs."""


class NameInUse(MigrationFailed):
    """A restore was refused because a domain with the guest's name exists.

    A name is unique on a host (libxl refuses a second domain of the same name:
    ``libxl__domain_rename``, "Domain with name ... already exists"); restoring
    an image of a guest that still runs would make two copies of one guest
    writing one disk.  Refused before anything is built (``state`` ``not
    created``); ``restore(..., name=NEW)`` / ``torpor restore FILE --name NEW``
    restores the guest under another name instead.

    :param name: the name asked for.
    :param holder: the domid of the domain that holds it, or ``None`` when
        another restore under that name is under way.
    """

    def __init__(self, message: str, *, name: str, holder: int | None, **kw: Any) -> None:
        kw.setdefault("state", "not created")
        super().__init__(message, **kw)
        self.name = name
        self.holder = holder

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(name=self.name, holder=self.holder)
        return out

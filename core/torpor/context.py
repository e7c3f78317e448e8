"""The operation context handed to every hook.

One :class:`OperationContext` lives for one operation on one domain.  It
carries what a plugin needs to act and judge -- the domain's latest info, its
guest type, the chosen method, the host's backends -- and a ``data`` dict where
plugins keep their own per-operation state (namespaced by plugin name, by
convention).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from torpor.model import DomainInfo, GuestType, Phase, SuspendMethod, Timeouts

if TYPE_CHECKING:
    from torpor.host import Host
    from torpor.hypervisor import Hypervisor
    from torpor.qmp import QmpClient
    from torpor.xenstore import AsyncXenstore

__all__ = ["OperationContext"]


@attrs.define(eq=False)
class OperationContext:
    """One operation on one domain, as the hooks see it.

    :param operation: ``suspend``, ``resume``, ``save``, ``restore``, ``migrate``,
        ``recover`` (a checkpoint is a suspend then a resume).
    :param domid: the domain.
    :param host: the host's backends.
    :param timeouts: the deadlines in force.
    :param domain: the domain's info, refreshed by the orchestrator before each check.
    :param guest_type: the plugin's claim (set after classification).
    :param method: how the guest was asked to suspend.
    :param cooperative: for a resume: fast (True) or not.
    :param force: the caller insisted on an unsafe operation.
    :param in_place: a resume in the same domain (False after a restore).
    :param facts: what the orchestrator found out (``suspend_event_channel``, ``s3``...).
    :param data: plugins' per-operation state.
    """

    operation: str
    domid: int
    host: Host
    timeouts: Timeouts
    domain: DomainInfo
    guest_type: GuestType | None = None
    method: SuspendMethod | None = None
    cooperative: bool | None = None
    force: bool = False
    in_place: bool = True
    phase: Phase = Phase.VALIDATE
    facts: dict[str, Any] = attrs.Factory(dict)
    data: dict[str, Any] = attrs.Factory(dict)
    started: float = attrs.Factory(time.monotonic)
    _wake: Callable[[], None] | None = None
    _device_model: QmpClient | None = None
    _cleanups: list[Callable[[], Awaitable[None]]] = attrs.Factory(list)

    @property
    def dompath(self) -> str:
        """``/local/domain/<domid>``."""
        return f"/local/domain/{self.domid}"

    @property
    def hypervisor(self) -> Hypervisor:
        return self.host.hypervisor

    @property
    def xenstore(self) -> AsyncXenstore:
        """dom0's xenstore connection, asyncio flavour."""
        return self.host.xenstore.aio

    @property
    def guest_type_name(self) -> str:
        return self.guest_type.name if self.guest_type is not None else "unknown"

    async def device_model(self) -> QmpClient:
        """The domain's device model over QMP (connected on first use).

        Its events wake the orchestrator's waits, so a ``torpor_check_*`` hook
        is asked again when, say, QEMU reports ``SUSPEND``.
        """
        if self._device_model is None or not self._device_model.connected:
            from torpor.qmp import QmpClient

            client = QmpClient(domid=self.domid)
            await client.connect(self.host.qmp_path(self.domid), timeout=self.timeouts.device_model)
            # Whatever wait is current when an event arrives is woken by it.
            client.subscribe(lambda _event: self.wake())
            self._device_model = client
        return self._device_model

    def on_close(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Run ``await cleanup()`` when the operation ends (a plugin's open channels)."""
        self._cleanups.append(cleanup)

    def wake(self) -> None:
        """Make the orchestrator re-ask the current ``torpor_check_*`` hook now
        (for a plugin whose own event source -- an agent's reply -- fired)."""
        if self._wake is not None:
            self._wake()

    async def close(self) -> None:
        """Release what the context opened (plugins' cleanups, the QMP connection)."""
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                await cleanup()
            except Exception:  # a cleanup must not hide the operation's outcome
                logging.getLogger("torpor").exception("cleanup of domain %d failed", self.domid)
        if self._device_model is not None:
            dm, self._device_model = self._device_model, None
            await dm.close()

    def set_waker(self, wake: Callable[[], None] | None) -> None:
        """The orchestrator's hook for event sources the context opens."""
        self._wake = wake

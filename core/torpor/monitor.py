"""The orchestrator's eyes: ``@releaseDomain`` and the suspend event channels.

One xenstore watch and one event-channel reader per orchestrator serve every
operation in flight (see :class:`DomainMonitor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torpor.errors import HypervisorError, TorporError

if TYPE_CHECKING:
    from torpor.host import Host

__all__ = ["DomainMonitor", "Waker"]

log = logging.getLogger("torpor")


class DomainMonitor:
    """The orchestrator's eyes: ``@releaseDomain`` and the suspend event channels.

    One xenstore watch on ``@releaseDomain`` (xenstored fires it when a domain
    shuts down or dies) and one reader on the hypervisor's event-channel
    descriptor, shared by every operation.  Listeners are woken by domid or by
    local port; they then re-read what they care about.  A burst of events is
    coalesced into one refresh per loop iteration, like a pending VIRQ.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self._domain_listeners: dict[int, set[Callable[[], None]]] = {}
        self._port_listeners: dict[int, set[Callable[[], None]]] = {}
        self._watch: Any = None
        self._evtchn_fd: int | None = None
        self._refresh_pending = False
        self._last: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        if self._watch is None:
            self._loop = asyncio.get_running_loop()
            self._watch = await self.host.xenstore.aio.watch("@releaseDomain", self._on_release)

    async def close(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            with contextlib.suppress(TorporError):
                await self.host.xenstore.aio.unwatch(watch)
        if self._evtchn_fd is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._evtchn_fd)
            self._evtchn_fd = None

    def listen_domain(self, domid: int, wake: Callable[[], None]) -> Callable[[], None]:
        # Forget what we last saw of it: a resume changes a domain without any
        # @releaseDomain, so the next event must wake a new listener whatever
        # the flags then say (a spurious wake costs one re-read).
        self._last.pop(domid, None)
        self._domain_listeners.setdefault(domid, set()).add(wake)
        return lambda: self._domain_listeners.get(domid, set()).discard(wake)

    def listen_port(self, port: int, wake: Callable[[], None]) -> Callable[[], None]:
        if self._evtchn_fd is None:
            loop = asyncio.get_running_loop()
            self._evtchn_fd = self.host.hypervisor.evtchn_fileno()
            loop.add_reader(self._evtchn_fd, self._on_evtchn)
        self._port_listeners.setdefault(port, set()).add(wake)
        return lambda: self._port_listeners.get(port, set()).discard(wake)

    def _on_release(self, _path: str, _token: str) -> None:
        if not self._refresh_pending:
            self._refresh_pending = True
            asyncio.get_running_loop().call_soon(self._refresh)

    def _refresh(self) -> None:
        self._refresh_pending = False
        watched = [d for d, ls in self._domain_listeners.items() if ls]
        if not watched:
            return
        hv = self.host.hypervisor
        flags: dict[int, int] = {}
        try:
            if len(watched) <= 8:
                for d in watched:
                    try:
                        flags[d] = hv.domain_info(d).flags
                    except HypervisorError as e:
                        if e.errno != errno.ESRCH:
                            raise
            else:
                flags = {i.domid: i.flags for i in hv.domain_info_list()}
        except TorporError:
            flags = {}  # the hypervisor failed: wake everyone, they'll see it
            changed = set(watched)
        else:
            changed = {d for d in watched if flags.get(d, -1) != self._last.get(d)}
        self._last.update({d: flags.get(d, -1) for d in watched})
        for d in changed:
            for wake in list(self._domain_listeners.get(d, ())):
                wake()

    def _on_evtchn(self) -> None:
        hv = self.host.hypervisor
        try:
            while (port := hv.evtchn_pending()) is not None:
                with contextlib.suppress(TorporError):
                    hv.evtchn_unmask(port)
                for wake in list(self._port_listeners.get(port, ())):
                    wake()
        except TorporError as e:
            log.warning("event channel read failed: %s", e)
            for ls in self._port_listeners.values():
                for wake in list(ls):
                    wake()


class Waker:
    """An event for one waiting coroutine: set by watch / monitor callbacks in the loop.

    Cheaper than ``asyncio.wait_for(event.wait(), t)``, which makes a task per wait.
    """

    __slots__ = ("flag", "fut", "loop")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.flag = False
        self.fut: asyncio.Future[bool] | None = None

    def set(self) -> None:
        self.flag = True
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(True)

    def clear(self) -> None:
        self.flag = False

    async def wait(self, timeout: float) -> bool:
        """True once set, False when ``timeout`` passes first."""
        if self.flag:
            return True
        fut = self.fut = self.loop.create_future()
        handle = self.loop.call_later(timeout, _expire, fut)
        try:
            return bool(await fut)
        finally:
            handle.cancel()
            self.fut = None


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)

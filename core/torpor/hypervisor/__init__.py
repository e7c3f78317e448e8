"""The hypervisor interface torpor's orchestrator uses, and its backends.

:class:`Hypervisor` is a small typed Protocol covering exactly what suspend and
resume need from Xen: domain info, pause/unpause, shutdown, resume, HVM params,
destroy, and the toolstack end of a guest's suspend event channel.  Two
backends implement it:

* ``torpor.hypervisor.xenctrl`` -- libxenctrl / libxenguest / libxenevtchn
  through cffi, on a real dom0;
* ``torpor_sim`` -- the simulated host's hypervisor model (in process, or
  over ``DIR/hypervisor.sock`` with :mod:`torpor.hypervisor.remote`).

The orchestrator cannot tell them apart.  Every failure is a
:class:`torpor.errors.HypervisorError` carrying the errno Xen would return
(``ESRCH`` for a domain that does not exist, ``EINVAL`` for a fast resume of a
domain that is not suspended...).

Event channels follow libxenevtchn: ``evtchn_fileno()`` is a descriptor that
becomes readable when a bound port has an event pending; ``evtchn_pending()``
returns that port (or ``None``) and ``evtchn_unmask()`` re-arms it.  This is
how a caller waits for a suspend on the subscribed channel without polling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torpor.model import DomainInfo, ShutdownReason

if TYPE_CHECKING:
    from torpor.hypervisor.xenctrl import SuspendEvtchnLock

__all__ = ["Hypervisor"]


@runtime_checkable
class Hypervisor(Protocol):
    """What torpor needs from the hypervisor (a dom0 toolstack's view of Xen)."""

    #: Short backend name for reports: ``"xenctrl"``, ``"sim"``, ``"sim-remote"``.
    name: str

    def domain_info_list(self, first_domid: int = 0, max_domains: int = 1024) -> list[DomainInfo]:
        """Existing domains with domid >= ``first_domid``, in domid order
        (``xc_domain_getinfolist``)."""
        ...

    def domain_info(self, domid: int) -> DomainInfo:
        """One domain's info; ``HypervisorError(errno=ESRCH)`` if it does not exist."""
        ...

    def pause(self, domid: int) -> None:
        """``xc_domain_pause``: stop scheduling the domain's vCPUs."""
        ...

    def unpause(self, domid: int) -> None:
        """``xc_domain_unpause``."""
        ...

    def shutdown(self, domid: int, reason: ShutdownReason) -> None:
        """``xc_domain_shutdown``: shut the domain down from outside (the hard path)."""
        ...

    def resume(self, domid: int, *, fast: bool) -> None:
        """``xc_domain_resume``.

        ``fast=True`` (cooperative): refused with EINVAL unless the domain is shut
        down with reason suspend; the guest's suspend hypercall returns 1.
        ``fast=False``: the guest's hypercall returns 0 and it rebuilds its state.
        """
        ...

    def destroy(self, domid: int) -> None:
        """``xc_domain_destroy``."""
        ...

    def get_hvm_param(self, domid: int, param: int) -> int:
        """``xc_hvm_param_get``; EINVAL for a PV domain."""
        ...

    def set_hvm_param(self, domid: int, param: int, value: int) -> None:
        """``xc_hvm_param_set``."""
        ...

    def evtchn_bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind a local port to ``remote_port`` of ``domid``; return the local port."""
        ...

    def evtchn_notify(self, local_port: int) -> None:
        """Signal the remote end of ``local_port``."""
        ...

    def evtchn_unbind(self, local_port: int) -> None:
        """Close ``local_port``."""
        ...

    def evtchn_subscribe(self, domid: int, port: int) -> None:
        """XEN_DOMCTL_subscribe (``xc_domain_subscribe_for_suspend``).

        ``port`` is the *guest's* port (the one it published in
        ``device/suspend/event-channel``).  When ``domid`` shuts down with reason
        suspend, Xen signals that port -- and so whatever local port is bound to
        it -- *instead of* VIRQ_DOM_EXC, so ``@releaseDomain`` does not fire.
        One subscriber per domain: a later call displaces the earlier silently.
        ``port=0`` unsubscribes."""
        ...

    def evtchn_fileno(self) -> int:
        """A descriptor that is readable while any bound port has an event pending."""
        ...

    def evtchn_pending(self) -> int | None:
        """The next local port with a pending event, without blocking; ``None`` if none."""
        ...

    def evtchn_unmask(self, local_port: int) -> None:
        """Re-arm ``local_port`` after its event was consumed."""
        ...

    def virt_caps(self) -> frozenset[str]:
        """The host's virtualisation capabilities (``xc_physinfo``), named as
        ``xl info``'s ``virt_caps``: ``pv``, ``hvm``, ``hap``, ``shadow``...
        A PV guest's log-dirty (its live migration) needs ``shadow``; an HVM
        guest's needs ``hap`` or ``shadow``."""
        ...

    def suspend_evtchn_lock(self, domid: int) -> SuspendEvtchnLock:
        """libxenguest's per-domain suspend event channel lock file (not yet taken),
        so two toolstacks never subscribe the same domain."""
        ...

    def close(self) -> None:
        """Release the backend's handles."""
        ...

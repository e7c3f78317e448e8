"""The simulated Xen host: xenstored, hypervisor, dom0 backends and guests.

:class:`SimHost` runs one simulated host in an event loop on a background
thread: the simulated xenstored (dom0's socket at ``DIR/xenstored/socket``,
one socket per guest domain at ``DIR/xenstored/domain-<domid>.sock`` so real
clients can act *as* a guest), the hypervisor model (:mod:`torpor_sim.xen`,
served to other processes at ``DIR/hypervisor.sock``), dom0's netback and
blkback, and the guests.  It builds domains the way libxl does
(libxl_create.c / libxl_dom.c / libxl_device.c): the xenstore tree with
libxl's permissions, ``XS_INTRODUCE``, backend and frontend directories,
the device model for HVM guests, then unpause.

Everything a caller does goes through thread-safe methods; the orchestrator
talks to the host exactly as to a real one (a xenstore socket, a hypervisor
backend, QMP sockets).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import attrs

from torpor.errors import HypervisorError, TorporError, UsageError, XenstoreError
from torpor.model import (
    X86_EMU_ALL,
    X86_EMU_LAPIC,
    DomainInfo,
)
from torpor_sim.backends import BackendDriver
from torpor_sim.guest import Behaviour, GuestXenstore, LinuxGuest
from torpor_sim.xen import SimHypervisor, SimXen
from torpor_sim.xenstored import RingClient, Xenstored

__all__ = ["GUEST_KINDS", "GuestStatus", "SimHost"]

log = logging.getLogger("torpor_sim.host")
T = TypeVar("T")

#: Guest types the simulated host can build.
GUEST_KINDS = ("pv", "pvhvm", "hvm", "pvh")


@attrs.frozen
class GuestStatus:
    """One line of ``torpor sim status``."""

    domid: int
    name: str
    kind: str
    state: str
    ticks: int
    boots: int
    cooperative_resumes: int
    new_domain_resumes: int
    misbehaviour: str | None
    device_model: str | None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class SimHost:
    """One simulated Xen host.

    :param directory: where its sockets live (created if missing).
    :param qemu: real QEMU for HVM device models (``None``: when installed).
    :param name: a label for reports.
    :param shadow: the hypervisor has shadow paging (``False``: as Debian's Xen
        4.17, where a PV guest's log-dirty, and so its live migration, fails).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        qemu: bool | None = None,
        name: str = "sim",
        shadow: bool = True,
    ) -> None:
        self.dir = Path(directory)
        self.name = name
        self.qemu = qemu
        self.loop = asyncio.new_event_loop()
        self.xen = SimXen(self.loop, virq_dom_exc=self._virq_dom_exc, shadow=shadow)
        self.xenstored: Xenstored | None = None
        self.backends = BackendDriver()
        self.guests: dict[int, Any] = {}
        self.kinds: dict[int, str] = {}
        self.behaviours: dict[int, Behaviour] = {}
        #: domid -> device model (HVM and PVHVM guests)
        self.device_models: dict[int, Any] = {}
        self._dom0: _GuestRing | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._boot_error: BaseException | None = None
        self._servers: list[Callable[[], Awaitable[None]]] = []
        self.call_timeout = 60.0
        self._background: set[asyncio.Task[Any]] = set()
        #: Set when a client asked the host to stop (``sim_stop``).
        self.stop_requested = threading.Event()

    # -- paths ---------------------------------------------------------------

    @property
    def xenstore_socket(self) -> str:
        return str(self.dir / "xenstored" / "socket")

    def guest_xenstore_socket(self, domid: int) -> str:
        return str(self.dir / "xenstored" / f"domain-{domid}.sock")

    @property
    def hypervisor_socket(self) -> str:
        return str(self.dir / "hypervisor.sock")

    def qmp_socket(self, domid: int) -> str:
        """Like qemu-xen's ``/var/run/xen/qmp-libxl-<domid>``."""
        return str(self.dir / "qmp" / f"qmp-libxl-{domid}")

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> SimHost:
        """Start the host's loop thread; returns once xenstored listens."""
        if self._thread is not None:
            raise UsageError("simulated host already started")
        for sub in ("xenstored", "qmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"sim-host-{self.name}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._boot_error is not None:
            self._thread.join()
            raise TorporError(f"simulated host failed to start: {self._boot_error}") from (
                self._boot_error
            )
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._boot())
        except BaseException as e:  # reported to start()'s caller
            self._boot_error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    async def _boot(self) -> None:
        xs = Xenstored(domain_info=self._xenstored_domain_info, loop=self.loop)
        self.xenstored = xs
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.xenstore_socket)
        await xs.listen(self.xenstore_socket, domid=0)
        self._dom0 = _GuestRing(xs.connect(0, self._dom0_event))
        dom0 = self._dom0
        await dom0.write("/local/domain/0/name", "Domain-0")
        await dom0.write("/local/domain/0/domid", "0")
        await self.backends.start(dom0)
        from torpor_sim.control import ControlServer

        self.control = ControlServer(self, on_stop=self._on_control_stop)
        await self.control.start(self.hypervisor_socket)
        self._servers.append(self.control.close)

    def _on_control_stop(self) -> None:
        self.stop_requested.set()

    def _dom0_event(self, path: str, token: str) -> None:
        self.backends.on_event(path, token)

    def _xenstored_domain_info(self, domid: int) -> DomainInfo | None:
        # What C xenstored's check_domains() learns from the hypervisor: only
        # the flags matter, and this runs for every domain on every VIRQ.
        flags = self.xen.domain_flags(domid)
        return None if flags is None else DomainInfo(domid=domid, flags=flags)

    def _virq_dom_exc(self) -> None:
        if self.xenstored is not None:
            self.xenstored.domain_exc()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` in the host's loop from another thread; return its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("SimHost.run() called from the host's own loop")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(self.call_timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TorporError("the simulated host did not answer in time") from None

    def stop(self) -> None:
        """Stop guests, device models, xenstored and the loop thread."""
        if self._thread is None or not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.run(self._shutdown(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    async def _shutdown(self) -> None:
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server()
        for guest in list(self.guests.values()):
            with contextlib.suppress(Exception):
                await _maybe_await(guest.stop())
        for dm in list(self.device_models.values()):
            with contextlib.suppress(Exception):
                await dm.stop()
        self.backends.stop()
        if self.xenstored is not None:
            await self.xenstored.close()

    def __enter__(self) -> SimHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the orchestrator's view -------------------------------------------------

    def hypervisor(self) -> SimHypervisor:
        """A hypervisor backend on this host (its own event-channel handle)."""
        run = self.dir / "run"
        run.mkdir(exist_ok=True)
        return SimHypervisor(self.xen, lock_dir=str(run))

    def toolstack_host(self) -> Any:
        """A :class:`torpor.host.Host` on this simulated host, in process."""
        from torpor.host import Host

        return Host.for_sim_dir(
            self.dir, self.hypervisor(), name=f"sim:{self.dir}", builder=SimBuilder(self)
        )

    # -- domain building (libxl's job) ----------------------------------------------

    def create_guest(
        self,
        kind: str,
        *,
        name: str | None = None,
        behaviour: Behaviour | None = None,
        vcpus: int = 2,
        memory_pages: int = 16,
    ) -> int:
        """Build and boot a guest; return its domid."""
        return self.run(
            self.create_guest_async(
                kind, name=name, behaviour=behaviour, vcpus=vcpus, memory_pages=memory_pages
            )
        )

    async def create_guest_async(
        self,
        kind: str,
        *,
        name: str | None = None,
        behaviour: Behaviour | None = None,
        vcpus: int = 2,
        memory_pages: int = 16,
    ) -> int:
        if kind not in GUEST_KINDS:
            raise UsageError(
                f"unknown guest type {kind!r}; the sim builds {', '.join(GUEST_KINDS)}"
            )
        if kind == "hvm":
            return await self._create_hvm(name=name, behaviour=behaviour)
        behaviour = behaviour or Behaviour()
        hvm = kind in ("pvhvm", "pvh")
        flags = X86_EMU_ALL if kind == "pvhvm" else X86_EMU_LAPIC if kind == "pvh" else 0
        dom = self.xen.create_domain(
            name=name or "",
            hvm=hvm,
            emulation_flags=flags,
            vcpus=vcpus,
            memory_pages=memory_pages + behaviour.dirty_region,
        )
        domid = dom.domid
        dom.name = name or f"{kind}-guest-{domid}"
        await self._make_xenstore_tree(domid, dom.name, dom.uuid, hvm=hvm, behaviour=behaviour)
        guest = LinuxGuest(
            self.xen,
            self._connect_guest,
            domid,
            kind,
            behaviour=behaviour,
            on_destroy_request=self._request_destroy,
        )
        self.guests[domid] = guest
        self.kinds[domid] = kind
        self.behaviours[domid] = behaviour
        if kind == "pvhvm":
            await self._start_device_model(domid, kind)
        self.xen.unpause(domid)
        await guest.boot()
        return domid

    def _connect_guest(self, domid: int, on_event: Callable[[str, str], None]) -> GuestXenstore:
        assert self.xenstored is not None
        return _GuestRing(self.xenstored.connect(domid, on_event))

    async def _make_xenstore_tree(
        self, domid: int, name: str, uuid: str, *, hvm: bool, behaviour: Behaviour
    ) -> None:
        """libxl__domain_make() + libxl__build_post() + device add, as dom0."""
        assert self._dom0 is not None and self.xenstored is not None
        xs = self._dom0
        dompath = f"/local/domain/{domid}"
        vmpath = f"/vm/{uuid}"
        roperm = ["n0", f"r{domid}"]  # dom0 owns, the guest reads
        rwperm = [f"n{domid}"]  # the guest owns

        # libxl retries a transaction that conflicted (EAGAIN on commit):
        # concurrent domain builds (restore-all) touch common directories.
        async def build(tx: Any) -> None:
            for path, perms in (
                (dompath, roperm),
                (vmpath, roperm),
                (f"{dompath}/device", rwperm),
                (f"{dompath}/control", roperm),
                (f"{dompath}/control/shutdown", rwperm),
                (f"{dompath}/control/feature-poweroff", rwperm),
                (f"{dompath}/control/feature-reboot", rwperm),
                (f"{dompath}/control/feature-suspend", rwperm),
                (f"{dompath}/control/sysrq", rwperm),
                (f"{dompath}/data", rwperm),
                (f"{dompath}/drivers", rwperm),
                (f"{dompath}/feature", rwperm),
                (f"{dompath}/attr", rwperm),
                (f"{dompath}/error", rwperm),
                (f"{dompath}/device/suspend/event-channel", rwperm),
            ):
                await xs.mkdir(path, tx)
                await xs.set_perms(path, perms, tx)
            await xs.write(f"{dompath}/name", name, tx)
            await xs.write(f"{dompath}/domid", str(domid), tx)
            await xs.write(f"{dompath}/vm", vmpath, tx)
            await xs.write(f"{vmpath}/name", name, tx)
            await xs.write(f"{vmpath}/uuid", uuid, tx)
            await xs.write(f"{dompath}/memory/target", "65536", tx)
            # libxl__domain_make() tells every guest what this toolstack supports
            # (dom0's, read-only to the guest: they inherit control/'s permissions).
            # Seen on real Xen 4.17 by the lab's differential trace.
            await xs.write(f"{dompath}/control/platform-feature-multiprocessor-suspend", "1", tx)
            await xs.write(f"{dompath}/control/platform-feature-xs_reset_watches", "1", tx)

        await _retrying(xs, build)
        self.xenstored.introduce(domid, self.xen.store_mfn(domid), 1)
        # The domain's "ring" for clients in other processes: acts as the guest.
        await self.xenstored.listen(self.guest_xenstore_socket(domid), domid=domid)
        for kind, devid in behaviour.frontends:
            await self._add_device(domid, kind, devid)
        # libxl__wait_device_connection(): a device add completes (and the
        # domain is unpaused) once its backend is in InitWait.
        for kind, devid in behaviour.frontends:
            await self.backends.wait_probed(
                f"/local/domain/0/backend/{kind}/{domid}/{devid}", self.call_timeout
            )

    async def _add_device(self, domid: int, kind: str, devid: int) -> None:
        """libxl__device_generic_add(): backend and frontend directories."""
        assert self._dom0 is not None
        xs = self._dom0
        be = f"/local/domain/0/backend/{kind}/{domid}/{devid}"
        fe = f"/local/domain/{domid}/device/{kind}/{devid}"

        async def add(tx: Any) -> None:
            await xs.mkdir(be, tx)
            await xs.set_perms(be, ["n0", f"r{domid}"], tx)
            await xs.mkdir(fe, tx)
            await xs.set_perms(fe, [f"n{domid}", "r0"], tx)
            for k, v in (
                ("frontend", fe),
                ("frontend-id", str(domid)),
                ("online", "1"),
                ("state", "1"),
            ):
                await xs.write(f"{be}/{k}", v, tx)
            for k, v in (("backend", be), ("backend-id", "0"), ("state", "1")):
                await xs.write(f"{fe}/{k}", v, tx)

        await _retrying(xs, add)

    def _dm_prefer(self, kind: str) -> Any:
        # PVHVM: the kernel is simulated here; its QEMU only serves QMP, so the
        # in-process model does.  HVM: the guest *is* what runs in QEMU.
        if kind != "hvm" or self.qemu is False:
            return "in-process"
        return "qemu" if self.qemu else "auto"

    async def _start_device_model(self, domid: int, kind: str) -> Any:
        from torpor_sim.hvm import make_device_model

        run_dir = self.dir / "qmp" / f"dm-{domid}"
        run_dir.mkdir(parents=True, exist_ok=True)
        dm = make_device_model(
            domid=domid,
            prefer=self._dm_prefer(kind),
            run_dir=run_dir,
            # HVM: QEMU's own socket; the public one is HvmGuest's ordering proxy.
            qmp_path=self.qmp_socket(domid) if kind != "hvm" else run_dir / "qmp-qemu.sock",
        )
        await dm.start()
        self.device_models[domid] = dm
        return dm

    async def _create_hvm(self, *, name: str | None, behaviour: Behaviour | None) -> int:
        """An HVM guest without PV drivers: its device model runs the guest."""
        from torpor_sim.hvm import HvmGuest

        behaviour = attrs.evolve(behaviour or Behaviour(), frontends=())
        dom = self.xen.create_domain(
            name="", hvm=True, emulation_flags=X86_EMU_ALL, vcpus=1, memory_pages=4
        )
        domid = dom.domid
        dom.name = name or f"hvm-guest-{domid}"
        await self._make_xenstore_tree(domid, dom.name, dom.uuid, hvm=True, behaviour=behaviour)
        try:
            dm = await self._start_device_model(domid, "hvm")
            guest = HvmGuest(self.xen, domid, dm, behaviour, destroy=self._request_destroy)
            agent = str(self.dir / "qmp" / f"qga-{domid}") if behaviour.agent else None
            await guest.start(agent, qmp_public=self.qmp_socket(domid))
        except BaseException:
            await self.destroy_guest_async(domid)
            raise
        self.guests[domid] = guest
        self.kinds[domid] = "hvm"
        self.behaviours[domid] = behaviour
        self.xen.unpause(domid)
        return domid

    # -- save and restore (libxl's and libxenguest's part) ----------------------------

    def save_guest(self, domid: int) -> Any:
        """A suspended guest's state as a :class:`torpor.image.SavedDomain`."""
        return self.run(self.save_guest_async(domid))

    async def save_guest_async(self, domid: int) -> Any:
        from torpor.image import SavedDomain

        guest = self.guest(domid)
        kind = self.kinds[domid]
        if kind == "hvm":
            return await self._save_hvm(domid)
        if hasattr(guest, "advance"):
            guest.advance()
        domain = await self.describe_async(domid)
        state = self.xen.save_domain(domid)
        return SavedDomain(
            domain=domain,
            vcpus=state["vcpus"],
            start_info=state["start_info"],
            hvm_params=state["hvm_params"],
            memory=state["memory"],
            guest=guest.saved_state(),
            source={"host": self.name, "domid": domid},
        )

    async def describe_async(self, domid: int) -> dict[str, Any]:
        """The DOMAIN record of a guest: what a restore builds the domain from."""
        kind = self.kinds.get(domid)
        if kind is None:
            raise UsageError(f"no simulated guest with domid {domid}")
        dom = self.xen.domain(domid)
        return {
            "kind": kind,
            "name": await self._xs_name(domid) or dom.name,
            "uuid": dom.uuid,
            "hvm": dom.hvm,
            "emulation_flags": dom.emulation_flags,
            "vcpus": len(dom.vcpus),
            "memory_pages": len(dom.memory) // 4096,
            "behaviour": _behaviour_dict(self.behaviours[domid]),
        }

    def live_refusal(self, domid: int) -> str | None:
        """Why this host cannot save ``domid`` live, beyond the hypervisor's
        capabilities (``None``: it can)."""
        if self.kinds.get(domid) == "hvm":
            return (
                "a simulated plain HVM guest's memory lives in its QEMU process, whose "
                "pages the simulated hypervisor cannot track"
            )
        return None

    def suspended_state(self, domid: int) -> dict[str, Any]:
        """A suspended guest's state but its memory (a live save sent that already)."""
        guest = self.guest(domid)
        state = self.xen.save_domain(domid)
        return {
            "vcpus": state["vcpus"],
            "start_info": state["start_info"],
            "hvm_params": state["hvm_params"],
            "guest": guest.saved_state(),
        }

    def restore_guest(self, saved: Any) -> int:
        """Build a new domain from a saved one, left paused (:meth:`start_restored`)."""
        return self.run(self.restore_guest_async(saved))

    def start_restored(self, domid: int) -> None:
        """``libxl_domain_unpause`` of a restored domain (:meth:`start_restored_async`)."""
        self.run(self.start_restored_async(domid))

    async def start_restored_async(self, domid: int) -> None:
        """libxl_domain_unpause: the device model first (QMP ``cont``), then the domain.

        The guest returns 0 from its suspend hypercall -- a new domain -- and
        rebuilds; this returns once its vCPUs have run that far.
        """
        dm = self.device_models.get(domid)
        if dm is not None and self.kinds.get(domid) == "pvhvm":
            await dm.unpause_vcpus()
        # A plain HVM guest's QEMU also plays its vCPUs: HvmGuest continues it
        # when the domain is unpaused.
        self.xen.unpause(domid)
        await self.xen.vcpus_ran()

    async def restore_guest_async(self, saved: Any) -> int:
        """libxl's restore: domain, memory, xenstore tree, devices, introduce.

        The domain is left paused, its device model (if any) stopped, as
        ``xl restore -p`` leaves it; :meth:`start_restored_async` starts it.
        """
        kind = saved.kind
        if kind not in GUEST_KINDS:
            raise UsageError(f"this simulated host cannot build a {kind!r} guest")
        d = saved.domain
        behaviour = _behaviour_from(d.get("behaviour", {}))
        if kind == "hvm":
            return await self._restore_hvm(saved, behaviour)
        state = {
            "memory": saved.memory,
            "vcpus": saved.vcpus,
            "start_info": saved.start_info,
            "hvm_params": saved.hvm_params,
        }
        dom = self.xen.restore_domain(
            name=str(d["name"]),
            hvm=bool(d["hvm"]),
            emulation_flags=int(d["emulation_flags"]),
            state=state,
            uuid=str(d.get("uuid") or "") or None,
        )
        domid = dom.domid
        try:
            await self._refuse_taken_name(domid, dom.name)
            await self._make_xenstore_tree(
                domid, dom.name, dom.uuid, hvm=dom.hvm, behaviour=behaviour
            )
            guest = LinuxGuest(
                self.xen,
                self._connect_guest,
                domid,
                kind,
                behaviour=behaviour,
                on_destroy_request=self._request_destroy,
            )
            guest.grant_generation = int(saved.guest.get("grant_generation", 0))
            self.guests[domid] = guest
            self.kinds[domid] = kind
            self.behaviours[domid] = behaviour
            if kind == "pvhvm":
                dm = await self._start_device_model(domid, kind)
                await dm.pause_vcpus()
            guest.adopt_restored()
        except BaseException:
            await self.destroy_guest_async(domid)
            raise
        return domid

    async def _xs_name(self, domid: int) -> str | None:
        """The domain's name where libxl keeps it (``/local/domain/<domid>/name``;
        ``xl rename`` and a migration's ``NAME--incoming`` change it there)."""
        assert self._dom0 is not None
        try:
            return await self._dom0.read(f"/local/domain/{domid}/name")
        except TorporError:
            return None

    async def _refuse_taken_name(self, domid: int, name: str) -> None:
        """libxl__domain_make -> libxl__domain_rename: a name another domain holds is
        refused (ERROR_INVAL) after the new domain was created; the caller destroys it."""
        with self.xen.lock:
            others = sorted(self.xen.domains)
        for other in others:
            if other != domid and await self._xs_name(other) == name:
                raise HypervisorError(
                    f"libxl_domain_create_restore failed: ERROR_INVAL (Domain with name "
                    f'"{name}" already exists: domain {other})',
                    errno=errno.EINVAL,
                    op="libxl_domain_create_restore",
                )

    async def _save_hvm(self, domid: int) -> Any:
        """An HVM guest's state is its device model's: in the simulation QEMU runs
        the vCPUs too, so RAM, CPU and devices travel as QEMU's own migration
        stream (real Xen sends RAM through libxc and QEMU's device state apart)."""
        from torpor.image import SavedDomain

        dom = self.xen.domain(domid)
        dm = self.device_models[domid]
        path = self.dir / "state" / f"vm-{domid}"
        path.parent.mkdir(parents=True, exist_ok=True)
        await dm.save_vm_state(path, timeout=60)
        try:
            vm_state = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        state = self.xen.save_domain(domid)
        return SavedDomain(
            domain={
                "kind": "hvm",
                "name": await self._xs_name(domid) or dom.name,
                "uuid": dom.uuid,
                "hvm": True,
                "emulation_flags": dom.emulation_flags,
                "vcpus": len(dom.vcpus),
                "memory_pages": len(dom.memory) // 4096,
                "behaviour": _behaviour_dict(self.behaviours[domid]),
                "device_model": str(dm.kind),
            },
            vcpus=state["vcpus"],
            start_info=None,
            hvm_params=state["hvm_params"],
            memory=b"",
            guest={"kind": "hvm"},
            device_model=vm_state,
            source={"host": self.name, "domid": domid},
        )

    async def _restore_hvm(self, saved: Any, behaviour: Behaviour) -> int:
        """A new HVM domain whose device model starts from the saved VM state
        (qemu-xen is started with ``-incoming`` the same way)."""
        from torpor_sim.devicemodel import saved_vm_state_kind
        from torpor_sim.hvm import HvmGuest, make_device_model

        if saved.device_model is None:
            raise UsageError("the image of an HVM guest carries no device-model state")
        d = saved.domain
        state = {
            "memory": b"",
            "vcpus": saved.vcpus,
            "start_info": None,
            "hvm_params": saved.hvm_params,
        }
        dom = self.xen.restore_domain(
            name=str(d["name"]),
            hvm=True,
            emulation_flags=int(d["emulation_flags"]),
            state=state,
            uuid=str(d.get("uuid") or "") or None,
        )
        domid = dom.domid
        try:
            await self._refuse_taken_name(domid, dom.name)
            await self._make_xenstore_tree(domid, dom.name, dom.uuid, hvm=True, behaviour=behaviour)
            incoming = self.dir / "state" / f"incoming-{domid}"
            incoming.parent.mkdir(parents=True, exist_ok=True)
            incoming.write_bytes(saved.device_model)
            kind = saved_vm_state_kind(incoming)
            if kind is None:
                raise UsageError("the image's device-model state is of no known kind")
            run_dir = self.dir / "qmp" / f"dm-{domid}"
            run_dir.mkdir(parents=True, exist_ok=True)
            dm = make_device_model(
                domid=domid,
                prefer=kind,
                run_dir=run_dir,
                qmp_path=run_dir / "qmp-qemu.sock",
                incoming=incoming,
            )
            try:
                await dm.start()
            finally:
                incoming.unlink(missing_ok=True)
            self.device_models[domid] = dm
            guest = HvmGuest(self.xen, domid, dm, behaviour, destroy=self._request_destroy)
            agent = str(self.dir / "qmp" / f"qga-{domid}") if behaviour.agent else None
            await guest.start(agent, qmp_public=self.qmp_socket(domid))
            self.guests[domid] = guest
            self.kinds[domid] = "hvm"
            self.behaviours[domid] = behaviour
        except BaseException:
            await self.destroy_guest_async(domid)
            raise
        return domid

    # -- teardown (libxl_domain_destroy) --------------------------------------------

    def _request_destroy(self, domid: int) -> None:
        """Destroy a domain from inside the loop without waiting (``vanish``)."""
        task = self.loop.create_task(self.destroy_guest_async(domid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def destroy_guest(self, domid: int) -> None:
        self.run(self.destroy_guest_async(domid))

    async def destroy_guest_async(self, domid: int) -> None:
        """Destroy the domain, then clean its xenstore tree and devices as libxl does."""
        assert self._dom0 is not None
        guest = self.guests.pop(domid, None)
        self.kinds.pop(domid, None)
        self.behaviours.pop(domid, None)
        dm = self.device_models.pop(domid, None)
        with contextlib.suppress(TorporError):
            self.xen.destroy(domid)
        if guest is not None:
            await _maybe_await(guest.stop())
        if dm is not None:
            with contextlib.suppress(Exception):
                await dm.stop()
        if self.xenstored is not None:
            await self.xenstored.unlisten(self.guest_xenstore_socket(domid))
        xs = self._dom0
        for path in (
            f"/local/domain/{domid}",
            f"/local/domain/0/backend/vif/{domid}",
            f"/local/domain/0/backend/vbd/{domid}",
        ):
            with contextlib.suppress(TorporError):
                await xs.rm(path)

    # -- inspection -------------------------------------------------------------------

    def guest(self, domid: int) -> Any:
        try:
            return self.guests[domid]
        except KeyError:
            raise UsageError(f"no simulated guest with domid {domid}") from None

    def status(self) -> list[GuestStatus]:
        """One :class:`GuestStatus` per guest domain, in domid order."""
        return self.run(self._status())

    async def _status(self) -> list[GuestStatus]:
        out = []
        infos = {i.domid: i for i in self.xen.domain_info_list()}
        for domid in sorted(self.guests):
            guest = self.guests[domid]
            info = infos.get(domid)
            counters = await _maybe_await(guest.counters())
            out.append(
                GuestStatus(
                    domid=domid,
                    # where libxl keeps it (xl rename, a migration's renames)
                    name=await self._xs_name(domid)
                    or (self.xen.domains[domid].name if domid in self.xen.domains else "?"),
                    kind=self.kinds.get(domid, "?"),
                    state=self._state(domid, info),
                    ticks=counters.get("ticks", -1),
                    boots=counters.get("boots", 0),
                    cooperative_resumes=counters.get("cooperative_resumes", 0),
                    new_domain_resumes=counters.get("new_domain_resumes", 0),
                    misbehaviour=self.behaviours[domid].misbehaviour
                    if domid in self.behaviours
                    else None,
                    device_model=self.device_models[domid].kind
                    if domid in self.device_models
                    else None,
                )
            )
        return out

    async def guest_report(self, domid: int) -> dict[str, Any]:
        """A guest's counters, memory checksum and kernel log (for tests and status)."""
        guest = self.guest(domid)
        counters = await _maybe_await(guest.counters())
        checksum = await _maybe_await(guest.memory_checksum())
        try:  # an HVM guest's memory lives in its QEMU, which may be dead
            consistent: bool | None = bool(await _maybe_await(guest.memory_consistent()))
        except TorporError:
            consistent = None
        info = self._xenstored_domain_info(domid)
        return {
            "domid": domid,
            "kind": self.kinds.get(domid),
            "state": self._state(domid, info),
            "counters": counters,
            "checksum": checksum,
            "checksum_at_resume": getattr(guest, "checksum_at_resume", None),
            #: memory holds exactly what the guest's own work wrote (None: cannot tell)
            "memory_consistent": consistent,
            "last_hypercall_return": getattr(guest, "last_hypercall_return", None),
            "frontends": dict(getattr(guest, "frontend_states", {})),
            "log": list(getattr(guest, "log", [])),
        }

    def _state(self, domid: int, info: DomainInfo | None) -> str:
        """The truth, from the models themselves (what tests judge torpor by):
        the domain's state word, ``S3``, and -- when it is not the one that
        goes with the domain's -- its device model's run state
        (``running, device model gone``), in torpor's vocabulary."""
        if info is None:
            return "gone"
        dom = self.xen.domains.get(domid)
        state = "S3" if dom is not None and dom.s3 and not info.shutdown else info.state_word()
        dm = self.device_models.get(domid)
        if dm is None or state not in ("running", "S3"):
            return state
        run_state = dm.run_state if dm.alive else "gone"
        expected = "suspended" if state == "S3" else "running"
        return state if run_state == expected else f"{state}, device model {run_state}"

    def observed_state(self, domid: int) -> str:
        """:meth:`_state` for one domain, read now (``gone`` if it no longer exists)."""
        try:
            info = self.xen.domain_info(domid)
        except TorporError:
            info = None
        return self._state(domid, info)


def _behaviour_dict(b: Behaviour) -> dict[str, Any]:
    out = attrs.asdict(b)
    out["frontends"] = [list(f) for f in b.frontends]
    return out


def _behaviour_from(d: dict[str, Any]) -> Behaviour:
    fields = {f.name for f in attrs.fields(Behaviour)}
    kw = {k: v for k, v in d.items() if k in fields}
    if "frontends" in kw:
        kw["frontends"] = tuple((str(k), int(v)) for k, v in kw["frontends"])
    return Behaviour(**kw)


class _GuestRing(RingClient):
    """A guest kernel's ring, which the kernel can also drop (``lose_xenstore``)."""

    def close(self) -> None:
        self.conn.close()


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value


class SimBuilder:
    """The domain builder of a :class:`SimHost` in this process (save, restore, start,
    destroy; live saves through :class:`torpor.livesave.SimMemory`)."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.name = f"sim:{host.dir}"

    # -- live saves (torpor.livesave.SimMemory) and arrivals

    def live_refusal(self, domid: int) -> str | None:
        return self.host.live_refusal(domid)  # type: ignore[no-any-return]

    def describe(self, domid: int) -> dict[str, Any]:
        return self.host.run(self.host.describe_async(domid))  # type: ignore[no-any-return]

    def logdirty(self, domid: int, enable: bool) -> None:
        if enable:
            self.host.xen.logdirty_enable(domid)
        else:
            self.host.xen.logdirty_disable(domid)

    def dirty_pages(self, domid: int) -> list[int]:
        return self.host.xen.logdirty_clean(domid)  # type: ignore[no-any-return]

    def pages(self, domid: int, pfns: list[int]) -> bytes:
        return self.host.xen.read_pages(domid, pfns)  # type: ignore[no-any-return]

    def suspended_state(self, domid: int) -> dict[str, Any]:
        return self.host.suspended_state(domid)  # type: ignore[no-any-return]

    def incoming(self) -> Any:
        """A live stream arriving here (:class:`torpor.livesave.IncomingImage`)."""
        import io

        from torpor.image import decode
        from torpor.livesave import IncomingImage

        buf = io.BytesIO()

        def build() -> tuple[int, str, str]:
            saved = decode(io.BytesIO(buf.getvalue()))
            return self.restore(saved), saved.checksum(), saved.memory_checksum()

        return IncomingImage(write_=buf.write, build_=build, close_=lambda: None)

    def save(self, domid: int) -> Any:
        saved: Any = self.host.save_guest(domid)
        return saved

    def restore(self, saved: Any) -> int:
        domid: int = self.host.restore_guest(saved)
        return domid

    def start(self, domid: int) -> None:
        self.host.start_restored(domid)

    def destroy(self, domid: int) -> None:
        self.host.destroy_guest(domid)


async def _retrying(xs: Any, body: Callable[[Any], Awaitable[None]], attempts: int = 16) -> None:
    """Run ``body(tx)`` in a transaction, again while the commit conflicts (EAGAIN),
    as libxl does (``libxl__xs_transaction_commit``)."""
    for attempt in range(attempts):
        tx = await xs.transaction_start()
        try:
            await body(tx)
        except BaseException:
            with contextlib.suppress(XenstoreError):
                await xs.transaction_end(tx, False)
            raise
        try:
            await xs.transaction_end(tx, True)
            return
        except XenstoreError as e:
            if e.errno != errno.EAGAIN or attempt == attempts - 1:
                raise

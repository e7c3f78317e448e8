"""The machine torpor acts on: a hypervisor backend, xenstore, device models.

:class:`Host` bundles what the orchestrator needs and is chosen at the edge
(``--host xen`` / ``--host sim:DIR`` / ``TORPOR_HOST``); the orchestrator
cannot tell a real dom0 from the simulated one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from torpor.errors import BackendUnavailable, UsageError
from torpor.hypervisor import Hypervisor
from torpor.xenstore import Xenstore

if TYPE_CHECKING:
    from torpor.builder import DomainBuilder

__all__ = ["DOMID_FIRST_RESERVED", "Host", "validate_domid"]

#: Domain ids at and above this are reserved (DOMID_SELF, DOMID_IO...).
DOMID_FIRST_RESERVED = 0x7FF0
HOST_ENV = "TORPOR_HOST"


def validate_domid(value: object, *, allow_dom0: bool = False) -> int:
    """A domid from user input, or UsageError: no strings with tricks, no reserved ids."""
    if isinstance(value, bool):
        raise UsageError(f"invalid domid {value!r}")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 5:
            raise UsageError(f"invalid domid {value!r}: expected a number")
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < DOMID_FIRST_RESERVED:
        raise UsageError(f"invalid domid {value!r}: expected 0..{DOMID_FIRST_RESERVED - 1}")
    if value == 0 and not allow_dom0:
        raise UsageError("domain 0 is the control domain; torpor does not suspend it", domid=0)
    return value


class Host:
    """One Xen host as torpor sees it.

    :param name: a label (``xen``, ``sim:/tmp/h1``).
    :param hypervisor: the hypervisor backend.
    :param xenstore_path: the xenstored socket.
    :param qmp_path: domid -> the device model's QMP socket.
    :param agent_path: domid -> the guest agent's socket (or None: no agent).
    :param state_dir: where device-model state files go (libxl: /var/lib/xen).
    :param lock_dir: per-domain operation locks, shared by every torpor process.
    """

    def __init__(
        self,
        *,
        name: str,
        hypervisor: Hypervisor,
        xenstore_path: str,
        qmp_path: Callable[[int], str],
        agent_path: Callable[[int], str | None] = lambda _d: None,
        state_dir: str,
        lock_dir: str,
        builder: DomainBuilder | None = None,
        xenstore_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.hypervisor = hypervisor
        self.xenstore_path = xenstore_path
        self._qmp_path = qmp_path
        self._agent_path = agent_path
        self.state_dir = state_dir
        self.lock_dir = lock_dir
        self._xenstore: Xenstore | None = None
        self.xenstore_timeout = xenstore_timeout
        #: saves and builds domains (save / restore / migrate); None: not supported here
        self.builder = builder

    @property
    def xenstore(self) -> Xenstore:
        """dom0's xenstore connection (opened on first use)."""
        if self._xenstore is None:
            self._xenstore = Xenstore(self.xenstore_path, timeout=self.xenstore_timeout).connect()
        return self._xenstore

    def qmp_path(self, domid: int) -> str:
        return self._qmp_path(domid)

    def agent_path(self, domid: int) -> str | None:
        path = self._agent_path(domid)
        return path if path and os.path.exists(path) else None

    def close(self) -> None:
        if self._xenstore is not None:
            self._xenstore.close()
            self._xenstore = None
        self.hypervisor.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Host {self.name}>"

    # -- constructors ------------------------------------------------------------

    @classmethod
    def xen(cls) -> Host:
        """This dom0: libxenctrl through cffi, the host's xenstored, qemu-xen's QMP."""
        from torpor.hypervisor.xenctrl import XenctrlHypervisor

        hv = XenctrlHypervisor()
        return cls(
            name="xen",
            hypervisor=hv,
            xenstore_path=os.environ.get("XENSTORED_PATH", "/var/run/xenstored/socket"),
            qmp_path=lambda d: f"/var/run/xen/qmp-libxl-{d}",
            agent_path=lambda d: f"/var/run/xen/qga-{d}",
            state_dir="/var/lib/xen",
            lock_dir="/var/run/torpor",
        )

    @classmethod
    def sim(cls, directory: str | os.PathLike[str]) -> Host:
        """A simulated host started with ``torpor sim start --dir DIR``."""
        from torpor.hypervisor.remote import RemoteHypervisor

        d = Path(directory)
        sock = d / "hypervisor.sock"
        if not sock.exists():
            raise BackendUnavailable(
                f"no simulated host in {d} (start one with `torpor sim start --dir {d}`)"
            )
        from torpor.builder import RemoteSimBuilder

        run = d / "run"
        run.mkdir(exist_ok=True)
        hv = RemoteHypervisor(str(sock), lock_dir=str(run))
        return cls.for_sim_dir(d, hv, name=f"sim:{d}", builder=RemoteSimBuilder(hv))

    @classmethod
    def for_sim_dir(
        cls, d: Path, hypervisor: Hypervisor, *, name: str, builder: DomainBuilder | None = None
    ) -> Host:
        return cls(
            builder=builder,
            name=name,
            hypervisor=hypervisor,
            xenstore_path=str(d / "xenstored" / "socket"),
            qmp_path=lambda dom: str(d / "qmp" / f"qmp-libxl-{dom}"),
            agent_path=lambda dom: str(d / "qmp" / f"qga-{dom}"),
            state_dir=str(d / "state"),
            lock_dir=str(d / "locks"),
        )

    @classmethod
    def open(cls, spec: str | None = None) -> Host:
        """``sim:DIR`` or ``xen``; default ``$TORPOR_HOST``, else xen in a dom0."""
        spec = spec or os.environ.get(HOST_ENV)
        if not spec:
            try:
                with open("/proc/xen/capabilities") as f:
                    is_dom0 = "control_d" in f.read()
            except OSError:
                is_dom0 = False
            if not is_dom0:
                raise BackendUnavailable(
                    "no Xen control domain here (/proc/xen/capabilities lacks control_d) and no "
                    "host given: start a simulated host with `torpor sim start --dir DIR` and "
                    "pass `--host sim:DIR` (or set TORPOR_HOST=sim:DIR)"
                )
            spec = "xen"
        if spec == "xen":
            return cls.xen()
        if spec.startswith("sim:") and len(spec) > 4:
            return cls.sim(spec[4:])
        raise UsageError(f"unknown host {spec!r}: use 'xen' or 'sim:DIR'")

"""The machine torpor acts on: a hypervisor backend, xenstore, device models.

:class:`Host` bundles what the orchestrator needs and is chosen at the edge
(``--host xen`` / ``--host sim:DIR`` / ``TORPOR_HOST``); the orchestrator
cannot tell a real dom0 from the simulated one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torpor.errors import BackendUnavailable, UsageError, XenstoreConnectionLost
from torpor.hypervisor import Hypervisor
from torpor.xenstore import Xenstore

if TYPE_CHECKING:
    from torpor.builder import DomainBuilder

__all__ = [
    "DOMID_FIRST_RESERVED",
    "Host",
    "check_private_socket",
    "sim_module",
    "validate_domain_name",
    "validate_domid",
]

#: Domain ids at and above this are reserved (DOMID_SELF, DOMID_IO...).
DOMID_FIRST_RESERVED = 0x7FF0
HOST_ENV = "TORPOR_HOST"


def validate_domid(value: object, *, allow_dom0: bool = False) -> int:
    """A domid from user input, or UsageError naming the valid range.

    Decimal ASCII digits only (no signs, spaces, tricks), not reserved
    (``DOMID_FIRST_RESERVED`` and above: DOMID_SELF, DOMID_IO...), and not 0
    unless ``allow_dom0``.
    """
    lo, hi = (0 if allow_dom0 else 1), DOMID_FIRST_RESERVED - 1
    expected = f"a domid is a decimal number from {lo} to {hi}"
    if isinstance(value, bool):
        raise UsageError(f"invalid domid {value!r}: {expected}")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 5:
            raise UsageError(f"invalid domid {value!r}: {expected}")
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < DOMID_FIRST_RESERVED:
        raise UsageError(f"invalid domid {value!r}: {expected}")
    if value == 0 and not allow_dom0:
        raise UsageError(
            f"domain 0 is the control domain; torpor does not suspend it ({expected})", domid=0
        )
    return value


#: The longest domain name torpor gives a domain (xenstore holds 4096 octets).
DOMAIN_NAME_MAX = 255


def validate_domain_name(value: object) -> str:
    """A domain name from user input (``restore --name``), or UsageError.

    Printable, non-empty, at most :data:`DOMAIN_NAME_MAX` characters, not
    blank at either end, and not all digits (``xl`` takes a number for a domid).
    """
    if not isinstance(value, str):
        raise UsageError(f"invalid domain name {value!r}: expected a string")
    if not value or value != value.strip():
        raise UsageError(f"invalid domain name {value!r}: empty or blank at an end")
    if len(value) > DOMAIN_NAME_MAX or not value.isprintable():
        raise UsageError(
            f"invalid domain name {value[:40]!r}: printable characters only, "
            f"at most {DOMAIN_NAME_MAX}"
        )
    if value.isdigit():
        raise UsageError(f"invalid domain name {value!r}: all digits reads as a domid")
    return value


def sim_module(name: str) -> Any:
    """``torpor_sim.<name>``: the simulated host (test and demo equipment, its own
    distribution).  BackendUnavailable, saying how to install it, where it is not."""
    import importlib

    try:
        return importlib.import_module(f"torpor_sim.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("torpor_sim", f"torpor_sim.{name}"):
            raise
        raise BackendUnavailable(
            "the simulated Xen host is not installed (it is test and demo equipment, "
            "its own distribution): pip install 'torpor[sim]'"
        ) from None


def _check_directories(directory: str, what: str) -> None:
    """Every directory from ``directory`` (symlinks resolved) up to ``/`` must be
    owned by us or root, and writable by no one else unless it has the sticky bit."""
    euid = os.geteuid()
    cur = directory
    while True:
        st = os.stat(cur)
        if st.st_uid not in (euid, 0):
            raise UsageError(
                f"{what}: directory {cur} belongs to uid {st.st_uid}, not to us ({euid}) or "
                "root; its owner could swap the socket for their own"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise UsageError(
                f"{what}: directory {cur} is writable by others (mode "
                f"{stat.S_IMODE(st.st_mode):o}) without the sticky bit; "
                "anyone could swap the socket for their own"
            )
        parent = os.path.dirname(cur)
        if parent == cur:
            return
        cur = parent


def check_private_socket(path: str | os.PathLike[str], what: str) -> str:
    """The socket torpor may act through with privilege, or UsageError.

    The rule (docs/security.md): ``path``, looked at without following a
    symlink, must be a Unix socket owned by our effective uid or root, and
    every directory above it (symlinks resolved) must be owned by us or root
    and writable by nobody else unless it has the sticky bit -- so no other
    local user can have planted the socket nor swap it afterwards.  Returns
    the path with its directory's symlinks resolved: connect through that.

    :raises BackendUnavailable: nothing is there.
    :raises UsageError: it breaks the rule.
    """
    raw = os.fspath(path)
    directory = os.path.realpath(os.path.dirname(os.path.abspath(raw)))
    sock = os.path.join(directory, os.path.basename(raw))
    try:
        st = os.lstat(sock)
    except FileNotFoundError:
        raise BackendUnavailable(f"{what}: no socket at {sock}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise UsageError(f"{what}: {sock} is {kind}; refusing to use it")
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        raise UsageError(
            f"{what}: socket {sock} belongs to uid {st.st_uid}, not to us ({euid}) or root; "
            "refusing to use it"
        )
    _check_directories(directory, what)
    return sock


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
        self._closed = False
        self.xenstore_timeout = xenstore_timeout
        #: saves and builds domains (save / restore / migrate); None: not supported here
        self.builder = builder

    @property
    def xenstore(self) -> Xenstore:
        """dom0's xenstore connection (opened on first use, never after :meth:`close`).

        A closed host does not reconnect: a clean-up running late (at
        interpreter shutdown, after ``Torpor.close()``) gets
        XenstoreConnectionLost instead of a new connection and its thread.
        """
        if self._closed:
            raise XenstoreConnectionLost(f"host {self.name} is closed")
        if self._xenstore is None:
            self._xenstore = Xenstore(self.xenstore_path, timeout=self.xenstore_timeout).connect()
        return self._xenstore

    def qmp_path(self, domid: int) -> str:
        return self._qmp_path(domid)

    def agent_path(self, domid: int) -> str | None:
        path = self._agent_path(domid)
        return path if path and os.path.exists(path) else None

    def close(self) -> None:
        self._closed = True
        close_builder = getattr(self.builder, "close", None)
        if callable(close_builder):
            close_builder()  # the real-Xen builder's libxl context
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
        """This dom0: libxenctrl through cffi, the host's xenstored, qemu-xen's QMP.

        The xenstored socket (``$XENSTORED_PATH`` or the default) must pass
        :func:`check_private_socket` if it exists (if not, connecting fails later).
        """
        from torpor.hypervisor.xenctrl import XenctrlHypervisor

        xenstore_path = os.environ.get("XENSTORED_PATH", "/var/run/xenstored/socket")
        if os.path.lexists(xenstore_path):
            xenstore_path = check_private_socket(xenstore_path, "xenstored")
        from torpor.xl import XlBuilder

        hv = XenctrlHypervisor()
        host = cls(
            name="xen",
            hypervisor=hv,
            xenstore_path=xenstore_path,
            qmp_path=lambda d: f"/var/run/xen/qmp-libxl-{d}",
            agent_path=lambda d: f"/var/run/xen/qga-{d}",
            state_dir="/var/lib/xen",
            lock_dir="/var/run/torpor",
        )
        # xl's save format and libxl's domains (libxenlight loads on first use).
        host.builder = XlBuilder(xenstore=lambda: host.xenstore)
        return host

    @classmethod
    def sim(cls, directory: str | os.PathLike[str]) -> Host:
        """A simulated host started with ``torpor sim start --dir DIR``.

        ``DIR/hypervisor.sock`` and ``DIR/xenstored/socket`` must pass
        :func:`check_private_socket`; DIR's symlinks are resolved once, here.
        """
        from torpor.hypervisor.remote import RemoteHypervisor

        given = Path(directory)
        sock = given / "hypervisor.sock"
        if not os.path.lexists(sock):
            raise BackendUnavailable(
                f"no simulated host in {given} (start one with `torpor sim start --dir {given}`)"
            )
        sock = Path(check_private_socket(sock, "simulated host's hypervisor.sock"))
        d = sock.parent
        check_private_socket(d / "xenstored" / "socket", "simulated host's xenstored")
        from torpor.builder import RemoteSimBuilder

        run = d / "run"
        run.mkdir(exist_ok=True)
        hv = RemoteHypervisor(str(sock), lock_dir=str(run))
        return cls.for_sim_dir(d, hv, name=f"sim:{given}", builder=RemoteSimBuilder(hv))

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

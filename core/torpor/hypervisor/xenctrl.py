"""The real hypervisor backend: libxenctrl, libxenguest, libxenevtchn and
libxentoollog (Xen 4.17) through cffi in ABI mode.

Nothing is loaded or parsed at import time: the cffi declarations are parsed
and the libraries ``dlopen``\\ ed when a :class:`XenctrlHypervisor` is created
(or :func:`load_libraries` is called).  Every declaration below mirrors
Debian's Xen 4.17 headers (``xenctrl.h``, ``xenguest.h``, ``xenevtchn.h``,
``xentoollog.h``, ``xen/domctl.h``); ``tests/test_xenctrl_backend.py`` compiles
them against those headers and compares every size and offset, so a mismatch
is caught on the build machine and never inside dom0.

The interface is opened with a ``xentoollog_logger`` implemented in Python
(:class:`XtlLogger`) that forwards libxc's messages to :mod:`logging`: nothing
is written to stderr, even when ``xc_interface_open`` fails.

Every failing call raises :class:`~torpor.errors.HypervisorError` with the
errno libxc left (read through ``ffi.errno`` straight after the call); a
machine without Xen raises :class:`~torpor.errors.BackendUnavailable` naming
what is missing.

The per-domain lock that keeps two toolstacks off one domain's suspend event
channel is :class:`SuspendEvtchnLock`, the same lock file and the same
``fcntl(F_SETLK)`` byte lock libxenguest takes in
``xc_suspend_evtchn_init_exclusive`` (tools/libs/guest/xg_suspend.c).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import logging
import os
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final

from torpor.errors import BackendUnavailable, HypervisorError, UsageError, errno_name
from torpor.model import DomainInfo, ShutdownReason

if TYPE_CHECKING:
    from torpor.hypervisor import Hypervisor

__all__ = [
    "DOMID_FIRST_RESERVED",
    "LOCK_DIR_ENV",
    "PRIVCMD_PATHS",
    "SONAMES",
    "XEN_RUN_DIR",
    "SuspendEvtchnLock",
    "XenLibraries",
    "XenctrlHypervisor",
    "XtlLevel",
    "XtlLogger",
    "cdef_source",
    "get_ffi",
    "load_libraries",
]

_log = logging.getLogger(__name__)

#: The shared objects, by the sonames Debian's Xen 4.17 runtime packages ship
#: (libxenmisc4.17, libxenevtchn1, libxentoollog1).  libxenctrl and libxenguest
#: are versioned with Xen itself: the declarations below are checked against
#: 4.17's headers and hold for exactly that ABI.
SONAMES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "xenctrl": "libxenctrl.so.4.17",
        "xenguest": "libxenguest.so.4.17",
        "xenevtchn": "libxenevtchn.so.1",
        "xentoollog": "libxentoollog.so.1",
    }
)

#: libxencall opens the first of these that exists (tools/libs/call/linux.c);
#: with neither there is no privcmd driver, so no Xen to talk to.
PRIVCMD_PATHS: Final[tuple[str, ...]] = ("/dev/xen/privcmd", "/proc/xen/privcmd")

#: xen/include/public/version.h: xc_version's commands, and xen_extraversion_t's size.
XENVER_VERSION: Final = 0
XENVER_EXTRAVERSION: Final = 1
XEN_EXTRAVERSION_LEN: Final = 16

#: The event channel device libxenevtchn opens (tools/libs/evtchn/linux.c).
EVTCHN_PATH: Final = "/dev/xen/evtchn"

#: XEN_RUN_DIR as Debian builds it: libxenguest.so.4.17 holds the format
#: ``/var/run/xen/suspend-evtchn-%d.lock`` (checked by the tests).
XEN_RUN_DIR: Final = "/var/run/xen"

#: Environment variable that moves the suspend lock directory (tests, a
#: toolstack with its own run directory).
LOCK_DIR_ENV: Final = "TORPOR_SUSPEND_LOCK_DIR"

#: xen/include/public/xen.h: domids from here on (DOMID_SELF, DOMID_IO...) are
#: not ordinary domains; DOMID_SELF would make a domctl act on dom0 itself.
DOMID_FIRST_RESERVED: Final = 0x7FF0

#: XEN_SYSCTL_PHYSCAP_* (xen/sysctl.h) bit -> the name ``xl info`` gives it in
#: ``virt_caps`` (tools/xl/xl_info.c).
PHYSCAP_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        0: "hvm",
        1: "pv",
        2: "directio",
        3: "hap",
        4: "shadow",
        5: "iommu_hap_pt_share",
        6: "vmtrace",
        7: "vpmu",
        8: "gnttab-v1",
        9: "gnttab-v2",
    }
)

# --------------------------------------------------------------------------
# Declarations.  Each block names the header it mirrors.  The typedef and
# function blocks are compiled verbatim after the real headers by the tests
# (C11 accepts an identical typedef twice; an incompatible prototype is a hard
# error), the struct and enum blocks are compared by size/offset/value.
# --------------------------------------------------------------------------

#: Opaque handles and scalar typedefs (xenctrl.h, xenevtchn.h, xentoollog.h,
#: xen/xen.h, xen/event_channel.h, xen/domctl.h).
CDEF_TYPEDEFS: Final = """
typedef struct xc_interface_core xc_interface;
typedef struct xenevtchn_handle xenevtchn_handle;
typedef struct xentoollog_logger xentoollog_logger;
typedef uint16_t domid_t;
typedef uint32_t evtchn_port_t;
typedef int xenevtchn_port_or_error_t;
typedef uint8_t xen_domain_handle_t[16];
typedef struct xen_domctl_getdomaininfo xen_domctl_getdomaininfo_t;
typedef xen_domctl_getdomaininfo_t xc_domaininfo_t;
typedef struct xen_sysctl_physinfo xc_physinfo_t;
"""

#: xentoollog.h: the levels a logger is called with.
CDEF_ENUMS: Final = """
typedef enum xentoollog_level {
    XTL_NONE, XTL_DEBUG, XTL_VERBOSE, XTL_DETAIL, XTL_PROGRESS, XTL_INFO,
    XTL_NOTICE, XTL_WARN, XTL_ERROR, XTL_CRITICAL, XTL_NUM_LEVELS
} xentoollog_level;
"""

#: Struct layouts.  ``va_list`` is declared ``void *``: cffi has no va_list,
#: and on x86_64 (SysV) va_list is an array type, so as a parameter it is a
#: pointer -- which we only hand on to vsnprintf().  uint64_aligned_t is plain
#: uint64_t for tools on x86 (xen/xen.h).  xc_domaininfo_t is used rather than
#: xc_dominfo_t, which has bitfields cffi cannot lay out in ABI mode.
CDEF_STRUCTS: Final = """
struct xentoollog_logger {
    void (*vmessage)(struct xentoollog_logger *logger, xentoollog_level level,
                     int errnoval, const char *context, const char *format,
                     void *al);
    void (*progress)(struct xentoollog_logger *logger, const char *context,
                     const char *doing_what, int percent,
                     unsigned long done, unsigned long total);
    void (*destroy)(struct xentoollog_logger *logger);
};
struct xen_arch_domainconfig {
    uint32_t emulation_flags;
    uint32_t misc_flags;
};
struct xen_domctl_getdomaininfo {
    domid_t  domain;
    uint16_t pad1;
    uint32_t flags;
    uint64_t tot_pages;
    uint64_t max_pages;
    uint64_t outstanding_pages;
    uint64_t shr_pages;
    uint64_t paged_pages;
    uint64_t shared_info_frame;
    uint64_t cpu_time;
    uint32_t nr_online_vcpus;
    uint32_t max_vcpu_id;
    uint32_t ssidref;
    xen_domain_handle_t handle;
    uint32_t cpupool;
    uint8_t  gpaddr_bits;
    uint8_t  pad2[7];
    struct xen_arch_domainconfig arch_config;
};
struct xen_sysctl_physinfo {
    uint32_t threads_per_core;
    uint32_t cores_per_socket;
    uint32_t nr_cpus;
    uint32_t max_cpu_id;
    uint32_t nr_nodes;
    uint32_t max_node_id;
    uint32_t cpu_khz;
    uint32_t capabilities;
    uint32_t arch_capabilities;
    uint32_t pad;
    uint64_t total_pages;
    uint64_t free_pages;
    uint64_t scrub_pages;
    uint64_t outstanding_pages;
    uint64_t max_mfn;
    uint32_t hw_cap[8];
};
"""

#: Functions, by the library that exports them.  xc_domain_resume is in
#: libxenguest, not libxenctrl.  The xtl_* functions drive a logger through
#: libxentoollog itself (the tests use them to call XtlLogger as libxc does).
CDEF_FUNCTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "xenctrl": """
xc_interface *xc_interface_open(xentoollog_logger *logger,
                                xentoollog_logger *dombuild_logger,
                                unsigned open_flags);
int xc_interface_close(xc_interface *xch);
int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain,
                          unsigned int max_domains, xc_domaininfo_t *info);
int xc_domain_pause(xc_interface *xch, uint32_t domid);
int xc_domain_unpause(xc_interface *xch, uint32_t domid);
int xc_domain_shutdown(xc_interface *xch, uint32_t domid, int reason);
int xc_domain_destroy(xc_interface *xch, uint32_t domid);
int xc_hvm_param_set(xc_interface *handle, uint32_t dom, uint32_t param,
                     uint64_t value);
int xc_hvm_param_get(xc_interface *handle, uint32_t dom, uint32_t param,
                     uint64_t *value);
int xc_domain_subscribe_for_suspend(xc_interface *xch, uint32_t domid,
                                    evtchn_port_t port);
int xc_version(xc_interface *xch, int cmd, void *arg);
int xc_physinfo(xc_interface *xch, xc_physinfo_t *info);
""",
        "xenguest": """
int xc_domain_resume(xc_interface *xch, uint32_t domid, int fast);
""",
        "xenevtchn": """
xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger,
                                 unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce,
                                                     uint32_t domid,
                                                     evtchn_port_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);
""",
        "xentoollog": """
void xtl_log(struct xentoollog_logger *logger, xentoollog_level level,
             int errnoval, const char *context, const char *format, ...);
void xtl_progress(struct xentoollog_logger *logger, const char *context,
                  const char *doing_what, unsigned long done,
                  unsigned long total);
void xtl_logger_destroy(struct xentoollog_logger *logger);
""",
    }
)

#: From libc, to format a vmessage's (format, va_list) the way xtl's own
#: stdiostream logger does (va_list as ``void *``, see CDEF_STRUCTS).
CDEF_LIBC: Final = """
int vsnprintf(char *str, size_t size, const char *format, void *ap);
"""

#: The cffi types of the logger's three callbacks (struct xentoollog_logger).
_VMESSAGE_T: Final = (
    "void(*)(struct xentoollog_logger *, xentoollog_level, int, const char *, const char *, void *)"
)
_PROGRESS_T: Final = (
    "void(*)(struct xentoollog_logger *, const char *, const char *, int,"
    " unsigned long, unsigned long)"
)
_DESTROY_T: Final = "void(*)(struct xentoollog_logger *)"


def cdef_source() -> str:
    """Every declaration handed to ``FFI.cdef``, in order."""
    return CDEF_TYPEDEFS + CDEF_ENUMS + CDEF_STRUCTS + "".join(CDEF_FUNCTIONS.values()) + CDEF_LIBC


def get_ffi() -> Any:
    """The module's ``cffi.FFI`` (ABI mode): the type tables of
    :func:`cdef_source`, parsed ahead of time by ``tools/gen_ffi.py``
    (cffi's out-of-line ABI mode), so a process pays no pycparser import and
    no parse.  Nothing is compiled and nothing is loaded here: the libraries
    are ``dlopen``\\ ed by :func:`load_libraries`."""
    from torpor.hypervisor._ffi_xenctrl import ffi

    return ffi


class XenLibraries:
    """The loaded libraries, one cffi ``Lib`` each, plus libc.

    :ivar ffi: the shared ``cffi.FFI``.
    :ivar xenctrl: libxenctrl.  :ivar xenguest: libxenguest.
    :ivar xenevtchn: libxenevtchn.  :ivar xentoollog: libxentoollog.
    :ivar libc: the C library (for ``vsnprintf``).
    """

    def __init__(
        self, *, ffi: Any, xenctrl: Any, xenguest: Any, xenevtchn: Any, xentoollog: Any, libc: Any
    ) -> None:
        self.ffi = ffi
        self.xenctrl = xenctrl
        self.xenguest = xenguest
        self.xenevtchn = xenevtchn
        self.xentoollog = xentoollog
        self.libc = libc


def load_libraries(sonames: Mapping[str, str] = SONAMES) -> XenLibraries:
    """``dlopen`` Xen's libraries by soname.

    :raises BackendUnavailable: naming the library that could not be loaded.
    """
    ffi = get_ffi()
    libs: dict[str, Any] = {}
    for key in ("xentoollog", "xenctrl", "xenguest", "xenevtchn"):
        soname = sonames[key]
        try:
            libs[key] = ffi.dlopen(soname)
        except OSError as e:
            raise BackendUnavailable(
                f"Xen library {soname} not found ({e}); the xenctrl backend needs "
                "Xen 4.17's tools libraries (Debian: libxenmisc4.17, libxenevtchn1, "
                "libxentoollog1)",
                cause=e,
            ) from e
    # dlopen(NULL): the process's global namespace, which has libc.
    libc = ffi.dlopen(None)
    return XenLibraries(
        ffi=ffi,
        xenctrl=libs["xenctrl"],
        xenguest=libs["xenguest"],
        xenevtchn=libs["xenevtchn"],
        xentoollog=libs["xentoollog"],
        libc=libc,
    )


# --------------------------------------------------------------------------
# The logger
# --------------------------------------------------------------------------


class XtlLevel:
    """``xentoollog_level`` values (xentoollog.h)."""

    NONE: Final = 0
    DEBUG: Final = 1
    VERBOSE: Final = 2
    DETAIL: Final = 3
    PROGRESS: Final = 4
    INFO: Final = 5
    NOTICE: Final = 6
    WARN: Final = 7
    ERROR: Final = 8
    CRITICAL: Final = 9
    NUM_LEVELS: Final = 10


_XTL_TO_LOGGING: Final[Mapping[int, int]] = MappingProxyType(
    {
        XtlLevel.DEBUG: logging.DEBUG,
        XtlLevel.VERBOSE: logging.DEBUG,
        XtlLevel.DETAIL: logging.DEBUG,
        XtlLevel.PROGRESS: logging.INFO,
        XtlLevel.INFO: logging.INFO,
        XtlLevel.NOTICE: logging.INFO,
        XtlLevel.WARN: logging.WARNING,
        XtlLevel.ERROR: logging.ERROR,
        XtlLevel.CRITICAL: logging.CRITICAL,
    }
)

#: libxc's messages fit in XC_MAX_ERROR_MSG_LEN (1024) plus a short suffix
#: (xc_private.c, xc_reportv); longer ones are cut and marked.
_MSG_BUFLEN: Final = 4096
_CONTEXT_RE: Final = re.compile(r"[^A-Za-z0-9_-]")


class XtlLogger:
    """A ``xentoollog_logger`` whose vmessage/progress/destroy forward to
    :mod:`logging`.

    Records go to ``<name>.<context>`` (``torpor.hypervisor.xenctrl.xc``,
    ``...xencall``...), at the level mapped from ``xentoollog_level``, with
    ``: strerror(errnoval)`` appended when libxc passed an errno, as xtl's
    stdiostream logger does.  Records carry ``xtl_level``, ``xtl_errno`` and
    ``xtl_context`` attributes.

    The struct and its callbacks must outlive every handle opened with it:
    keep this object referenced until after ``xc_interface_close``.
    Exceptions inside a callback never reach C or stderr (cffi's ``onerror``);
    they are counted in :attr:`callback_errors`.
    """

    def __init__(self, libs: XenLibraries, name: str = __name__) -> None:
        ffi = libs.ffi
        self._ffi = ffi
        self._vsnprintf = libs.libc.vsnprintf
        self._base = logging.getLogger(name)
        self._children: dict[str, logging.Logger] = {}
        self.callback_errors = 0
        self.destroyed = False
        #: The last message at XTL_ERROR or above, for error reports.
        self.last_error: str | None = None
        self._vmessage_cb = ffi.callback(_VMESSAGE_T, self._vmessage, onerror=self._onerror)
        self._progress_cb = ffi.callback(_PROGRESS_T, self._progress, onerror=self._onerror)
        self._destroy_cb = ffi.callback(_DESTROY_T, self._destroy, onerror=self._onerror)
        self._struct = ffi.new("struct xentoollog_logger *")
        self._struct.vmessage = self._vmessage_cb
        self._struct.progress = self._progress_cb
        self._struct.destroy = self._destroy_cb

    @property
    def ptr(self) -> Any:
        """The ``xentoollog_logger *`` to hand to libxc."""
        return self._struct

    def _child(self, context: Any) -> tuple[str, logging.Logger]:
        if context == self._ffi.NULL:
            ctx = "xen"
        else:
            ctx = _CONTEXT_RE.sub("_", self._ffi.string(context).decode("ascii", "replace"))
        log = self._children.get(ctx)
        if log is None:
            log = self._children[ctx] = self._base.getChild(ctx or "xen")
        return ctx, log

    def _vmessage(
        self, _logger: Any, level: int, errnoval: int, context: Any, fmt: Any, al: Any
    ) -> None:
        ctx, log = self._child(context)
        pylevel = _XTL_TO_LOGGING.get(level, logging.ERROR)
        if not log.isEnabledFor(pylevel) and level < XtlLevel.ERROR:
            return  # don't pay for vsnprintf on a message nobody reads
        buf = self._ffi.new("char[]", _MSG_BUFLEN)
        # The va_list is consumed once, here (no va_copy needed).
        n = self._vsnprintf(buf, _MSG_BUFLEN, fmt, al)
        text = self._ffi.string(buf).decode("utf-8", "replace").rstrip("\n")
        if n >= _MSG_BUFLEN:
            text += " [truncated]"
        if errnoval >= 0:
            text = f"{text}: {os.strerror(errnoval)}"
        if level >= XtlLevel.ERROR:
            self.last_error = f"{ctx}: {text}"
        log.log(
            pylevel,
            "%s",
            text,
            extra={"xtl_level": level, "xtl_errno": errnoval, "xtl_context": ctx},
        )

    def _progress(
        self, _logger: Any, context: Any, doing_what: Any, percent: int, done: int, total: int
    ) -> None:
        ctx, log = self._child(context)
        what = ""
        if doing_what != self._ffi.NULL:
            what = self._ffi.string(doing_what).decode("utf-8", "replace")
        log.info(
            "%s: %d%% (%d/%d)",
            what,
            percent,
            done,
            total,
            extra={"xtl_level": XtlLevel.PROGRESS, "xtl_errno": -1, "xtl_context": ctx},
        )

    def _destroy(self, _logger: Any) -> None:
        # xc_interface_close only destroys loggers libxc created itself
        # (error_handler_tofree, xc_private.c); ours is freed by Python.
        self.destroyed = True

    def _onerror(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.callback_errors += 1
        # Nothing may escape into C, nor onto stderr.
        with contextlib.suppress(Exception):
            _log.error("xentoollog callback failed: %r", exc, exc_info=(exc_type, exc, tb))


# --------------------------------------------------------------------------
# The suspend event channel lock
# --------------------------------------------------------------------------

_held_guard = threading.Lock()
_held_paths: set[str] = set()


def default_lock_dir() -> str:
    """``$TORPOR_SUSPEND_LOCK_DIR``, else XEN_RUN_DIR (``/var/run/xen``)."""
    return os.environ.get(LOCK_DIR_ENV) or XEN_RUN_DIR


def _lock_holder(st: os.stat_result) -> int | None:
    """The pid holding a POSIX lock on the file ``st`` describes (/proc/locks)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: POSIX  ADVISORY  WRITE 1234 08:01:131 0 0"; waiters have "->".
        if len(fields) >= 6 and fields[1] == "POSIX" and fields[5] == want:
            try:
                return int(fields[4])
            except ValueError:
                return None
    return None


class SuspendEvtchnLock:
    """libxenguest's per-domain suspend event channel lock.

    ``xc_suspend_evtchn_init_exclusive`` (tools/libs/guest/xg_suspend.c,
    ``lock_suspend_event``) takes it before binding and subscribing a domain's
    suspend event channel, so that two toolstacks (libxl/xl and torpor) never
    subscribe the same domain -- XEN_DOMCTL_subscribe silently displaces the
    earlier subscriber.  The protocol, followed exactly so libxl sees our lock
    and we see its:

    * open ``<XEN_RUN_DIR>/suspend-evtchn-<domid>.lock`` with
      ``O_CREAT | O_RDWR``, mode 0600, close-on-exec;
    * ``fcntl(F_SETLK)`` a write lock on byte 0 (length 1), non-blocking --
      not ``O_EXCL``: a file left by a dead holder carries no lock and is
      simply taken over;
    * re-``stat`` the path: if it is gone or is another inode, the previous
      holder unlinked it between our open and our lock; start again;
    * release: unlink the file, then close the descriptor.

    POSIX record locks do not conflict within one process, so holders in this
    process are also tracked here: a second holder in the same process is
    refused too.  Use it around bind + subscribe ... unbind::

        with hv.suspend_evtchn_lock(domid):
            local = hv.evtchn_bind_interdomain(domid, guest_port)
            hv.evtchn_subscribe(domid, guest_port)
            ...

    :raises HypervisorError: ``errno=EBUSY`` when another holder has it (the
        message names the pid when /proc/locks shows it); the open's errno
        when the lock directory is missing or unwritable.
    """

    #: libxl's retry loop is unbounded; an unlink race resolves in one or two.
    MAX_ATTEMPTS: Final = 100

    def __init__(self, domid: int, lock_dir: str | None = None) -> None:
        self.domid = _check_domid(domid)
        self.path = os.path.join(
            lock_dir if lock_dir is not None else default_lock_dir(),
            f"suspend-evtchn-{self.domid}.lock",
        )
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def _busy(self, holder: str) -> HypervisorError:
        return HypervisorError(
            f"suspend event channel of domain {self.domid} is locked by {holder} "
            f"({self.path}); another toolstack is suspending this domain",
            errno=_errno.EBUSY,
            op="suspend_evtchn_lock",
            domid=self.domid,
        )

    def _oserror(self, what: str, e: OSError) -> HypervisorError:
        code = e.errno or _errno.EIO
        return HypervisorError(
            f"suspend event channel lock of domain {self.domid}: cannot {what} "
            f"{self.path}: {errno_name(code)} ({os.strerror(code)})",
            errno=code,
            op="suspend_evtchn_lock",
            domid=self.domid,
            cause=e,
        )

    def acquire(self) -> None:
        """Take the lock without waiting."""
        if self._fd is not None:
            raise self._busy("this object already")
        with _held_guard:
            if self.path in _held_paths:
                raise self._busy(f"this process (pid {os.getpid()})")
            _held_paths.add(self.path)
        try:
            self._fd = self._lock_file()
        except BaseException:
            with _held_guard:
                _held_paths.discard(self.path)
            raise

    def _lock_file(self) -> int:
        for _ in range(self.MAX_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise self._oserror("create", e) from e
            try:
                try:
                    # struct flock {F_WRLCK, SEEK_SET, start 0, len 1} + F_SETLK
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
                except OSError as e:
                    if e.errno in (_errno.EAGAIN, _errno.EACCES):
                        pid = _lock_holder(os.fstat(fd))
                        raise self._busy(
                            f"pid {pid}" if pid is not None else "another process"
                        ) from e
                    raise self._oserror("lock", e) from e
                ours = os.fstat(fd)
                try:
                    theirs = os.stat(self.path)
                except FileNotFoundError:
                    os.close(fd)
                    continue  # the holder unlinked it as we locked: retry
                if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino):
                    os.close(fd)
                    continue  # replaced by a new holder's file: retry
                return fd
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
        raise HypervisorError(
            f"suspend event channel lock of domain {self.domid}: {self.path} kept "
            f"changing under us ({self.MAX_ATTEMPTS} attempts)",
            errno=_errno.EAGAIN,
            op="suspend_evtchn_lock",
            domid=self.domid,
        )

    def release(self) -> None:
        """Unlink the lock file, then close it (the order libxenguest uses, so a
        waiter that locked the old inode notices and retries).  Idempotent."""
        fd = self._fd
        if fd is None:
            return
        self._fd = None
        try:
            os.unlink(self.path)
        except OSError as e:
            _log.warning("suspend event channel lock %s: unlink failed: %s", self.path, e)
        finally:
            os.close(fd)
            with _held_guard:
                _held_paths.discard(self.path)

    def __enter__(self) -> SuspendEvtchnLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<SuspendEvtchnLock {self.path} {'held' if self.held else 'free'}>"


# --------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------


def _check_domid(domid: int, *, allow_reserved_bound: bool = False) -> int:
    limit = DOMID_FIRST_RESERVED + (1 if allow_reserved_bound else 0)
    if isinstance(domid, bool) or not isinstance(domid, int) or not 0 <= domid < limit:
        raise UsageError(
            f"invalid domid {domid!r}: an ordinary domain id is 0..{DOMID_FIRST_RESERVED - 1} "
            "(xen/include/public/xen.h, DOMID_FIRST_RESERVED)"
        )
    return domid


def _check_uint(what: str, value: int, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise UsageError(f"invalid {what} {value!r}: expected an unsigned {bits}-bit integer")
    return value


class XenctrlHypervisor:
    """The :class:`~torpor.hypervisor.Hypervisor` of a real dom0.

    Opens an ``xc_interface`` (``xc_interface_open(logger, logger, 0)``, never
    ``XC_OPENFLAG_DUMMY``) with an :class:`XtlLogger`; the event channel handle
    (``xenevtchn_open``) is opened on first use and its descriptor made
    non-blocking, as libxl does, so :meth:`evtchn_pending` never blocks.

    :param sonames: the libraries to load (default :data:`SONAMES`).
    :param privcmd_paths: device nodes one of which must exist for Xen to be
        here (default :data:`PRIVCMD_PATHS`); ``()`` skips the check and lets
        ``xc_interface_open`` find out.
    :param lock_dir: where :meth:`suspend_evtchn_lock` puts its lock files
        (default ``$TORPOR_SUSPEND_LOCK_DIR`` or ``/var/run/xen``).
    :raises BackendUnavailable: a library is missing, there is no privcmd
        device, or ``xc_interface_open`` failed (ENOENT: no Xen hypervisor
        here; EACCES/EPERM: not root in dom0).

    Handles belong to the process that opened them (xenctrl.h: after fork a
    child must open its own); calls from a forked child raise
    :class:`~torpor.errors.UsageError`.
    """

    name = "xenctrl"

    def __init__(
        self,
        *,
        sonames: Mapping[str, str] = SONAMES,
        privcmd_paths: Sequence[str] = PRIVCMD_PATHS,
        lock_dir: str | None = None,
    ) -> None:
        self._xch: Any = None
        self._xce: Any = None
        self._evtchn_fd: int | None = None
        self._lock = threading.Lock()
        self._lock_dir = lock_dir
        self._pid = os.getpid()
        libs = load_libraries(sonames)
        if privcmd_paths and not any(os.path.exists(p) for p in privcmd_paths):
            raise BackendUnavailable(
                "no Xen hypervisor here: "
                + " and ".join(privcmd_paths)
                + " are absent (not a Xen dom0, or the xen-privcmd driver / xenfs on "
                "/proc/xen is not loaded)"
            )
        self._libs = libs
        self._ffi = libs.ffi
        self._logger = XtlLogger(libs)
        # open_flags 0: a real handle.  XC_OPENFLAG_DUMMY would give one with
        # no xencall handle, on which any call dereferences NULL (xc_private.c).
        xch = libs.xenctrl.xc_interface_open(self._logger.ptr, self._logger.ptr, 0)
        if xch == self._ffi.NULL:
            code = self._ffi.errno
            detail = f" ({self._logger.last_error})" if self._logger.last_error else ""
            what = f"xc_interface_open failed with {errno_name(code)} ({os.strerror(code)})"
            if code == _errno.ENOENT:
                msg = f"no Xen hypervisor here: {what}{detail}"
            elif code in (_errno.EACCES, _errno.EPERM):
                msg = f"cannot open the Xen control interface: {what}{detail}; run as root in dom0"
            else:
                msg = f"cannot open the Xen control interface: {what}{detail}"
            raise BackendUnavailable(msg)
        self._xch = xch

    # -- plumbing ----------------------------------------------------------

    def _handle(self) -> Any:
        if self._xch is None:
            raise HypervisorError(
                "hypervisor backend xenctrl: the xc interface is closed", errno=_errno.EBADF
            )
        if os.getpid() != self._pid:
            raise UsageError(
                f"xc interface opened by pid {self._pid} used in pid {os.getpid()}: "
                "after fork a child must open its own (xenctrl.h)"
            )
        return self._xch

    def _fail(self, rc: int, op: str, domid: int | None) -> HypervisorError:
        # libxc returns -1 and sets errno; a few paths return -errno instead.
        code = self._ffi.errno
        if not code:
            code = -rc if rc < -1 else _errno.EIO
        err: HypervisorError = HypervisorError.from_errno(code, op=op, domid=domid)
        return err

    def _check(self, rc: int, op: str, domid: int | None) -> int:
        if rc < 0:
            raise self._fail(rc, op, domid)
        return rc

    # -- domain info -------------------------------------------------------

    def _decode(self, info: Any) -> DomainInfo:
        return DomainInfo(
            domid=int(info.domain),
            flags=int(info.flags),
            uuid=str(uuid.UUID(bytes=bytes(self._ffi.buffer(info.handle)))),
            tot_pages=int(info.tot_pages),
            max_pages=int(info.max_pages),
            cpu_time=int(info.cpu_time),
            nr_online_vcpus=int(info.nr_online_vcpus),
            max_vcpu_id=int(info.max_vcpu_id),
            emulation_flags=int(info.arch_config.emulation_flags),
        )

    def domain_info_list(self, first_domid: int = 0, max_domains: int = 1024) -> list[DomainInfo]:
        """``xc_domain_getinfolist``: up to ``max_domains`` domains with
        domid >= ``first_domid``, in domid order, with the raw XEN_DOMINF_* word."""
        xch = self._handle()
        _check_domid(first_domid, allow_reserved_bound=True)
        _check_uint("max_domains", max_domains, 31)
        if max_domains == 0:
            return []
        buf = self._ffi.new("xc_domaininfo_t[]", max_domains)
        n = self._check(
            self._libs.xenctrl.xc_domain_getinfolist(xch, first_domid, max_domains, buf),
            "domain_info_list",
            None,
        )
        return [self._decode(buf[i]) for i in range(min(n, max_domains))]

    def domain_info(self, domid: int) -> DomainInfo:
        """One domain's info; ``ESRCH`` if it does not exist.

        ``xc_domain_getinfolist(domid, 1)`` returns the next existing domain
        when ``domid`` is gone, so the domid is checked."""
        xch = self._handle()
        _check_domid(domid)
        buf = self._ffi.new("xc_domaininfo_t[1]")
        n = self._check(
            self._libs.xenctrl.xc_domain_getinfolist(xch, domid, 1, buf), "domain_info", domid
        )
        if n < 1 or buf[0].domain != domid:
            raise HypervisorError.from_errno(_errno.ESRCH, op="domain_info", domid=domid)
        return self._decode(buf[0])

    # -- domain control ----------------------------------------------------

    def pause(self, domid: int) -> None:
        """``xc_domain_pause`` (XEN_DOMCTL_pausedomain)."""
        xch = self._handle()
        self._check(self._libs.xenctrl.xc_domain_pause(xch, _check_domid(domid)), "pause", domid)

    def unpause(self, domid: int) -> None:
        """``xc_domain_unpause`` (XEN_DOMCTL_unpausedomain)."""
        xch = self._handle()
        self._check(
            self._libs.xenctrl.xc_domain_unpause(xch, _check_domid(domid)), "unpause", domid
        )

    def shutdown(self, domid: int, reason: ShutdownReason) -> None:
        """``xc_domain_shutdown(domid, SHUTDOWN_*)``: shut the domain down from
        outside (SCHEDOP_remote_shutdown); the hard suspend path uses
        SHUTDOWN_suspend."""
        xch = self._handle()
        code = _check_uint("shutdown reason", int(reason), 8)
        self._check(
            self._libs.xenctrl.xc_domain_shutdown(xch, _check_domid(domid), code),
            "shutdown",
            domid,
        )

    def resume(self, domid: int, *, fast: bool) -> None:
        """``xc_domain_resume`` (libxenguest, tools/libs/guest/xg_resume.c).

        ``fast=True``: cooperative -- EINVAL unless the domain is shut down with
        reason suspend; sets vCPU0 eax = 1 so the guest's SCHEDOP_shutdown
        returns 1, then XEN_DOMCTL_resumedomain.  ``fast=False``: the guest
        believes it woke in a new domain (PV: start_info MFNs rewritten,
        vCPUs 1..n reset)."""
        xch = self._handle()
        self._check(
            self._libs.xenguest.xc_domain_resume(xch, _check_domid(domid), 1 if fast else 0),
            "resume",
            domid,
        )

    def destroy(self, domid: int) -> None:
        """``xc_domain_destroy`` (XEN_DOMCTL_destroydomain, retried on EAGAIN by libxc)."""
        xch = self._handle()
        self._check(
            self._libs.xenctrl.xc_domain_destroy(xch, _check_domid(domid)), "destroy", domid
        )

    def virt_caps(self) -> frozenset[str]:
        """``xc_physinfo``'s capabilities, named as ``xl info``'s ``virt_caps``
        (``pv``, ``hvm``, ``hap``, ``shadow``, ...)."""
        xch = self._handle()
        info = self._ffi.new("xc_physinfo_t *")
        self._check(self._libs.xenctrl.xc_physinfo(xch, info), "physinfo", None)
        caps = int(info.capabilities)
        return frozenset(name for bit, name in PHYSCAP_NAMES.items() if caps >> bit & 1)

    def get_hvm_param(self, domid: int, param: int) -> int:
        """``xc_hvm_param_get`` (HVMOP_get_param); EINVAL for a PV domain."""
        xch = self._handle()
        out = self._ffi.new("uint64_t *")
        self._check(
            self._libs.xenctrl.xc_hvm_param_get(
                xch, _check_domid(domid), _check_uint("HVM param", param, 32), out
            ),
            "get_hvm_param",
            domid,
        )
        return int(out[0])

    def set_hvm_param(self, domid: int, param: int, value: int) -> None:
        """``xc_hvm_param_set`` (HVMOP_set_param)."""
        xch = self._handle()
        self._check(
            self._libs.xenctrl.xc_hvm_param_set(
                xch,
                _check_domid(domid),
                _check_uint("HVM param", param, 32),
                _check_uint("HVM param value", value, 64),
            ),
            "set_hvm_param",
            domid,
        )

    # -- the suspend event channel ----------------------------------------

    def suspend_evtchn_lock(self, domid: int) -> SuspendEvtchnLock:
        """libxl's per-domain suspend event channel lock (not yet taken): use it
        as a context manager around bind/subscribe ... unbind."""
        return SuspendEvtchnLock(domid, self._lock_dir)

    def _evtchn(self) -> Any:
        self._handle()
        with self._lock:
            if self._xce is not None:
                return self._xce
            lib = self._libs.xenevtchn
            xce = lib.xenevtchn_open(self._logger.ptr, 0)
            if xce == self._ffi.NULL:
                code = self._ffi.errno
                if code == _errno.ENOENT:
                    raise BackendUnavailable(
                        f"no Xen event channel device: {EVTCHN_PATH} is absent "
                        "(the xen-evtchn driver is not loaded)"
                    )
                raise HypervisorError.from_errno(code or _errno.EIO, op="evtchn_open")
            fd = lib.xenevtchn_fd(xce)
            if fd < 0:
                err = self._fail(fd, "evtchn_fd", None)
                lib.xenevtchn_close(xce)
                raise err
            # xenevtchn_pending() is a read() of this fd (tools/libs/evtchn/
            # linux.c): non-blocking, as libxl sets it, it answers EAGAIN
            # instead of sleeping when nothing is pending.
            os.set_blocking(fd, False)
            self._xce = xce
            self._evtchn_fd = fd
            return xce

    def evtchn_bind_interdomain(self, domid: int, remote_port: int) -> int:
        """``xenevtchn_bind_interdomain``: bind a local port to the guest's
        ``remote_port``; returns the local port.

        Xen marks the new local port pending straight away (lost notifications
        on the remote unbound port are made up for; xc_suspend_evtchn_init_
        exclusive waits for that event once): expect one event that is not a
        suspend, and re-check the domain's state on every event."""
        xce = self._evtchn()
        port = self._libs.xenevtchn.xenevtchn_bind_interdomain(
            xce, _check_domid(domid), _check_uint("event channel port", remote_port, 32)
        )
        return self._check(port, "evtchn_bind_interdomain", domid)

    def evtchn_notify(self, local_port: int) -> None:
        """``xenevtchn_notify``: signal the remote end of ``local_port``."""
        xce = self._evtchn()
        self._check(
            self._libs.xenevtchn.xenevtchn_notify(
                xce, _check_uint("event channel port", local_port, 32)
            ),
            "evtchn_notify",
            None,
        )

    def evtchn_unbind(self, local_port: int) -> None:
        """``xenevtchn_unbind``: close ``local_port``."""
        xce = self._evtchn()
        self._check(
            self._libs.xenevtchn.xenevtchn_unbind(
                xce, _check_uint("event channel port", local_port, 32)
            ),
            "evtchn_unbind",
            None,
        )

    def evtchn_subscribe(self, domid: int, port: int) -> None:
        """``xc_domain_subscribe_for_suspend`` (XEN_DOMCTL_subscribe) with the
        guest's ``port``; ``port=0`` unsubscribes.  Take
        :meth:`suspend_evtchn_lock` first: a later subscriber displaces the
        earlier one without telling it."""
        xch = self._handle()
        self._check(
            self._libs.xenctrl.xc_domain_subscribe_for_suspend(
                xch, _check_domid(domid), _check_uint("event channel port", port, 32)
            ),
            "evtchn_subscribe",
            domid,
        )

    def evtchn_fileno(self) -> int:
        """``xenevtchn_fd``: readable while a bound port has an event pending."""
        self._evtchn()
        assert self._evtchn_fd is not None
        return self._evtchn_fd

    def evtchn_pending(self) -> int | None:
        """``xenevtchn_pending``: the next port with an event, or ``None``."""
        xce = self._evtchn()
        port = self._libs.xenevtchn.xenevtchn_pending(xce)
        if port < 0:
            if self._ffi.errno in (_errno.EAGAIN, _errno.EWOULDBLOCK):
                return None
            raise self._fail(port, "evtchn_pending", None)
        return int(port)

    def evtchn_unmask(self, local_port: int) -> None:
        """``xenevtchn_unmask``: re-arm ``local_port``."""
        xce = self._evtchn()
        self._check(
            self._libs.xenevtchn.xenevtchn_unmask(
                xce, _check_uint("event channel port", local_port, 32)
            ),
            "evtchn_unmask",
            None,
        )

    # -- lifetime ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._xch is None

    def close(self) -> None:
        """``xenevtchn_close`` and ``xc_interface_close``.  Idempotent; a
        failure to close is logged, not raised (the handle is gone either way)."""
        with self._lock:
            xce, self._xce, self._evtchn_fd = self._xce, None, None
            xch, self._xch = self._xch, None
        if os.getpid() != self._pid:
            return  # a forked child must not touch its parent's handles
        if xce is not None and self._libs.xenevtchn.xenevtchn_close(xce) < 0:
            _log.warning("xenevtchn_close failed: %s", errno_name(self._ffi.errno))
        if xch is not None and self._libs.xenctrl.xc_interface_close(xch) < 0:
            _log.warning("xc_interface_close failed: %s", errno_name(self._ffi.errno))

    def xen_version(self) -> str:
        """The hypervisor's version, ``4.17.7``: ``xc_version(XENVER_version)`` gives
        major << 16 | minor, ``XENVER_extraversion`` the rest (xen/version.h)."""
        xch = self._handle()
        with self._lock:
            rc = self._libs.xenctrl.xc_version(xch, XENVER_VERSION, self._ffi.NULL)
            self._check(rc, "xc_version", None)
            extra = self._ffi.new("char[]", XEN_EXTRAVERSION_LEN)
            self._check(
                self._libs.xenctrl.xc_version(xch, XENVER_EXTRAVERSION, extra),
                "xc_version",
                None,
            )
        suffix = self._ffi.string(extra, XEN_EXTRAVERSION_LEN).decode(errors="replace")
        return f"{rc >> 16}.{rc & 0xFFFF}{suffix}"

    def __enter__(self) -> XenctrlHypervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<XenctrlHypervisor {'closed' if self.closed else 'open'}>"


if TYPE_CHECKING:
    # mypy --strict proves the class satisfies the Protocol.
    def _conforms(h: XenctrlHypervisor) -> Hypervisor:
        return h

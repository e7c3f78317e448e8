"""libxenlight (libxl 4.17) and libxenguest's ``xc_domain_save``, through cffi in ABI mode.

What torpor's real-Xen domain builder (:mod:`torpor.xl`) needs and nothing
more:

* :class:`Libxl` -- a ``libxl_ctx`` (``libxl_ctx_alloc`` with the same
  Python ``xentoollog`` logger the xenctrl backend uses, so nothing reaches
  stderr) and, all synchronous (``ao_how`` NULL):
  ``libxl_retrieve_domain_configuration`` + ``libxl_domain_config_to_json``
  (the config ``xl save`` puts in the file), ``libxl_domain_config_from_json``
  + ``libxl_domain_create_restore`` (what ``xl restore`` does),
  ``libxl_domain_unpause`` (device model ``cont``, then the domain) and
  ``libxl_domain_destroy`` (domain, xenstore tree, backends, device model).
  libxl forks helpers (``libxl-save-helper`` for a restore, hotplug scripts,
  QEMU); the context is put in ``libxl_sigchld_owner_libxl_always_selective_reap``
  mode, so libxl reaps its own children only and leaves the rest of the
  process's alone.
* :func:`domain_save` -- ``xc_domain_save`` (non-live, ``XC_STREAM_PLAIN``)
  on a descriptor, on an ``xc_interface`` of its own, with a Python
  ``suspend`` callback: libxenguest calls it from the thread that called
  ``xc_domain_save`` once it is ready for the guest's memory, and requires
  it to return non-zero with the domain then shut down for suspend
  (xg_sr_save.c, ``suspend_domain``).

Nothing is loaded at import time.  The declarations mirror Debian's Xen 4.17
headers (``libxl.h``, ``_libxl_types.h``, ``libxl_event.h``,
``xenguest.h``); ``tests/test_xl_save.py`` compiles them against those
headers and compares every size and offset, including
:data:`LIBXL_DOMAIN_CONFIG_SIZE` (the struct is opaque here: only libxl
touches its fields).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import logging
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from torpor.errors import BackendUnavailable, HypervisorError, errno_name
from torpor.hypervisor import xenctrl
from torpor.model import PrecopyStats

__all__ = [
    "CDEF_FUNCTIONS",
    "CDEF_STRUCTS",
    "CDEF_TYPEDEFS",
    "LIBXL_DOMAIN_CONFIG_SIZE",
    "SONAMES",
    "Libxl",
    "cdef_source",
    "domain_save",
    "get_ffi",
    "libxl_error_name",
]

_log = logging.getLogger(__name__)

SONAMES: Final[Mapping[str, str]] = MappingProxyType(
    {**xenctrl.SONAMES, "xenlight": "libxenlight.so.4.17"}
)

#: sizeof(libxl_domain_config) with Debian's 4.17 headers on x86_64 (checked
#: by the tests).  libxl_domain_config_init / _dispose manage its insides.
LIBXL_DOMAIN_CONFIG_SIZE: Final = 1288

#: LIBXL_VERSION (libxl.h): the version argument of libxl_ctx_alloc.
LIBXL_VERSION: Final = 0
#: libxl_sigchld_owner_libxl_always_selective_reap (libxl_event.h).
SIGCHLD_OWNER_SELECTIVE_REAP: Final = 3
#: xenguest.h: XC_STREAM_PLAIN; XCFLAGS_LIVE.
XC_STREAM_PLAIN: Final = 0
XCFLAGS_LIVE: Final = 1 << 0
#: libxl.h: LIBXL_CHECKPOINTED_STREAM_NONE.
LIBXL_CHECKPOINTED_STREAM_NONE: Final = 0

#: Opaque handles and typedefs that cffi needs declared (the tests compile the
#: function block below after the real headers, which define these).
CDEF_TYPEDEFS: Final = """
typedef struct libxl__ctx libxl_ctx;
typedef struct libxl_domain_config libxl_domain_config;
typedef struct libxl__asyncop_how libxl_asyncop_how;
typedef struct libxl__asyncprogress_how libxl_asyncprogress_how;
typedef int libxl_error;
typedef int xc_stream_type_t;
"""

#: Structs torpor fills in (layouts compared with the headers by the tests).
#: ``pid_t`` is ``int`` on Linux.
CDEF_STRUCTS: Final = """
typedef struct {
    int val;
} libxl_defbool;
typedef struct libxl_domain_restore_params {
    int checkpointed_stream;
    uint32_t stream_version;
    char * colo_proxy_script;
    libxl_defbool userspace_colo_proxy;
} libxl_domain_restore_params;
typedef struct {
    int chldowner;
    int (*fork_replacement)(void *user);
    int (*reaped_callback)(int pid, int status, void *user);
} libxl_childproc_hooks;
struct precopy_stats {
    unsigned int iteration;
    unsigned long total_written;
    long dirty_count;
};
struct save_callbacks {
    int (*suspend)(void *data);
    int (*precopy_policy)(struct precopy_stats, void *);
    int (*postcopy)(void *data);
    int (*checkpoint)(void *data);
    int (*wait_checkpoint)(void *data);
    int (*switch_qemu_logdirty)(uint32_t domid, unsigned enable, void *data);
    void *data;
};
"""

CDEF_FUNCTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "xenlight": """
int libxl_ctx_alloc(libxl_ctx **pctx, int version, unsigned flags, xentoollog_logger *lg);
int libxl_ctx_free(libxl_ctx *ctx);
void libxl_childproc_setmode(libxl_ctx *ctx, const libxl_childproc_hooks *hooks, void *user);
void libxl_domain_config_init(libxl_domain_config *d_config);
void libxl_domain_config_dispose(libxl_domain_config *d_config);
int libxl_retrieve_domain_configuration(libxl_ctx *ctx, uint32_t domid,
                                        libxl_domain_config *d_config,
                                        const libxl_asyncop_how *ao_how);
char *libxl_domain_config_to_json(libxl_ctx *ctx, libxl_domain_config *p);
int libxl_domain_config_from_json(libxl_ctx *ctx, libxl_domain_config *p, const char *s);
void libxl_domain_restore_params_init(libxl_domain_restore_params *p);
void libxl_domain_restore_params_dispose(libxl_domain_restore_params *p);
int libxl_domain_create_restore(libxl_ctx *ctx, libxl_domain_config *d_config,
                                uint32_t *domid, int restore_fd,
                                int send_back_fd,
                                const libxl_domain_restore_params *params,
                                const libxl_asyncop_how *ao_how,
                                const libxl_asyncprogress_how *aop_console_how);
int libxl_domain_unpause(libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how);
int libxl_domain_destroy(libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how);
const char *libxl_error_to_string(libxl_error p);
""",
        "xenguest": """
int xc_domain_save(xc_interface *xch, int io_fd, uint32_t dom,
                   uint32_t flags, struct save_callbacks *callbacks,
                   xc_stream_type_t stream_type, int recv_fd);
""",
    }
)

CDEF_LIBC: Final = """
void free(void *ptr);
"""

_SUSPEND_T: Final = "int(*)(void *)"
_LOGDIRTY_T: Final = "int(*)(uint32_t, unsigned, void *)"
_POLICY_T: Final = "int(*)(struct precopy_stats, void *)"
#: xenguest.h: what precopy_policy returns.
XGS_POLICY_ABORT: Final = -1
XGS_POLICY_CONTINUE_PRECOPY: Final = 0
XGS_POLICY_STOP_AND_COPY: Final = 1


def cdef_source() -> str:
    """Every declaration of libxenlight's handed to cffi (after xenctrl's)."""
    return CDEF_TYPEDEFS + CDEF_STRUCTS + "".join(CDEF_FUNCTIONS.values()) + CDEF_LIBC


def get_ffi() -> Any:
    """This module's ``cffi.FFI`` (ABI mode): it includes the xenctrl backend's,
    so the logger and ``xc_interface`` types are shared.  Its type tables are
    :func:`cdef_source` parsed ahead of time by ``tools/gen_ffi.py``."""
    from torpor.hypervisor._ffi_libxl import ffi

    return ffi


def libxl_error_name(rc: int) -> str:
    """``ERROR_FAIL`` for -3 and so on (libxl_types.idl's libxl_error)."""
    return _LIBXL_ERRORS.get(rc, f"libxl error {rc}")


_LIBXL_ERRORS: Final[Mapping[int, str]] = MappingProxyType(
    {
        -1: "ERROR_NONSPECIFIC",
        -2: "ERROR_VERSION",
        -3: "ERROR_FAIL",
        -4: "ERROR_NI",
        -5: "ERROR_NOMEM",
        -6: "ERROR_INVAL",
        -7: "ERROR_BADFAIL",
        -8: "ERROR_GUEST_TIMEDOUT",
        -9: "ERROR_TIMEDOUT",
        -10: "ERROR_NOPARAVIRT",
        -11: "ERROR_NOT_READY",
        -15: "ERROR_LOCK_FAIL",
        -16: "ERROR_JSON_CONFIG_EMPTY",
        -17: "ERROR_DEVICE_EXISTS",
        -21: "ERROR_DOMAIN_NOTFOUND",
        -22: "ERROR_ABORTED",
        -23: "ERROR_NOTFOUND",
        -24: "ERROR_DOMAIN_DESTROYED",
    }
)

#: libxl error -> the errno a HypervisorError carries.
_LIBXL_ERRNO: Final[Mapping[int, int]] = MappingProxyType(
    {
        -5: _errno.ENOMEM,
        -6: _errno.EINVAL,
        -9: _errno.ETIMEDOUT,
        -8: _errno.ETIMEDOUT,
        -15: _errno.EBUSY,
        -16: _errno.ENOENT,
        -21: _errno.ESRCH,
        -23: _errno.ENOENT,
        -24: _errno.ESRCH,
    }
)


class _Loaded:
    def __init__(self, ffi: Any, xen: xenctrl.XenLibraries, xenlight: Any, xenguest: Any) -> None:
        self.ffi = ffi
        self.xen = xen
        self.xenlight = xenlight
        self.xenguest = xenguest
        self.libc = ffi.dlopen(None)


def _load(sonames: Mapping[str, str] = SONAMES) -> _Loaded:
    """dlopen libxenctrl & co. (through the xenctrl backend) and libxenlight.

    :raises BackendUnavailable: naming the library that is missing.
    """
    xen = xenctrl.load_libraries(sonames)
    ffi = get_ffi()
    libs: dict[str, Any] = {}
    for key in ("xenlight", "xenguest"):
        try:
            libs[key] = ffi.dlopen(sonames[key])
        except OSError as e:
            raise BackendUnavailable(
                f"Xen library {sonames[key]} not found ({e}); saving and restoring "
                "domains on real Xen needs Xen 4.17's libxenlight (Debian: libxenmisc4.17)",
                cause=e,
            ) from e
    return _Loaded(ffi, xen, libs["xenlight"], libs["xenguest"])


class Libxl:
    """A libxl context (``libxl_ctx_alloc``) and the calls torpor needs.

    Thread-safe (libxl's context has its own lock); every call is synchronous.

    :raises BackendUnavailable: libxenlight is missing, or the context cannot
        be allocated (no Xen, no xenstored, not root).
    """

    def __init__(self, *, sonames: Mapping[str, str] = SONAMES) -> None:
        self._libs = _load(sonames)
        self._ffi = self._libs.ffi
        self._lib = self._libs.xenlight
        self.logger = xenctrl.XtlLogger(self._libs.xen, name="torpor.hypervisor.libxl")
        pctx = self._ffi.new("libxl_ctx **")
        rc = self._lib.libxl_ctx_alloc(pctx, LIBXL_VERSION, 0, self.logger.ptr)
        if rc != 0 or pctx[0] == self._ffi.NULL:
            detail = f": {self.logger.last_error}" if self.logger.last_error else ""
            raise BackendUnavailable(
                f"libxl_ctx_alloc failed with {libxl_error_name(rc)}{detail} "
                "(not a Xen dom0, xenstored not running, or not root)"
            )
        self._ctx: Any = pctx[0]
        # libxl reaps its own children only; the rest of the process keeps its own.
        self._hooks = self._ffi.new("libxl_childproc_hooks *")
        self._hooks.chldowner = SIGCHLD_OWNER_SELECTIVE_REAP
        self._lib.libxl_childproc_setmode(self._ctx, self._hooks, self._ffi.NULL)
        self._pid = os.getpid()

    def _handle(self) -> Any:
        if self._ctx is None:
            raise HypervisorError("libxl context is closed", errno=_errno.EBADF, op="libxl")
        return self._ctx

    def _fail(self, rc: int, op: str, domid: int | None) -> HypervisorError:
        detail = f" ({self.logger.last_error})" if self.logger.last_error else ""
        on = f" on domain {domid}" if domid is not None else ""
        return HypervisorError(
            f"{op}{on} failed: {libxl_error_name(rc)}{detail}",
            errno=_LIBXL_ERRNO.get(rc, _errno.EIO),
            op=op,
            domid=domid,
        )

    def _config(self) -> Any:
        buf = self._ffi.new("char[]", LIBXL_DOMAIN_CONFIG_SIZE)
        cfg = self._ffi.cast("libxl_domain_config *", buf)
        self._lib.libxl_domain_config_init(cfg)
        return buf, cfg

    def domain_config_json(self, domid: int) -> str:
        """``libxl_retrieve_domain_configuration`` + ``libxl_domain_config_to_json``:
        the domain's libxl configuration with what libxl learnt at run time."""
        ctx = self._handle()
        self.logger.last_error = None
        _buf, cfg = self._config()
        try:
            rc = self._lib.libxl_retrieve_domain_configuration(ctx, domid, cfg, self._ffi.NULL)
            if rc != 0:
                raise self._fail(rc, "libxl_retrieve_domain_configuration", domid)
            text = self._lib.libxl_domain_config_to_json(ctx, cfg)
            if text == self._ffi.NULL:
                raise self._fail(-3, "libxl_domain_config_to_json", domid)
            try:
                return str(self._ffi.string(text).decode())
            finally:
                self._libs.libc.free(text)
        finally:
            self._lib.libxl_domain_config_dispose(cfg)

    def create_restore(self, config_json: str, fd: int) -> int:
        """What ``xl restore`` does once it has read xl's header: the config from
        JSON, then ``libxl_domain_create_restore`` reading libxl's stream from
        ``fd`` (positioned at its start).  Returns the new domain's id; the
        domain is left paused, as xl leaves it until it unpauses it."""
        ctx = self._handle()
        self.logger.last_error = None
        _buf, cfg = self._config()
        params = self._ffi.new("libxl_domain_restore_params *")
        self._lib.libxl_domain_restore_params_init(params)
        try:
            rc = self._lib.libxl_domain_config_from_json(ctx, cfg, config_json.encode())
            if rc != 0:
                raise self._fail(rc, "libxl_domain_config_from_json", None)
            params.checkpointed_stream = LIBXL_CHECKPOINTED_STREAM_NONE
            params.stream_version = 2
            domid = self._ffi.new("uint32_t *")
            rc = self._lib.libxl_domain_create_restore(
                ctx, cfg, domid, fd, -1, params, self._ffi.NULL, self._ffi.NULL
            )
            if rc != 0:
                raise self._fail(rc, "libxl_domain_create_restore", None)
            return int(domid[0])
        finally:
            self._lib.libxl_domain_restore_params_dispose(params)
            self._lib.libxl_domain_config_dispose(cfg)

    def unpause(self, domid: int) -> None:
        """``libxl_domain_unpause``: device model ``cont`` (HVM), then the domain."""
        self.logger.last_error = None
        rc = self._lib.libxl_domain_unpause(self._handle(), domid, self._ffi.NULL)
        if rc != 0:
            raise self._fail(rc, "libxl_domain_unpause", domid)

    def destroy(self, domid: int) -> None:
        """``libxl_domain_destroy``: the domain, its xenstore tree, backends and
        device model, and libxl's stored configuration."""
        self.logger.last_error = None
        rc = self._lib.libxl_domain_destroy(self._handle(), domid, self._ffi.NULL)
        if rc != 0:
            raise self._fail(rc, "libxl_domain_destroy", domid)

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None and os.getpid() == self._pid:
            self._lib.libxl_ctx_free(ctx)

    def __enter__(self) -> Libxl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def domain_save(
    fd: int,
    domid: int,
    suspend: Callable[[], bool],
    *,
    hvm: bool,
    live: bool = False,
    precopy_policy: Callable[[PrecopyStats], bool] | None = None,
    qemu_logdirty: Callable[[bool], None] | None = None,
    sonames: Mapping[str, str] = SONAMES,
) -> None:
    """``xc_domain_save(xch, fd, domid, flags, callbacks, XC_STREAM_PLAIN, -1)``.

    Non-live (``xl save``): libxenguest writes its stream headers and static
    records, then calls ``suspend()`` -- from this thread -- which must
    return True only once the domain is shut down with reason suspend; then
    it writes the memory and the vCPU/HVM state and its END record.

    Live (``XCFLAGS_LIVE``, what libxl passes for a migration): log-dirty on,
    then precopy rounds while the guest runs, asking ``precopy_policy`` before
    and after each (True: stop and copy; libxenguest's own
    ``simple_precopy_policy`` when None), then ``suspend()`` and the last
    dirty pages.  ``qemu_logdirty(enable)`` is libxl's
    ``switch_qemu_logdirty`` (QMP ``xen-set-global-dirty-log`` for an HVM
    guest's QEMU; nothing for PVH): libxenguest calls it for an HVM domain's
    live save, and *asserts* it is set for every HVM save (it judges by the
    domain's own flags, whatever ``hvm`` says), so it is always set -- a
    non-live save has nothing to log and acknowledges it without a QMP round
    trip.  An exception in a callback counts as a failure (suspend 0,
    policy abort, log-dirty -1) and is kept as the error's ``cause``.

    :raises HypervisorError: xc_domain_save failed (errno from libxenguest;
        the message carries its last error).
    """
    libs = _load(sonames)
    ffi = libs.ffi
    logger = xenctrl.XtlLogger(libs.xen, name="torpor.hypervisor.libxl")
    xch = libs.xen.xenctrl.xc_interface_open(logger.ptr, logger.ptr, 0)
    if xch == ffi.NULL:
        code = ffi.errno or _errno.EIO
        raise HypervisorError.from_errno(code, op="xc_interface_open", domid=domid)
    errors: list[BaseException] = []

    def on_suspend(_data: Any) -> int:
        try:
            return 1 if suspend() else 0
        except BaseException as e:  # nothing may unwind into C
            errors.append(e)
            return 0

    def on_logdirty(_domid: int, enable: int, _data: Any) -> int:
        if not live or qemu_logdirty is None:
            return 0
        try:
            qemu_logdirty(bool(enable))
            return 0
        except BaseException as e:
            errors.append(e)
            return -1

    def on_policy(stats: Any, _data: Any) -> int:
        assert precopy_policy is not None
        try:
            stop = precopy_policy(
                PrecopyStats(
                    iteration=int(stats.iteration),
                    total_written=int(stats.total_written),
                    dirty_count=int(stats.dirty_count),
                )
            )
        except BaseException as e:
            errors.append(e)
            return XGS_POLICY_ABORT
        return XGS_POLICY_STOP_AND_COPY if stop else XGS_POLICY_CONTINUE_PRECOPY

    def on_error(exc_type: Any, exc: Any, tb: Any) -> None:
        with contextlib.suppress(Exception):
            _log.error("xc_domain_save callback failed: %r", exc, exc_info=(exc_type, exc, tb))

    suspend_cb = ffi.callback(_SUSPEND_T, on_suspend, error=0, onerror=on_error)
    logdirty_cb = ffi.callback(_LOGDIRTY_T, on_logdirty, error=-1, onerror=on_error)
    policy_cb = (
        ffi.callback(_POLICY_T, on_policy, error=XGS_POLICY_ABORT, onerror=on_error)
        if live and precopy_policy is not None
        else ffi.NULL
    )
    callbacks = ffi.new("struct save_callbacks *")
    callbacks.suspend = suspend_cb
    callbacks.precopy_policy = policy_cb
    # Set for every guest: libxenguest asserts it for an HVM domain (it judges by
    # the domain's own flags) and never calls it for a PV one.
    callbacks.switch_qemu_logdirty = logdirty_cb
    flags = XCFLAGS_LIVE if live else 0
    try:
        rc = libs.xenguest.xc_domain_save(xch, fd, domid, flags, callbacks, XC_STREAM_PLAIN, -1)
        code = ffi.errno
        if rc != 0:
            detail = f": {logger.last_error}" if logger.last_error else ""
            raise HypervisorError(
                f"xc_domain_save of domain {domid} failed with "
                f"{errno_name(code or _errno.EIO)}{detail}",
                errno=code or _errno.EIO,
                op="xc_domain_save",
                domid=domid,
                cause=errors[0] if errors else None,
            )
    finally:
        libs.xen.xenctrl.xc_interface_close(xch)
        # keep the callbacks and the logger alive until libxc is done with them
        del suspend_cb, logdirty_cb, policy_cb, callbacks, logger

"""The xenctrl backend on a machine without Xen.

What can be proven here, against the real Xen 4.17 headers and libraries
Debian's libxen-dev installs:

* importing the module loads and parses nothing;
* every struct, typedef, enum and prototype we hand cffi matches the headers
  (a C program compiled against them prints sizes and offsets; our
  prototypes are compiled after the real ones, so a mismatch is a C error);
* each function resolves in the library we call it through;
* opening fails with BackendUnavailable naming what is missing, and nothing
  reaches stderr -- even from inside the real xc_interface_open;
* the xentoollog logger, driven by libxentoollog's own xtl_log/xtl_progress,
  forwards to logging;
* errno mapping, decoding and event channel plumbing, over a stand-in for
  the three libraries that follows their documented return conventions;
* the suspend event channel lock, against a C program that takes the lock
  exactly as libxenguest's lock_suspend_event does.

The same backend against a real hypervisor: tests/xen/test_xenctrl_real.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor import model
from torpor.errors import BackendUnavailable, HypervisorError, UsageError
from torpor.hypervisor import Hypervisor, xenctrl
from torpor.model import DomainInfo, ShutdownReason

REPO = Path(__file__).resolve().parents[1]
HEADERS = ("xenctrl.h", "xenguest.h", "xenevtchn.h", "xentoollog.h")
XEN_HERE = any(os.path.exists(p) for p in xenctrl.PRIVCMD_PATHS)
GCC = shutil.which("gcc")

needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed")
needs_headers = pytest.mark.skipif(
    not all(Path("/usr/include", h).exists() for h in HEADERS),
    reason="Xen 4.17 headers absent (apt-get install libxen-dev)",
)
no_xen = pytest.mark.skipif(XEN_HERE, reason="this machine runs Xen; see tests/xen")


def _libs_or_skip() -> xenctrl.XenLibraries:
    try:
        return xenctrl.load_libraries()
    except BackendUnavailable as e:
        pytest.skip(f"Xen 4.17 libraries absent: {e}")


@pytest.fixture
def libs() -> xenctrl.XenLibraries:
    return _libs_or_skip()


def _compile(tmp: Path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    assert GCC is not None
    src = tmp / f"{name}.c"
    src.write_text(source)
    return subprocess.run(
        [GCC, "-std=gnu11", "-Wall", "-Werror", "-o", str(tmp / name), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )


_INCLUDES = textwrap.dedent(
    """\
    #include <stddef.h>
    #include <stdio.h>
    #include <xenctrl.h>
    #include <xenguest.h>
    #include <xenevtchn.h>
    #include <xentoollog.h>
    #include <xen/hvm/params.h>
    #include <xen/sched.h>
    """
)


# --------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------


def test_import_loads_nothing_and_prints_nothing() -> None:
    probe = textwrap.dedent(
        """
        import json, sys
        import torpor.errors, torpor.model, torpor.hypervisor
        before = set(sys.modules)
        import torpor.hypervisor.xenctrl as m
        new = sorted(set(sys.modules) - before)
        maps = open("/proc/self/maps").read()
        print(json.dumps({"new": new, "libxen_mapped": "libxen" in maps,
                          "ffi_loaded": "torpor.hypervisor._ffi_xenctrl" in sys.modules}))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "core")},
    )
    assert r.stderr == ""
    got = json.loads(r.stdout)
    assert got["libxen_mapped"] is False
    assert got["ffi_loaded"] is False
    assert not [m for m in got["new"] if "cffi" in m or "pycparser" in m], got["new"]


# --------------------------------------------------------------------------
# declarations vs the real headers
# --------------------------------------------------------------------------


def _layout_from_ffi(ffi: Any) -> tuple[dict[str, int], list[str]]:
    """Every size/alignment/offset cffi computed, keyed as the C program prints
    them, plus the C expressions that print the same keys."""
    expect: dict[str, int] = {}
    exprs: list[str] = []

    def add(key: str, value: int, c_expr: str) -> None:
        expect[key] = value
        exprs.append(f'    printf("{key} %zu\\n", (size_t)({c_expr}));')

    typedefs, structs, unions = ffi.list_types()
    assert not unions
    laid_out = 0
    for sname in structs:
        ctype = ffi.typeof(f"struct {sname}")
        # An opaque handle (xc_interface_core, xenevtchn_handle) has no size.
        # Asked first because the precompiled FFI lays a struct out on first
        # use, and its .fields before that trips an assertion in cffi's C code.
        try:
            ffi.sizeof(ctype)
        except ffi.error:
            continue
        laid_out += 1
        cname = f"struct {sname}"
        add(f"sizeof {cname}", ffi.sizeof(ctype), f"sizeof({cname})")
        add(f"alignof {cname}", ffi.alignof(ctype), f"_Alignof({cname})")
        for fname, field in ctype.fields:
            assert field.bitsize == -1, f"{cname}.{fname} is a bitfield"
            add(f"offsetof {cname}.{fname}", field.offset, f"offsetof({cname}, {fname})")
            add(
                f"sizeof {cname}.{fname}",
                ffi.sizeof(field.type),
                f"sizeof((({cname} *)0)->{fname})",
            )
    assert laid_out == 4  # xentoollog_logger, xen_arch_domainconfig, getdomaininfo, physinfo
    for tname in typedefs:
        ctype = ffi.typeof(tname)
        if ctype.kind == "struct":
            try:
                ffi.sizeof(ctype)
            except ffi.error:
                continue  # opaque
        if ctype.kind == "pointer":
            continue
        add(f"sizeof {tname}", ffi.sizeof(ctype), f"sizeof({tname})")
        if ctype.kind == "enum":
            for name, value in ctype.relements.items():
                add(f"const {name}", value, name)
    return expect, exprs


@needs_gcc
@needs_headers
def test_struct_layout_matches_headers(tmp_path: Path) -> None:
    ffi = xenctrl.get_ffi()
    expect, exprs = _layout_from_ffi(ffi)
    src = _INCLUDES + "int main(void)\n{\n" + "\n".join(exprs) + "\n    return 0;\n}\n"
    r = _compile(tmp_path, "layout", src)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True)
    got = {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.stdout.splitlines())}
    assert got == expect
    # The fields the backend decodes are all there, at the offsets Xen gives.
    assert "offsetof struct xen_domctl_getdomaininfo.arch_config" in got
    assert got["sizeof xc_domaininfo_t"] == got["sizeof struct xen_domctl_getdomaininfo"]


@needs_gcc
@needs_headers
def test_prototypes_and_typedefs_match_headers(tmp_path: Path) -> None:
    """Our typedefs and prototypes, compiled after the real ones: C11 accepts an
    identical redeclaration and rejects an incompatible one."""
    decls = xenctrl.CDEF_TYPEDEFS + "".join(xenctrl.CDEF_FUNCTIONS.values())
    r = _compile(tmp_path, "protos", _INCLUDES + decls + "\nint main(void) { return 0; }\n")
    assert r.returncode == 0, r.stderr
    # Control: a wrong prototype must not compile, or the check above proves nothing.
    wrong = decls.replace(
        "int xc_domain_pause(xc_interface *xch, uint32_t domid);",
        "int xc_domain_pause(xc_interface *xch, uint16_t domid);",
    )
    assert wrong != decls
    r = _compile(tmp_path, "wrong", _INCLUDES + wrong + "\nint main(void) { return 0; }\n")
    assert r.returncode != 0
    assert "conflicting types for" in r.stderr and "xc_domain_pause" in r.stderr


@needs_gcc
@needs_headers
def test_constants_match_headers(tmp_path: Path) -> None:
    """The Xen constants torpor uses (model.py, this module) are the headers'."""
    pairs = {
        "XEN_DOMINF_dying": model.DOMINF_DYING,
        "XEN_DOMINF_hvm_guest": model.DOMINF_HVM_GUEST,
        "XEN_DOMINF_shutdown": model.DOMINF_SHUTDOWN,
        "XEN_DOMINF_paused": model.DOMINF_PAUSED,
        "XEN_DOMINF_blocked": model.DOMINF_BLOCKED,
        "XEN_DOMINF_running": model.DOMINF_RUNNING,
        "XEN_DOMINF_hap": model.DOMINF_HAP,
        "XEN_DOMINF_shutdownmask": model.DOMINF_SHUTDOWN_MASK,
        "XEN_DOMINF_shutdownshift": model.DOMINF_SHUTDOWN_SHIFT,
        "XEN_X86_EMU_LAPIC": model.X86_EMU_LAPIC,
        "HVM_PARAM_CALLBACK_IRQ": model.HVM_PARAM_CALLBACK_IRQ,
        "HVM_PARAM_STORE_PFN": model.HVM_PARAM_STORE_PFN,
        "HVM_PARAM_STORE_EVTCHN": model.HVM_PARAM_STORE_EVTCHN,
        "HVM_PARAM_ACPI_S_STATE": model.HVM_PARAM_ACPI_S_STATE,
        "SHUTDOWN_poweroff": ShutdownReason.POWEROFF,
        "SHUTDOWN_reboot": ShutdownReason.REBOOT,
        "SHUTDOWN_suspend": ShutdownReason.SUSPEND,
        "SHUTDOWN_crash": ShutdownReason.CRASH,
        "SHUTDOWN_watchdog": ShutdownReason.WATCHDOG,
        "SHUTDOWN_soft_reset": ShutdownReason.SOFT_RESET,
        "DOMID_FIRST_RESERVED": xenctrl.DOMID_FIRST_RESERVED,
        "XC_OPENFLAG_DUMMY": 1,
    }
    for name in ("DEBUG", "VERBOSE", "DETAIL", "PROGRESS", "INFO", "NOTICE", "WARN", "ERROR"):
        pairs[f"XTL_{name}"] = getattr(xenctrl.XtlLevel, name)
    pairs["XTL_CRITICAL"] = xenctrl.XtlLevel.CRITICAL
    lines = [f'    printf("{n} %lld\\n", (long long)({n}));' for n in pairs]
    r = _compile(tmp_path, "consts", _INCLUDES + "int main(void)\n{\n" + "\n".join(lines) + "\n}\n")
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(tmp_path / "consts")], capture_output=True, text=True, check=True)
    got = {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}
    assert got == {k: int(v) for k, v in pairs.items()}


def _loaded_path(soname: str) -> Path:
    maps = Path("/proc/self/maps").read_text()
    for line in maps.splitlines():
        if line.endswith(soname) or f"/{soname}." in line:
            return Path(line.split()[-1])
    raise AssertionError(f"{soname} is not mapped")


def test_each_function_is_exported_by_the_library_we_call_it_through(
    libs: xenctrl.XenLibraries,
) -> None:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    for key, decls in xenctrl.CDEF_FUNCTIONS.items():
        lib = getattr(libs, key)
        names = re.findall(r"\b(x\w+)\(", decls)
        assert names
        path = _loaded_path(xenctrl.SONAMES[key])
        out = subprocess.run(
            [nm, "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True
        ).stdout
        # Symbols are versioned (xc_interface_open@@VERS_4.17.0).
        defined = {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}
        for name in names:
            assert name in defined, f"{name} is not defined by {path}"
            getattr(lib, name)  # resolves through cffi
    # The fact docs/real-xen.md records: resume is libxenguest's, not libxenctrl's.
    # (The precompiled FFI says so with its ffi.error, an AttributeError in-line.)
    with pytest.raises((AttributeError, xenctrl.get_ffi().error)):
        _ = libs.xenctrl.xc_domain_resume


def test_lock_file_path_is_the_one_libxenguest_uses(libs: xenctrl.XenLibraries) -> None:
    binary = _loaded_path(xenctrl.SONAMES["xenguest"]).read_bytes()
    assert b"/var/run/xen/suspend-evtchn-%d.lock\0" in binary
    lock = xenctrl.SuspendEvtchnLock(12, xenctrl.XEN_RUN_DIR)
    assert lock.path == "/var/run/xen/suspend-evtchn-12.lock"


# --------------------------------------------------------------------------
# no Xen here: BackendUnavailable, and silence
# --------------------------------------------------------------------------


@no_xen
def test_open_without_xen_says_so_and_prints_nothing(
    capfd: pytest.CaptureFixture[str], libs: xenctrl.XenLibraries
) -> None:
    with pytest.raises(BackendUnavailable) as ei:
        xenctrl.XenctrlHypervisor()
    msg = str(ei.value)
    assert "no Xen hypervisor here" in msg
    assert "/dev/xen/privcmd" in msg and "/proc/xen/privcmd" in msg
    assert capfd.readouterr() == ("", "")


@no_xen
def test_xc_interface_open_enoent_is_quiet_and_logged(
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    libs: xenctrl.XenLibraries,
) -> None:
    """Skip our device check: the real xc_interface_open fails, and its
    complaint goes to logging through our logger, not to stderr."""
    caplog.set_level(logging.DEBUG, logger="torpor.hypervisor.xenctrl")
    with pytest.raises(BackendUnavailable) as ei:
        xenctrl.XenctrlHypervisor(privcmd_paths=())
    msg = str(ei.value)
    assert msg.startswith("no Xen hypervisor here: xc_interface_open failed with ENOENT")
    assert "xencall:" in msg  # libxencall's own message, forwarded
    assert capfd.readouterr() == ("", "")
    recs = [r for r in caplog.records if r.name == "torpor.hypervisor.xenctrl.xencall"]
    assert recs and recs[0].levelno == logging.ERROR
    assert recs[0].xtl_errno == errno.ENOENT  # type: ignore[attr-defined]


@no_xen
def test_control_without_our_logger_libxc_writes_to_stderr(
    capfd: pytest.CaptureFixture[str], libs: xenctrl.XenLibraries
) -> None:
    """The capture above can fail: with logger=NULL libxc prints to stderr."""
    xch = libs.xenctrl.xc_interface_open(libs.ffi.NULL, libs.ffi.NULL, 0)
    assert xch == libs.ffi.NULL
    assert "Could not obtain handle on privileged command interface" in capfd.readouterr().err


def test_missing_library_is_named(capfd: pytest.CaptureFixture[str]) -> None:
    sonames = {**xenctrl.SONAMES, "xenctrl": "libxenctrl.so.0.no-such-version"}
    with pytest.raises(BackendUnavailable) as ei:
        xenctrl.XenctrlHypervisor(sonames=sonames)
    assert "libxenctrl.so.0.no-such-version not found" in str(ei.value)
    assert capfd.readouterr() == ("", "")


# --------------------------------------------------------------------------
# the xentoollog logger, driven by libxentoollog itself
# --------------------------------------------------------------------------


def _xtl_log(
    libs: xenctrl.XenLibraries,
    logger: xenctrl.XtlLogger,
    level: int,
    errnoval: int,
    context: bytes | None,
    fmt: bytes,
    *args: Any,
) -> None:
    ffi = libs.ffi
    ctx = ffi.NULL if context is None else ffi.new("char[]", context)
    libs.xentoollog.xtl_log(logger.ptr, level, errnoval, ctx, ffi.new("char[]", fmt), *args)


@pytest.mark.parametrize(
    ("xtl", "pylevel"),
    [
        (xenctrl.XtlLevel.DEBUG, logging.DEBUG),
        (xenctrl.XtlLevel.VERBOSE, logging.DEBUG),
        (xenctrl.XtlLevel.DETAIL, logging.DEBUG),
        (xenctrl.XtlLevel.PROGRESS, logging.INFO),
        (xenctrl.XtlLevel.INFO, logging.INFO),
        (xenctrl.XtlLevel.NOTICE, logging.INFO),
        (xenctrl.XtlLevel.WARN, logging.WARNING),
        (xenctrl.XtlLevel.ERROR, logging.ERROR),
        (xenctrl.XtlLevel.CRITICAL, logging.CRITICAL),
    ],
)
def test_vmessage_formats_and_forwards(
    libs: xenctrl.XenLibraries,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    xtl: int,
    pylevel: int,
) -> None:
    caplog.set_level(logging.DEBUG, logger="torpor.hypervisor.xenctrl")
    lg = xenctrl.XtlLogger(libs)
    ffi = libs.ffi
    _xtl_log(
        libs,
        lg,
        xtl,
        errno.ESRCH,
        b"xc",
        b"dom%u: %s, %lu pages, %.1f%%",
        ffi.cast("unsigned int", 7),
        ffi.new("char[]", b"not suspended"),
        ffi.cast("unsigned long", 2**40 + 1),
        ffi.cast("double", 12.5),
    )
    (rec,) = caplog.records
    assert rec.name == "torpor.hypervisor.xenctrl.xc"
    assert rec.levelno == pylevel
    assert rec.getMessage() == (
        f"dom7: not suspended, {2**40 + 1} pages, 12.5%: {os.strerror(errno.ESRCH)}"
    )
    assert (rec.xtl_level, rec.xtl_errno, rec.xtl_context) == (xtl, errno.ESRCH, "xc")  # type: ignore[attr-defined]
    assert capfd.readouterr() == ("", "")
    assert lg.callback_errors == 0
    assert (lg.last_error is not None) == (xtl >= xenctrl.XtlLevel.ERROR)


def test_vmessage_without_errno_or_context(
    libs: xenctrl.XenLibraries, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="torpor.hypervisor.xenctrl")
    lg = xenctrl.XtlLogger(libs)
    _xtl_log(libs, lg, xenctrl.XtlLevel.WARN, -1, None, b"plain message\n")
    (rec,) = caplog.records
    assert rec.name == "torpor.hypervisor.xenctrl.xen"
    assert rec.getMessage() == "plain message"


def test_vmessage_truncates_a_huge_message(
    libs: xenctrl.XenLibraries, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="torpor.hypervisor.xenctrl")
    lg = xenctrl.XtlLogger(libs)
    _xtl_log(
        libs, lg, xenctrl.XtlLevel.ERROR, -1, b"xc", b"%s", libs.ffi.new("char[]", b"a" * 9000)
    )
    (rec,) = caplog.records
    text = rec.getMessage()
    assert text.endswith(" [truncated]")
    assert text.startswith("a" * 4000) and len(text) < 4200


def test_vmessage_skips_formatting_when_nobody_listens(
    libs: xenctrl.XenLibraries, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="torpor.hypervisor.xenctrl")
    lg = xenctrl.XtlLogger(libs)
    calls: list[Any] = []
    real = lg._vsnprintf

    def counting(*a: Any) -> Any:
        calls.append(a)
        return real(*a)

    lg._vsnprintf = counting
    _xtl_log(libs, lg, xenctrl.XtlLevel.DEBUG, -1, b"xc", b"hypercall buffer stats")
    assert calls == [] and caplog.records == []
    _xtl_log(libs, lg, xenctrl.XtlLevel.INFO, -1, b"xc", b"heard")
    assert len(calls) == 1 and caplog.records[0].getMessage() == "heard"


def test_progress_and_destroy(libs: xenctrl.XenLibraries, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="torpor.hypervisor.xenctrl")
    lg = xenctrl.XtlLogger(libs)
    ffi = libs.ffi
    libs.xentoollog.xtl_progress(
        lg.ptr, ffi.new("char[]", b"xc"), ffi.new("char[]", b"saving memory"), 50, 200
    )
    (rec,) = caplog.records
    assert rec.name == "torpor.hypervisor.xenctrl.xc"
    assert rec.levelno == logging.INFO
    assert rec.getMessage() == "saving memory: 25% (50/200)"  # xtl_progress computes %
    assert not lg.destroyed
    libs.xentoollog.xtl_logger_destroy(lg.ptr)
    assert lg.destroyed


def test_exception_in_callback_never_reaches_stderr(
    libs: xenctrl.XenLibraries,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lg = xenctrl.XtlLogger(libs)

    def boom(context: Any) -> Any:
        raise RuntimeError("broken handler")

    monkeypatch.setattr(lg, "_child", boom)
    _xtl_log(libs, lg, xenctrl.XtlLevel.ERROR, -1, b"xc", b"lost")
    assert lg.callback_errors == 1
    assert capfd.readouterr() == ("", "")
    assert any("xentoollog callback failed" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------
# the backend over a stand-in for the libraries
# --------------------------------------------------------------------------

RUNNING = DomainInfo.make_flags(running=True)


class FakeXenLibs:
    """libxenctrl + libxenguest + libxenevtchn as seen through cffi, in Python.

    Follows the libraries' conventions, not torpor's: failures return -1 and
    leave errno (here ``ffi.errno``), handles are opaque non-NULL pointers,
    xc_domain_getinfolist returns the next domains from ``first``, and the
    event channel fd is a pipe carrying 4-byte port numbers the way
    /dev/xen/evtchn does (read() blocks unless the fd is non-blocking)."""

    def __init__(self, ffi: Any) -> None:
        self.ffi = ffi
        self.domains: dict[int, dict[str, Any]] = {
            0: {"flags": RUNNING, "params": {}},
            7: {
                "flags": DomainInfo.make_flags(hvm=True, shutdown_reason=ShutdownReason.CRASH),
                "params": {model.HVM_PARAM_CALLBACK_IRQ: 1},
                "uuid": bytes(range(16)),
                "emu": model.X86_EMU_ALL,
            },
            9: {"flags": DomainInfo.make_flags(shutdown_reason=ShutdownReason.SUSPEND)},
        }
        self.calls: list[tuple[Any, ...]] = []
        self.open_args: tuple[Any, ...] | None = None
        self.closed = {"xc": 0, "evtchn": 0}
        self.evtchn_missing = False
        self.subscribed: dict[int, int] = {}
        self._keep = [ffi.new("int *"), ffi.new("int *")]
        self.rfd, self.wfd = os.pipe()
        self.next_port = 40
        self.bound: dict[int, tuple[int, int]] = {}
        self.notified: list[int] = []
        self.unmasked: list[int] = []

    def close_fds(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def _err(self, code: int, rc: int = -1) -> int:
        self.ffi.errno = code
        return rc

    def _dom(self, domid: int) -> dict[str, Any] | None:
        return self.domains.get(domid)

    # libxenctrl
    def xc_interface_open(self, logger: Any, dombuild_logger: Any, flags: int) -> Any:
        self.open_args = (logger, dombuild_logger, flags)
        return self.ffi.cast("xc_interface *", self._keep[0])

    def xc_interface_close(self, xch: Any) -> int:
        self.closed["xc"] += 1
        return 0

    def xc_domain_getinfolist(self, xch: Any, first: int, maxd: int, buf: Any) -> int:
        ids = sorted(d for d in self.domains if d >= first)[:maxd]
        for i, d in enumerate(ids):
            dom = self.domains[d]
            buf[i].domain = d
            buf[i].flags = dom["flags"]
            buf[i].tot_pages = 1000 + d
            buf[i].max_pages = 2000 + d
            buf[i].cpu_time = 10**12 + d
            buf[i].nr_online_vcpus = 2
            buf[i].max_vcpu_id = 1
            self.ffi.memmove(buf[i].handle, dom.get("uuid", bytes(16)), 16)
            buf[i].arch_config.emulation_flags = dom.get("emu", 0)
        return len(ids)

    def _simple(self, name: str, domid: int) -> int:
        self.calls.append((name, domid))
        if self._dom(domid) is None:
            return self._err(errno.ESRCH)
        return 0

    def xc_domain_pause(self, xch: Any, domid: int) -> int:
        return self._simple("pause", domid)

    def xc_domain_unpause(self, xch: Any, domid: int) -> int:
        return self._simple("unpause", domid)

    def xc_domain_destroy(self, xch: Any, domid: int) -> int:
        return self._simple("destroy", domid)

    def xc_domain_shutdown(self, xch: Any, domid: int, reason: int) -> int:
        self.calls.append(("shutdown", domid, reason))
        dom = self._dom(domid)
        if dom is None:
            return self._err(errno.ESRCH)
        dom["flags"] = DomainInfo.make_flags(shutdown_reason=reason)
        return 0

    def xc_hvm_param_get(self, xch: Any, domid: int, param: int, out: Any) -> int:
        dom = self._dom(domid)
        if dom is None:
            return self._err(errno.ESRCH)
        if not dom["flags"] & model.DOMINF_HVM_GUEST:
            return self._err(errno.EINVAL)
        out[0] = dom["params"].get(param, 0)
        return 0

    def xc_hvm_param_set(self, xch: Any, domid: int, param: int, value: int) -> int:
        dom = self._dom(domid)
        if dom is None:
            return self._err(errno.ESRCH)
        if not dom["flags"] & model.DOMINF_HVM_GUEST:
            return self._err(errno.EINVAL)
        dom["params"][param] = value
        return 0

    def xc_domain_subscribe_for_suspend(self, xch: Any, domid: int, port: int) -> int:
        if self._dom(domid) is None:
            return self._err(errno.ESRCH)
        self.subscribed[domid] = port
        return 0

    # libxenguest
    def xc_domain_resume(self, xch: Any, domid: int, fast: int) -> int:
        self.calls.append(("resume", domid, fast))
        dom = self._dom(domid)
        if dom is None:
            return self._err(errno.ESRCH)
        if fast and DomainInfo(domid=domid, flags=dom["flags"]).shutdown_reason != 2:
            return self._err(errno.EINVAL)  # xg_resume.c: "not suspended"
        dom["flags"] = RUNNING
        return 0

    # libxenevtchn
    def xenevtchn_open(self, logger: Any, flags: int) -> Any:
        if self.evtchn_missing:
            self.ffi.errno = errno.ENOENT
            return self.ffi.NULL
        return self.ffi.cast("xenevtchn_handle *", self._keep[1])

    def xenevtchn_close(self, xce: Any) -> int:
        self.closed["evtchn"] += 1
        return 0

    def xenevtchn_fd(self, xce: Any) -> int:
        return self.rfd

    def xenevtchn_bind_interdomain(self, xce: Any, domid: int, remote: int) -> int:
        if self._dom(domid) is None:
            return self._err(errno.ESRCH)
        port, self.next_port = self.next_port, self.next_port + 1
        self.bound[port] = (domid, remote)
        os.write(self.wfd, port.to_bytes(4, sys.byteorder))  # Xen sets it pending at once
        return port

    def xenevtchn_notify(self, xce: Any, port: int) -> int:
        if port not in self.bound:
            return self._err(errno.EINVAL)
        self.notified.append(port)
        return 0

    def xenevtchn_unbind(self, xce: Any, port: int) -> int:
        if self.bound.pop(port, None) is None:
            return self._err(errno.EINVAL)
        return 0

    def xenevtchn_pending(self, xce: Any) -> int:
        try:
            data = os.read(self.rfd, 4)
        except OSError as e:
            return self._err(e.errno or errno.EIO)
        return int.from_bytes(data, sys.byteorder)

    def xenevtchn_unmask(self, xce: Any, port: int) -> int:
        if port not in self.bound:
            return self._err(errno.EINVAL)
        self.unmasked.append(port)
        return 0


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeXenLibs]:
    real = _libs_or_skip()
    f = FakeXenLibs(real.ffi)
    stand_in = xenctrl.XenLibraries(
        ffi=real.ffi,
        xenctrl=f,
        xenguest=f,
        xenevtchn=f,
        xentoollog=real.xentoollog,
        libc=real.libc,
    )
    monkeypatch.setattr(xenctrl, "load_libraries", lambda sonames=xenctrl.SONAMES: stand_in)
    yield f
    f.close_fds()


@pytest.fixture
def hv(fake: FakeXenLibs, tmp_path: Path) -> Iterator[xenctrl.XenctrlHypervisor]:
    h = xenctrl.XenctrlHypervisor(privcmd_paths=(), lock_dir=str(tmp_path))
    yield h
    h.close()


def test_opens_a_real_handle_with_our_logger(
    hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs
) -> None:
    assert isinstance(hv, Hypervisor)
    assert hv.name == "xenctrl"
    assert fake.open_args is not None
    logger, dombuild_logger, flags = fake.open_args
    assert flags == 0  # never XC_OPENFLAG_DUMMY
    assert logger == dombuild_logger == hv._logger.ptr


def test_domain_info_list_decodes_xc_domaininfo(hv: xenctrl.XenctrlHypervisor) -> None:
    infos = hv.domain_info_list()
    assert [i.domid for i in infos] == [0, 7, 9]
    d7 = infos[1]
    # The raw word keeps "shut down, reason crash" (xc_domain_getinfo would not).
    assert d7.shutdown and d7.shutdown_reason == ShutdownReason.CRASH and d7.hvm
    assert d7.uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert (d7.tot_pages, d7.max_pages, d7.cpu_time) == (1007, 2007, 10**12 + 7)
    assert (d7.nr_online_vcpus, d7.max_vcpu_id) == (2, 1)
    assert d7.emulation_flags == model.X86_EMU_ALL
    assert infos[2].suspended
    assert [i.domid for i in hv.domain_info_list(first_domid=1, max_domains=1)] == [7]
    assert hv.domain_info_list(max_domains=0) == []


def test_domain_info_checks_the_domid(hv: xenctrl.XenctrlHypervisor) -> None:
    assert hv.domain_info(7).domid == 7
    # getinfolist(5, 1) answers with domain 7: that is ESRCH for 5.
    with pytest.raises(HypervisorError) as ei:
        hv.domain_info(5)
    assert (ei.value.errno, ei.value.op, ei.value.domid) == (errno.ESRCH, "domain_info", 5)
    with pytest.raises(HypervisorError) as ei:
        hv.domain_info(100)  # past the last domain: getinfolist returns 0
    assert ei.value.errno == errno.ESRCH


@pytest.mark.parametrize(
    ("call", "op"),
    [
        (lambda h: h.pause(3), "pause"),
        (lambda h: h.unpause(3), "unpause"),
        (lambda h: h.destroy(3), "destroy"),
        (lambda h: h.shutdown(3, ShutdownReason.SUSPEND), "shutdown"),
        (lambda h: h.resume(3, fast=False), "resume"),
        (lambda h: h.get_hvm_param(3, 0), "get_hvm_param"),
        (lambda h: h.set_hvm_param(3, 0, 1), "set_hvm_param"),
        (lambda h: h.evtchn_subscribe(3, 5), "evtchn_subscribe"),
        (lambda h: h.evtchn_bind_interdomain(3, 5), "evtchn_bind_interdomain"),
    ],
)
def test_errno_of_a_missing_domain_is_esrch(
    hv: xenctrl.XenctrlHypervisor, call: Any, op: str
) -> None:
    with pytest.raises(HypervisorError) as ei:
        call(hv)
    err = ei.value
    assert (err.errno, err.errname, err.op, err.domid) == (errno.ESRCH, "ESRCH", op, 3)
    assert str(err) == f"[domain 3] hypervisor {op} on domain 3: ESRCH (No such process)"


def test_fast_resume_of_a_running_domain_is_einval(
    hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs
) -> None:
    with pytest.raises(HypervisorError) as ei:
        hv.resume(0, fast=True)
    assert ei.value.errno == errno.EINVAL
    hv.resume(9, fast=True)
    assert fake.calls[-1] == ("resume", 9, 1)
    assert not hv.domain_info(9).shutdown
    hv.resume(7, fast=False)
    assert fake.calls[-1] == ("resume", 7, 0)


def test_control_calls_pass_their_arguments(
    hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs
) -> None:
    hv.pause(7)
    hv.unpause(7)
    hv.shutdown(0, ShutdownReason.SUSPEND)
    hv.destroy(9)
    assert fake.calls == [("pause", 7), ("unpause", 7), ("shutdown", 0, 2), ("destroy", 9)]
    assert hv.domain_info(0).suspended


def test_hvm_params(hv: xenctrl.XenctrlHypervisor) -> None:
    assert hv.get_hvm_param(7, model.HVM_PARAM_CALLBACK_IRQ) == 1
    hv.set_hvm_param(7, model.HVM_PARAM_ACPI_S_STATE, 3)
    assert hv.get_hvm_param(7, model.HVM_PARAM_ACPI_S_STATE) == 3
    hv.set_hvm_param(7, 20, 2**64 - 1)
    assert hv.get_hvm_param(7, 20) == 2**64 - 1
    with pytest.raises(HypervisorError) as ei:
        hv.get_hvm_param(0, model.HVM_PARAM_CALLBACK_IRQ)  # PV
    assert (ei.value.errno, ei.value.op) == (errno.EINVAL, "get_hvm_param")


def test_errno_zero_falls_back_to_the_return_code(
    hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few libxc paths return -errno without setting errno (xc_version)."""
    monkeypatch.setattr(fake, "xc_domain_pause", lambda xch, d: fake._err(0, -errno.EACCES))
    with pytest.raises(HypervisorError) as ei:
        hv.pause(0)
    assert ei.value.errno == errno.EACCES
    monkeypatch.setattr(fake, "xc_domain_pause", lambda xch, d: fake._err(0, -1))
    with pytest.raises(HypervisorError) as ei:
        hv.pause(0)
    assert ei.value.errno == errno.EIO


@pytest.mark.parametrize("domid", [-1, xenctrl.DOMID_FIRST_RESERVED, 0x7FF1, 2**32, True, 1.0])
def test_invalid_domids_never_reach_xen(
    hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs, domid: Any
) -> None:
    for call in (hv.pause, hv.destroy, hv.domain_info, lambda d: hv.resume(d, fast=True)):
        with pytest.raises(UsageError):
            call(domid)
    assert fake.calls == []


def test_invalid_ports_and_params(hv: xenctrl.XenctrlHypervisor) -> None:
    with pytest.raises(UsageError):
        hv.evtchn_notify(-1)
    with pytest.raises(UsageError):
        hv.set_hvm_param(7, 1, 2**64)
    with pytest.raises(UsageError):
        hv.get_hvm_param(7, -2)


def test_event_channel_plumbing(hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs) -> None:
    fd = hv.evtchn_fileno()
    assert fd == fake.rfd
    assert os.get_blocking(fd) is False  # or evtchn_pending would sleep in read()
    assert hv.evtchn_pending() is None
    local = hv.evtchn_bind_interdomain(7, 3)
    assert fake.bound[local] == (7, 3)
    hv.evtchn_subscribe(7, 3)
    assert fake.subscribed == {7: 3}
    # The bind's own pending event, then nothing.
    assert hv.evtchn_pending() == local
    hv.evtchn_unmask(local)
    assert hv.evtchn_pending() is None
    hv.evtchn_notify(local)
    assert fake.notified == [local] and fake.unmasked == [local]
    hv.evtchn_unbind(local)
    with pytest.raises(HypervisorError) as ei:
        hv.evtchn_unbind(local)
    assert (ei.value.errno, ei.value.op, ei.value.domid) == (errno.EINVAL, "evtchn_unbind", None)
    hv.evtchn_subscribe(7, 0)
    assert fake.subscribed == {7: 0}


def test_evtchn_pending_error_other_than_eagain_raises(
    hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs
) -> None:
    hv.evtchn_fileno()
    os.close(fake.rfd)  # the device went away under us
    with pytest.raises(HypervisorError) as ei:
        hv.evtchn_pending()
    assert (ei.value.errno, ei.value.op) == (errno.EBADF, "evtchn_pending")


def test_no_evtchn_device_is_backend_unavailable(
    hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs
) -> None:
    fake.evtchn_missing = True
    with pytest.raises(BackendUnavailable) as ei:
        hv.evtchn_fileno()
    assert "/dev/xen/evtchn" in str(ei.value)


def test_close_is_idempotent_and_final(hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs) -> None:
    hv.evtchn_fileno()
    hv.close()
    hv.close()
    assert fake.closed == {"xc": 1, "evtchn": 1}
    assert hv.closed
    with pytest.raises(HypervisorError) as ei:
        hv.pause(0)
    assert ei.value.errno == errno.EBADF
    with pytest.raises(HypervisorError):
        hv.evtchn_pending()


def test_context_manager_closes(fake: FakeXenLibs) -> None:
    with xenctrl.XenctrlHypervisor(privcmd_paths=()) as h:
        h.domain_info(0)
    assert fake.closed["xc"] == 1


def test_a_forked_child_may_not_use_the_parents_handle(
    hv: xenctrl.XenctrlHypervisor, fake: FakeXenLibs, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)
    with pytest.raises(UsageError, match="after fork"):
        hv.pause(0)
    hv.close()  # forgets the handles without touching them
    assert fake.closed == {"xc": 0, "evtchn": 0}


def test_backend_lock_uses_its_lock_dir(hv: xenctrl.XenctrlHypervisor, tmp_path: Path) -> None:
    with hv.suspend_evtchn_lock(4) as lock:
        assert lock.path == str(tmp_path / "suspend-evtchn-4.lock")
        assert os.path.exists(lock.path)


# --------------------------------------------------------------------------
# the suspend event channel lock
# --------------------------------------------------------------------------

# Takes the lock the way tools/libs/guest/xg_suspend.c lock_suspend_event does
# (open O_CREAT|O_RDWR 0600, F_SETLK F_WRLCK on byte 0, length 1), says
# "locked" or "busy <errno>", then on a line from stdin releases it the way
# unlock_suspend_event does (unlink, close).
_LIBXL_LOCKER = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    struct flock fl;
    char line[16];
    int fd = open(argv[1], O_CREAT | O_RDWR, 0600);
    if (fd < 0) { printf("open %d\n", errno); return 1; }
    memset(&fl, 0, sizeof(fl));
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_len = 1;
    if (fcntl(fd, F_SETLK, &fl)) { printf("busy %d\n", errno); return 2; }
    printf("locked\n");
    fflush(stdout);
    if (fgets(line, sizeof(line), stdin) == NULL) return 0;
    unlink(argv[1]);
    close(fd);
    return 0;
}
"""


@pytest.fixture(scope="module")
def libxl_locker(tmp_path_factory: pytest.TempPathFactory) -> str:
    if GCC is None:
        pytest.skip("gcc is not installed")
    tmp = tmp_path_factory.mktemp("locker")
    r = _compile(tmp, "locker", _LIBXL_LOCKER)
    assert r.returncode == 0, r.stderr
    return str(tmp / "locker")


def _run_locker(locker: str, path: str) -> str:
    r = subprocess.run(
        [locker, path], check=False, input="", capture_output=True, text=True, timeout=10
    )
    return r.stdout.strip()


def test_lock_file_created_0600_and_removed_on_release(tmp_path: Path) -> None:
    lock = xenctrl.SuspendEvtchnLock(5, str(tmp_path))
    assert lock.path == str(tmp_path / "suspend-evtchn-5.lock")
    with lock:
        assert lock.held
        st = os.stat(lock.path)
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert not lock.held
    assert not os.path.exists(lock.path)
    lock.release()  # idempotent


def test_lock_refused_to_a_second_holder_in_this_process(tmp_path: Path) -> None:
    with xenctrl.SuspendEvtchnLock(5, str(tmp_path)):
        other = xenctrl.SuspendEvtchnLock(5, str(tmp_path))
        with pytest.raises(HypervisorError) as ei:
            other.acquire()
        err = ei.value
        assert (err.errno, err.op, err.domid) == (errno.EBUSY, "suspend_evtchn_lock", 5)
        assert "this process" in str(err)
        # Another domain's lock is independent.
        with xenctrl.SuspendEvtchnLock(6, str(tmp_path)):
            pass
    with xenctrl.SuspendEvtchnLock(5, str(tmp_path)):
        pass  # free again


def test_libxl_style_locker_sees_our_lock(tmp_path: Path, libxl_locker: str) -> None:
    with xenctrl.SuspendEvtchnLock(8, str(tmp_path)) as lock:
        out = _run_locker(libxl_locker, lock.path)
        assert out in (f"busy {errno.EAGAIN}", f"busy {errno.EACCES}")
    assert _run_locker(libxl_locker, str(tmp_path / "suspend-evtchn-8.lock")) == "locked"


def test_lock_held_by_libxl_style_holder_is_refused_naming_its_pid(
    tmp_path: Path, libxl_locker: str
) -> None:
    path = str(tmp_path / "suspend-evtchn-11.lock")
    holder = subprocess.Popen(
        [libxl_locker, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(HypervisorError) as ei:
            xenctrl.SuspendEvtchnLock(11, str(tmp_path)).acquire()
        assert ei.value.errno == errno.EBUSY
        assert f"pid {holder.pid}" in str(ei.value)
        assert path in str(ei.value)
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.wait(timeout=10) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with xenctrl.SuspendEvtchnLock(11, str(tmp_path)) as lock:
        assert lock.held


def test_lock_file_left_by_a_dead_holder_is_taken_over(tmp_path: Path, libxl_locker: str) -> None:
    path = str(tmp_path / "suspend-evtchn-12.lock")
    holder = subprocess.Popen(
        [libxl_locker, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.exists(path)  # stale file, no lock on it
    with xenctrl.SuspendEvtchnLock(12, str(tmp_path)) as lock:
        assert lock.held
    assert not os.path.exists(path)


def test_lock_retries_when_the_holder_unlinks_between_open_and_lock(
    tmp_path: Path, libxl_locker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race lock_suspend_event's stat/inode check exists for: we opened the
    old file, its holder unlinked it and another toolstack made a new one
    before our lock landed -- a lock on the old inode is worth nothing."""
    lock = xenctrl.SuspendEvtchnLock(13, str(tmp_path))
    Path(lock.path).write_text("")
    real_lockf = fcntl.lockf
    attempts: list[int] = []

    def racing_lockf(fd: int, *args: Any) -> Any:
        attempts.append(fd)
        if len(attempts) == 1:
            os.unlink(lock.path)
            Path(lock.path).write_text("")  # a different inode at the path
        return real_lockf(fd, *args)

    monkeypatch.setattr(fcntl, "lockf", racing_lockf)
    lock.acquire()
    monkeypatch.undo()
    try:
        assert len(attempts) == 2
        # What we hold now is the file at the path: libxl is locked out.
        assert _run_locker(libxl_locker, lock.path).startswith("busy")
    finally:
        lock.release()


def test_lock_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(xenctrl.LOCK_DIR_ENV, raising=False)
    assert xenctrl.SuspendEvtchnLock(3).path == "/var/run/xen/suspend-evtchn-3.lock"
    monkeypatch.setenv(xenctrl.LOCK_DIR_ENV, str(tmp_path))
    with xenctrl.SuspendEvtchnLock(3) as lock:
        assert lock.path == str(tmp_path / "suspend-evtchn-3.lock")
        assert os.path.exists(lock.path)


def test_lock_dir_missing_is_a_clear_error(tmp_path: Path) -> None:
    lock = xenctrl.SuspendEvtchnLock(3, str(tmp_path / "no-such-dir"))
    with pytest.raises(HypervisorError) as ei:
        lock.acquire()
    assert ei.value.errno == errno.ENOENT
    assert lock.path in str(ei.value)
    assert not lock.held
    # A failed attempt does not leave the domain marked as held.
    Path(tmp_path / "no-such-dir").mkdir()
    with lock:
        pass


def test_lock_rejects_invalid_domid(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        xenctrl.SuspendEvtchnLock(-1, str(tmp_path))
    with pytest.raises(UsageError):
        xenctrl.SuspendEvtchnLock(xenctrl.DOMID_FIRST_RESERVED, str(tmp_path))


def test_the_precompiled_type_tables_are_those_of_the_declarations() -> None:
    """tools/gen_ffi.py --check: the out-of-line ABI modules were regenerated
    after the last change to a declaration (a stale one would call a C function
    with last month's prototype)."""
    tool = Path(__file__).resolve().parent.parent / "tools" / "gen_ffi.py"
    r = subprocess.run(
        [sys.executable, str(tool), "--check"], check=False, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_loading_the_backends_ffi_parses_nothing() -> None:
    """The point of the precompiled tables: neither pycparser nor cffi's parser
    is imported by a process that uses the real backends' FFIs."""
    code = (
        "import sys\n"
        "from torpor.hypervisor import libxl, xenctrl\n"
        "xenctrl.get_ffi(); libxl.get_ffi().typeof('libxl_ctx *')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pycparser', 'cffi.cparser'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"

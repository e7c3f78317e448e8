"""torpor acts with privilege only through sockets no other local user controls.

The rule (torpor.host.check_private_socket, docs/security.md): the socket,
not followed if a symlink, must be a Unix socket owned by our uid or root,
and every directory above it (symlinks resolved) must be owned by us or root
and writable by nobody else unless sticky.  Host.sim / Host.open("sim:DIR")
apply it to DIR/hypervisor.sock and DIR/xenstored/socket; Host.xen to the
xenstored socket.  Changing owners needs root: those tests are skipped
otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor.cli import main as cli_main
from torpor.errors import BackendUnavailable, UsageError
from torpor.facade import Torpor
from torpor.host import Host, check_private_socket
from torpor_sim.host import SimHost

OTHER_UID = 12345
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


@pytest.fixture
def parent() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sock", dir="/tmp"))
    yield d
    with contextlib.suppress(OSError):
        os.chown(d, 0, 0)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sim(parent: Path) -> Iterator[SimHost]:
    h = SimHost(parent / "h", qemu=False)
    h.start()
    h.create_guest("pv")
    yield h
    h.stop()


def _listening(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_a_safe_host_opens_and_works(sim: SimHost) -> None:
    with Torpor(Host.sim(sim.dir), own_host=True) as t:
        assert [d["domid"] for d in t.list_domains()] == [1]


@as_root
@pytest.mark.parametrize("which", ["hypervisor.sock", "xenstored/socket"])
def test_a_socket_owned_by_another_user_is_refused(sim: SimHost, which: str) -> None:
    sock = sim.dir / which
    os.chown(sock, OTHER_UID, OTHER_UID)
    try:
        with pytest.raises(UsageError, match=f"belongs to uid {OTHER_UID}"):
            Host.sim(sim.dir)
        with pytest.raises(UsageError):
            Host.open(f"sim:{sim.dir}")
    finally:
        os.chown(sock, 0, 0)
    Host.sim(sim.dir).close()  # and accepted again


@as_root
def test_a_directory_owned_by_another_user_is_refused(sim: SimHost, parent: Path) -> None:
    os.chown(parent, OTHER_UID, OTHER_UID)  # DIR's parent: its owner could rename DIR
    with pytest.raises(UsageError, match=f"directory {parent} belongs to uid {OTHER_UID}"):
        Host.sim(sim.dir)


@pytest.mark.parametrize(
    ("mode", "ok"), [(0o777, False), (0o770, False), (0o1777, True), (0o755, True)]
)
def test_a_directory_others_may_write_needs_the_sticky_bit(
    sim: SimHost, parent: Path, mode: int, ok: bool
) -> None:
    os.chmod(parent, mode)
    try:
        if ok:
            Host.sim(sim.dir).close()
        else:
            with pytest.raises(UsageError, match="without the sticky bit"):
                Host.sim(sim.dir)
    finally:
        os.chmod(parent, 0o700)


def test_not_a_socket_is_refused(parent: Path) -> None:
    d = parent / "fake"
    (d / "xenstored").mkdir(parents=True)
    (d / "hypervisor.sock").write_text("I am a file\n")
    with pytest.raises(UsageError, match="is not a socket"):
        Host.sim(d)
    os.unlink(d / "hypervisor.sock")
    os.mkfifo(d / "hypervisor.sock")
    with pytest.raises(UsageError, match="is not a socket"):
        Host.sim(d)


def test_a_socket_that_is_a_symlink_is_refused(sim: SimHost, parent: Path) -> None:
    d = parent / "links"
    (d / "xenstored").mkdir(parents=True)
    os.symlink(sim.hypervisor_socket, d / "hypervisor.sock")
    os.symlink(sim.xenstore_socket, d / "xenstored" / "socket")
    with pytest.raises(UsageError, match="is a symlink"):
        Host.sim(d)


def test_a_directory_symlink_is_resolved_once(sim: SimHost, parent: Path) -> None:
    """DIR may be a symlink to a safe directory: torpor then uses the real paths,
    so the symlink cannot be re-pointed between the check and the connection."""
    link = parent / "alias"
    os.symlink(sim.dir, link)
    host = Host.sim(link)
    try:
        assert host.xenstore_path == str(sim.dir.resolve() / "xenstored" / "socket")
        assert host.name == f"sim:{link}"
    finally:
        host.close()


def test_nothing_there_is_backend_unavailable(parent: Path) -> None:
    with pytest.raises(BackendUnavailable, match="no simulated host"):
        Host.sim(parent / "nothing")
    with pytest.raises(BackendUnavailable, match="no socket"):
        check_private_socket(parent / "absent.sock", "test")


@as_root
def test_the_cli_refuses_with_exit_code_2(sim: SimHost, capsys: pytest.CaptureFixture[str]) -> None:
    os.chown(sim.hypervisor_socket, OTHER_UID, OTHER_UID)
    try:
        assert cli_main(["--host", f"sim:{sim.dir}", "list"]) == 2
    finally:
        os.chown(sim.hypervisor_socket, 0, 0)
    assert "refusing to use it" in capsys.readouterr().err


@as_root
def test_host_xen_refuses_a_foreign_xenstored_socket(
    parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XENSTORED_PATH pointing at another user's socket: refused before anything
    else (on this machine without Xen, libxenctrl would say BackendUnavailable)."""
    path = parent / "xs"
    s = _listening(path)
    try:
        os.chown(path, OTHER_UID, OTHER_UID)
        monkeypatch.setenv("XENSTORED_PATH", str(path))
        with pytest.raises(UsageError, match=f"belongs to uid {OTHER_UID}"):
            Host.xen()
    finally:
        s.close()


def test_check_private_socket_accepts_ours_and_returns_the_real_path(parent: Path) -> None:
    real = parent / "real"
    real.mkdir()
    s = _listening(real / "s.sock")
    try:
        os.symlink(real, parent / "via")
        got = check_private_socket(parent / "via" / "s.sock", "test")
        assert got == str((real / "s.sock").resolve())
        assert stat.S_ISSOCK(os.lstat(got).st_mode)
    finally:
        s.close()

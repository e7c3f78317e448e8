"""Debian's xenstore-utils (Xen's C libxenstore) against the simulated xenstored."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
from collections.abc import Callable

import pytest

from .conftest import Served
from .xs_helpers import RawXs

pytestmark = [
    pytest.mark.ctools,
    pytest.mark.skipif(
        shutil.which("xenstore-read") is None,
        reason="Debian's xenstore-utils is not installed (apt-get install xenstore-utils)",
    ),
]

TIMEOUT = 10


def tool(
    served: Served, *args: str, domid: int = 0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["XENSTORED_PATH"] = served.sock if domid == 0 else served.guest(domid)
    return subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=TIMEOUT, check=check
    )


def test_write_read_ls_rm_exists(served: Served) -> None:
    tool(served, "xenstore-write", "/vm/a", "1", "/vm/b", "")
    assert tool(served, "xenstore-read", "/vm/a").stdout == "1\n"
    assert tool(served, "xenstore-read", "/vm/b").stdout == "\n"
    assert tool(served, "xenstore-ls", "/vm").stdout == 'a = "1"\nb = ""\n'
    assert tool(served, "xenstore-exists", "/vm/a").returncode == 0
    assert tool(served, "xenstore-exists", "/vm/zz", check=False).returncode == 1
    tool(served, "xenstore-rm", "/vm/a")
    assert tool(served, "xenstore-exists", "/vm/a", check=False).returncode == 1
    r = tool(served, "xenstore-read", "/vm/a", check=False)
    assert r.returncode != 0
    assert "couldn't read path /vm/a" in r.stderr


def test_chmod_and_ls_p(served: Served) -> None:
    tool(served, "xenstore-write", "/c/x", "v")
    tool(served, "xenstore-chmod", "/c/x", "n1", "r0", "b2")
    assert "(n1,r0,b2)" in tool(served, "xenstore-ls", "-p", "/c").stdout
    r = tool(served, "xenstore-chmod", "/c/x", "q1", check=False)
    assert r.returncode != 0


def test_guest_tools_relative_paths_and_permission_errors(served: Served) -> None:
    tool(served, "xenstore-write", "/local/domain/1/name", "one", "/local/domain/2/name", "two")
    tool(served, "xenstore-chmod", "/local/domain/1", "n1")
    tool(served, "xenstore-chmod", "/local/domain/1/name", "n1")
    tool(served, "xenstore-chmod", "/local/domain/2", "n2")
    tool(served, "xenstore-chmod", "/local/domain/2/name", "n2")
    assert tool(served, "xenstore-read", "name", domid=1).stdout == "one\n"
    tool(served, "xenstore-write", "data/x", "from-guest", domid=1)
    assert tool(served, "xenstore-read", "/local/domain/1/data/x").stdout == "from-guest\n"
    r = tool(served, "xenstore-read", "/local/domain/2/name", domid=1, check=False)
    assert r.returncode != 0
    r = tool(served, "xenstore-write", "/local/domain/2/x", "no", domid=1, check=False)
    assert r.returncode != 0
    r = tool(served, "xenstore-chmod", "data/x", "n0", domid=1, check=False)
    assert "Operation not permitted" in r.stderr  # EPERM: guests can't give nodes away
    r = tool(served, "xenstore-chmod", "data/x", "n1", *(f"r{d}" for d in (0, 2, 3, 4, 5)),
             domid=1, check=False)  # fmt: skip
    assert "No space left on device" in r.stderr  # ENOSPC: 6 > 5 permissions


def test_large_directory_via_directory_part(served: Served) -> None:
    names = [f"entry-with-quite-a-long-name-{i:04d}" for i in range(160)]
    args = []
    for n in names:
        args += [f"/big/{n}", "v"]
    tool(served, "xenstore-write", *args)
    # xenstore-ls gets E2BIG on XS_DIRECTORY and falls back to XS_DIRECTORY_PART.
    out = tool(served, "xenstore-ls", "/big").stdout.splitlines()
    assert out == [f'{n} = "v"' for n in names]


def test_xenstore_watch_counts_initial_and_change_events(
    served: Served, raw: Callable[..., RawXs]
) -> None:
    env = dict(os.environ, XENSTORED_PATH=served.sock)
    proc = subprocess.Popen(
        ["xenstore-watch", "-n", "3", "/wt"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        # The first line is the registration event: the watch is in place.
        assert sel.select(TIMEOUT), "xenstore-watch printed nothing"
        assert proc.stdout.readline() == "/wt\n"
        c = raw()
        c.write("/wt/a", "1")
        c.write("/other", "x")  # not below /wt: no event
        c.rm("/wt/a")
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert out == "/wt/a\n/wt/a\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

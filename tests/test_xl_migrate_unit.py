"""Real Xen's side of a migration, without Xen: what torpor hands libxenguest and
what it reads of xl's stream (the lab runs the real thing: tests/xen/test_migrate_real.py)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from torpor.errors import ImageError
from torpor.model import PrecopyStats
from torpor.xl import XlBuilder, XlSaveJob
from torpor.xl_savefile import read_xl_header, renamed_config, xl_header

CONFIG = json.dumps({"c_info": {"name": "web", "uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"},
                     "b_info": {}})  # fmt: skip


def reader(data: bytes) -> Any:
    f = io.BytesIO(data)

    def read(n: int, what: str) -> bytes:
        got = f.read(n)
        if len(got) != n:
            raise ImageError(f"short {what}")
        return got

    return read


def test_the_xl_header_read_from_a_stream_is_the_one_written() -> None:
    assert read_xl_header(reader(xl_header(CONFIG.encode() + b"\0") + b"LibxlFmt")) == CONFIG


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b"Xen saved domain, xm format\n \0 \r" + b[32:], "not an xl migration stream"),
        (lambda b: b[:36] + (1).to_bytes(4, "little") + b[40:], "legacy"),  # JSON, stream v1
        (lambda b: b[:36] + (2).to_bytes(4, "little") + b[40:], "no JSON"),  # v2 without JSON
        (lambda b: b[:36] + (8).to_bytes(4, "little") + b[40:], "unsupported mandatory flags"),
        (lambda b: b[:60], "short"),
    ],
)
def test_a_bad_xl_header_is_refused(damage: Any, match: str) -> None:
    good = xl_header(CONFIG.encode() + b"\0")
    with pytest.raises(ImageError, match=match):
        read_xl_header(reader(damage(good)))


def test_the_incoming_name_keeps_the_guests_uuid() -> None:
    incoming = json.loads(renamed_config(CONFIG, "web--incoming", fresh_uuid=False))
    assert incoming["c_info"] == {
        "name": "web--incoming",
        "uuid": json.loads(CONFIG)["c_info"]["uuid"],
    }
    copy = json.loads(renamed_config(CONFIG, "web2"))
    assert copy["c_info"]["uuid"] != json.loads(CONFIG)["c_info"]["uuid"]


def test_a_live_write_hands_libxenguest_the_policy_and_qemus_logdirty(tmp_path: Any) -> None:
    seen: dict[str, Any] = {}

    def fake_save(fd: int, domid: int, suspend: Any, **kw: Any) -> None:
        seen.update(kw, domid=domid)
        # libxenguest asks the policy, switches QEMU's log-dirty, then suspends
        seen["first"] = kw["precopy_policy"](PrecopyStats(0, 0, 1000))
        kw["qemu_logdirty"](True)
        assert suspend()

    calls: list[object] = []
    b = XlBuilder(domain_save=fake_save)
    job = XlSaveJob(domid=5, config=CONFIG.encode() + b"\0", guest_type="hvm")
    with (tmp_path / "s").open("wb") as f:
        b.write_save(
            job,
            f.fileno(),
            lambda: True,
            lambda: b"QEVM",
            live=True,
            precopy_policy=lambda s: calls.append(s) or False,
            qemu_logdirty=calls.append,
        )
    assert seen["live"] is True and seen["hvm"] is True and seen["first"] is False
    assert calls == [PrecopyStats(0, 0, 1000), True]


def test_a_non_live_write_calls_xc_domain_save_as_before(tmp_path: Any) -> None:
    seen: dict[str, Any] = {}

    def fake_save(fd: int, domid: int, suspend: Any, *, hvm: bool) -> None:  # the old signature
        seen["hvm"] = hvm
        assert suspend()

    b = XlBuilder(domain_save=fake_save)
    job = XlSaveJob(domid=5, config=CONFIG.encode() + b"\0", guest_type="pv")
    with (tmp_path / "s").open("wb") as f:
        b.write_save(job, f.fileno(), lambda: True, lambda: None)
    assert seen == {"hvm": False}

"""The simulated HVM guests' agent: qemu-ga 7.2's protocol for a boot-sector guest.

:class:`GuestAgentShim` works on either device model
(:mod:`torpor_sim.devicemodel`); :mod:`torpor_sim.hvm` serves one for each
HVM guest, where the misbehaviours act.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from torpor.errors import DeviceModelError, Timeout
from torpor_sim import hvm_image
from torpor_sim.devicemodel import DeviceModelProcess
from torpor_sim.qmp_server import UnixServer

__all__ = ["GuestAgentShim"]


class GuestAgentShim:
    """Serves the qemu-ga protocol on a Unix socket for a boot-sector guest.

    A guest agent cannot fit in a boot sector; this stands for the in-guest
    agent.  Like qemu-ga it answers only while the guest runs (a paused or
    sleeping guest's agent is silent), discards its parser state on a 0xFF
    byte, answers ``guest-sync-delimited`` after a 0xFF sentinel, and sends
    **no reply** to a successful ``guest-suspend-ram`` (qga/qapi-schema.json):
    it turns it into :meth:`DeviceModelProcess.request_s3`.  A guest that
    found no FADT cannot sleep: that is an error reply, as qemu-ga gives when
    the guest kernel lacks S3.

    Filesystem freeze, as qemu-ga 7.2 on Linux does it (qga/commands-posix.c,
    qga/main.c); the guest has one filesystem, whose freeze flag lives in
    guest memory (``fs_frozen``, :mod:`torpor_sim.hvm_image`), so a freeze
    survives S3, a save and a migration as the guest's kernel state does,
    and a reboot clears it:

    * ``guest-fsfreeze-freeze`` freezes it (``FIFREEZE``; the guest's writer
      then blocks) and returns the number of filesystems frozen, 1;
    * ``guest-fsfreeze-status`` returns ``"frozen"`` or ``"thawed"``;
    * ``guest-fsfreeze-thaw`` thaws it and returns the number thawed (1, or
      0 when nothing was frozen: not an error);
    * while frozen, qemu-ga disables every command but those of its
      ``ga_freeze_allowlist`` (ping, info, sync, sync-delimited, fsfreeze
      status and thaw): a second ``guest-fsfreeze-freeze`` and
      ``guest-suspend-ram`` are refused with ``CommandNotFound`` "Command
      ... has been disabled: the agent is in frozen state" (qmp-dispatch.c),
      and ``guest-info`` shows them ``enabled: false``.  A guest can still be
      suspended without its agent (a hard suspend) with its filesystem frozen.
    """

    VERSION = "7.2.0"
    COMMANDS = (
        "guest-sync-delimited",
        "guest-sync",
        "guest-ping",
        "guest-info",
        "guest-suspend-ram",
        "guest-fsfreeze-status",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    )
    #: qga/main.c ``ga_freeze_allowlist``: what still runs while filesystems are frozen.
    FROZEN_ALLOWED = frozenset(
        {
            "guest-ping",
            "guest-info",
            "guest-sync",
            "guest-sync-delimited",
            "guest-fsfreeze-status",
            "guest-fsfreeze-thaw",
        }
    )

    def __init__(self, dm: DeviceModelProcess, path: str | os.PathLike[str]) -> None:
        self.dm = dm
        self.path = Path(path)
        self._server = UnixServer(self.path, self._serve)

    async def start(self) -> None:
        """Bind and listen (the socket exists when this returns)."""
        await self._server.start()

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        self._server.close()
        await self._server.wait_closed()

    async def __aenter__(self) -> GuestAgentShim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(DeviceModelError, Timeout):
            while line := await reader.readline():
                # 0xFF is invalid JSON: qemu-ga's lexer drops what it had and starts afresh.
                text = line.rsplit(b"\xff", 1)[-1].strip()
                if not text:
                    continue
                # The agent runs inside the guest: nothing is answered while it is not running.
                await self.dm.wait_run_state({"running"}, timeout=3600.0)
                reply = await self._handle(text)
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()

    async def _handle(self, text: bytes) -> bytes | None:
        try:
            msg = json.loads(text)
        except ValueError:
            return self._error("GenericError", "JSON parse error")
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            return self._error("GenericError", "Invalid JSON syntax")
        cmd: str = msg["execute"]
        args: Any = msg.get("arguments") or {}
        if cmd not in self.COMMANDS:
            return self._error("CommandNotFound", f"The command {cmd} has not been found")
        frozen = self.frozen()
        if frozen and cmd not in self.FROZEN_ALLOWED:
            return self._error(
                "CommandNotFound", f"Command {cmd} has been disabled: the agent is in frozen state"
            )
        if cmd == "guest-sync-delimited":
            return b"\xff" + self._ok(args.get("id"))
        if cmd == "guest-sync":
            return self._ok(args.get("id"))
        if cmd == "guest-ping":
            return self._ok({})
        if cmd == "guest-info":
            supported = [
                {
                    "name": c,
                    "enabled": not frozen or c in self.FROZEN_ALLOWED,
                    "success-response": c != "guest-suspend-ram",
                }
                for c in self.COMMANDS
            ]
            return self._ok({"version": self.VERSION, "supported_commands": supported})
        if cmd == "guest-suspend-ram":
            if self.dm.read_counters().pm1a_cnt == 0:
                return self._error("GenericError", "the guest found no ACPI FADT: S3 not supported")
            await self.dm.request_s3()
            return None
        if cmd == "guest-fsfreeze-status":
            return self._ok("frozen" if frozen else "thawed")
        if cmd == "guest-fsfreeze-freeze":
            self.dm.write_memory(hvm_image.FS_FROZEN_ADDR, b"\x01")
            return self._ok(1)
        # guest-fsfreeze-thaw
        self.dm.write_memory(hvm_image.FS_FROZEN_ADDR, b"\x00")
        return self._ok(1 if frozen else 0)

    def frozen(self) -> bool:
        """Whether the guest's filesystem is frozen (read from its memory)."""
        return self.dm.read_memory(hvm_image.FS_FROZEN_ADDR, 1) != b"\x00"

    @staticmethod
    def _ok(value: object) -> bytes:
        return json.dumps({"return": value}).encode() + b"\n"

    @staticmethod
    def _error(error_class: str, desc: str) -> bytes:
        return json.dumps({"error": {"class": error_class, "desc": desc}}).encode() + b"\n"

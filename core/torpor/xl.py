"""Real Xen's domain builder: xl's save files, libxl's domains.

:class:`XlBuilder` is the :class:`~torpor.builder.DomainBuilder` (and
:class:`~torpor.builder.FileSaver`) of :meth:`torpor.host.Host.xen`.

``torpor save DOMID FILE`` writes what ``xl save`` writes
(:mod:`torpor.xl_savefile`): xl's header and the domain's libxl
configuration (``libxl_retrieve_domain_configuration`` +
``libxl_domain_config_to_json``, ``c_info.domid`` reset to 0 as xl does),
libxl's stream v2 header and its ``LIBXC_CONTEXT`` record, then
libxenguest's own stream written straight to the same descriptor by
``xc_domain_save`` -- which calls torpor's suspend (the orchestrator's, with
its checks, hooks and deadlines) as its suspend callback -- then, for HVM,
the device model's physmap keys (``EMULATOR_XENSTORE_DATA``) and QEMU's
``xen-save-devices-state`` output (``EMULATOR_CONTEXT``), then ``END``.
``xl restore FILE`` restores it.

``torpor restore FILE`` of such a file delegates the building to libxl, as
``xl restore`` does: the file is walked to its END first (nothing is created
from a corrupt or truncated file), the config is read from it, and
``libxl_domain_create_restore`` builds the domain from libxl's stream at the
offset xl would hand it (libxl runs ``libxl-save-helper`` for libxc's part,
starts QEMU for HVM, writes the xenstore tree, adds the backends); the
domain is left paused, then ``libxl_domain_unpause`` (QEMU ``cont`` first)
starts it, and torpor waits for the guest to run and its frontends to
reconnect.  Unlike ``xl restore`` no xl process stays behind to act on the
guest's later reboot or poweroff (``on_reboot`` etc.): the domain simply
stays shut down, as after ``xl restore -e``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from torpor.errors import BackendUnavailable, ImageError
from torpor.xl_savefile import (
    LibxlRecord,
    config_for_save,
    config_type,
    emulator_record,
    libxl_record,
    libxl_stream_header,
    read_save_file,
    renamed_config,
    xenstore_data,
    xl_header,
)

if TYPE_CHECKING:
    from torpor.builder import DomainBuilder, FileSaver
    from torpor.image import SavedDomain
    from torpor.model import PrecopyStats
    from torpor.xenstore import Xenstore

__all__ = ["XlBuilder", "XlSaveJob"]


@attrs.frozen
class XlSaveJob:
    """What :meth:`XlBuilder.prepare_save` learnt before the guest is touched."""

    domid: int
    #: the config as it goes into the file (libxl JSON + NUL)
    config: bytes
    #: libxl's domain type (c_info.type): pv, pvh, hvm
    guest_type: str

    @property
    def hvm(self) -> bool:
        """libxc saves PVH and HVM guests alike (x86 HVM stream); only HVM has QEMU."""
        return self.guest_type != "pv"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class XlBuilder:
    """Saves to and restores from xl's save format; builds and destroys with libxl.

    :param xenstore: dom0's xenstore connection (for an HVM device model's
        physmap keys).
    :param libxl_factory: makes the libxl context (default
        :class:`torpor.hypervisor.libxl.Libxl`, loaded on first use).
    :param domain_save: ``xc_domain_save``'s wrapper (default
        :func:`torpor.hypervisor.libxl.domain_save`).
    """

    name = "xl"
    file_format = "xl"

    def __init__(
        self,
        *,
        xenstore: Callable[[], Xenstore] | None = None,
        libxl_factory: Callable[[], Any] | None = None,
        domain_save: Callable[..., None] | None = None,
    ) -> None:
        self._xenstore = xenstore
        self._libxl_factory = libxl_factory
        self._domain_save = domain_save
        self._libxl: Any = None
        self._lock = threading.Lock()

    @property
    def libxl(self) -> Any:
        """The libxl context (created on first use; BackendUnavailable if it can't be)."""
        with self._lock:
            if self._libxl is None:
                factory = self._libxl_factory
                if factory is None:
                    from torpor.hypervisor.libxl import Libxl

                    factory = Libxl
                self._libxl = factory()
            return self._libxl

    # -- save ------------------------------------------------------------------

    def prepare_save(self, domid: int) -> XlSaveJob:
        import json

        config = config_for_save(self.libxl.domain_config_json(domid))
        guest_type = config_type(json.loads(config[:-1]))
        if guest_type not in ("pv", "pvh", "hvm"):
            raise ImageError(f"domain {domid}: unknown libxl domain type {guest_type!r}")
        return XlSaveJob(domid=domid, config=config, guest_type=guest_type)

    def write_save(
        self,
        job: XlSaveJob,
        fd: int,
        suspend: Callable[[], bool],
        device_model_state: Callable[[], bytes | None],
        *,
        live: bool = False,
        precopy_policy: Callable[[PrecopyStats], bool] | None = None,
        qemu_logdirty: Callable[[bool], None] | None = None,
    ) -> None:
        """xl's save format to ``fd`` (a file, or a migration's channel).

        ``live``: ``xc_domain_save`` with ``XCFLAGS_LIVE`` (precopy rounds
        asking ``precopy_policy``; ``qemu_logdirty`` is libxl's
        ``switch_qemu_logdirty``), as ``xl migrate`` sends a guest.
        """
        _write_all(
            fd,
            xl_header(job.config) + libxl_stream_header() + libxl_record(LibxlRecord.LIBXC_CONTEXT),
        )
        save = self._domain_save
        if save is None:
            from torpor.hypervisor.libxl import domain_save

            save = domain_save
        if live:
            save(
                fd,
                job.domid,
                suspend,
                hvm=job.hvm,
                live=True,
                precopy_policy=precopy_policy,
                qemu_logdirty=qemu_logdirty,
            )
        else:
            save(fd, job.domid, suspend, hvm=job.hvm)
        tail = b""
        if job.guest_type == "hvm":
            pairs = self._physmap(job.domid)
            if pairs:
                tail += emulator_record(LibxlRecord.EMULATOR_XENSTORE_DATA, xenstore_data(pairs))
            state = device_model_state()
            if state is None:
                raise ImageError(
                    f"domain {job.domid}: no device model state to save (QEMU's "
                    "xen-save-devices-state did not run)",
                    domid=job.domid,
                )
            tail += emulator_record(LibxlRecord.EMULATOR_CONTEXT, state)
        _write_all(fd, tail + libxl_record(LibxlRecord.END))

    def _physmap(self, domid: int) -> list[tuple[str, str]]:
        """libxl__save_emulator_xenstore_data: the device model's physmap keys,
        relative to /local/domain/0/device-model/<domid>."""
        if self._xenstore is None:
            return []
        xs = self._xenstore()
        root = f"/local/domain/0/device-model/{domid}"
        entries = xs.ls(f"{root}/physmap") if xs.exists(f"{root}/physmap") else []
        pairs = []
        for entry in entries:
            for sub in ("start_addr", "size", "name"):
                key = f"physmap/{entry}/{sub}"
                pairs.append((key, str(xs.read(f"{root}/{key}"))))
        return pairs

    def verify_save(self, path: str) -> dict[str, Any]:
        return read_save_file(path).summary()

    # -- restore -----------------------------------------------------------------

    def restore_file(self, path: str, *, name: str | None = None) -> int:
        """``xl restore FILE``; ``name``: under that name instead of the config's
        (``c_info.name`` rewritten, with a fresh ``c_info.uuid``: a copy)."""
        info = read_save_file(path)
        if not info.config_json:
            raise ImageError(f"{path}: the file carries no domain configuration")
        config = info.config_json
        if name is not None and name != info.name:
            config = renamed_config(config, name)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.lseek(fd, info.stream_offset, os.SEEK_SET)
            domid: int = self.libxl.create_restore(config, fd)
            return domid
        finally:
            os.close(fd)

    def restore_stream(self, config_json: str, fd: int) -> int:
        """``xl migrate-receive``'s build: ``libxl_domain_create_restore`` reading
        libxl's stream from ``fd`` (xl's header already read from it); the new
        domain is left paused.  Returns its domid."""
        domid: int = self.libxl.create_restore(config_json, fd)
        return domid

    def start(self, domid: int) -> None:
        self.libxl.unpause(domid)

    # -- the DomainBuilder protocol ------------------------------------------------

    def save(self, domid: int) -> SavedDomain:
        raise BackendUnavailable(
            "on real Xen torpor saves to xl's save format only (torpor save DOMID FILE); "
            "migration between real Xen hosts is not implemented",
            domid=domid,
        )

    def restore(self, saved: SavedDomain) -> int:
        raise ImageError(
            "this is torpor's own save image, written on a simulated host; real Xen "
            "restores xl save files (written by `torpor save` or `xl save` on real Xen)"
        )

    def destroy(self, domid: int) -> None:
        self.libxl.destroy(domid)

    def close(self) -> None:
        with self._lock:
            lib, self._libxl = self._libxl, None
        if lib is not None:
            lib.close()


if TYPE_CHECKING:

    def _conforms(b: XlBuilder) -> tuple[DomainBuilder, FileSaver]:
        return b, b

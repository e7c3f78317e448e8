"""Domain names: ``libxl__domain_rename`` (tools/libs/light/libxl_domain.c, 4.17).

A migration renames: the receiver builds ``NAME--incoming`` and renames it
``NAME`` once it may start it; the sender renames its source
``NAME--migratedaway`` first, and back if the receiver gives the guest back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torpor.errors import MigrationFailed, NameInUse, TorporError
from torpor.model import Phase
from torpor.operations.restore import domain_named

if TYPE_CHECKING:
    from torpor.orchestrator import Orchestrator

__all__ = ["rename_domain"]


async def rename_domain(orch: Orchestrator, domid: int, old: str | None, new: str) -> None:
    """Rename ``domid`` from ``old`` to ``new`` as libxl does.

    A name another domain has is refused (:class:`~torpor.errors.NameInUse`:
    "Domain with name ... already exists"); then, in one xenstore
    transaction, ``/local/domain/<domid>/name`` -- which must still say
    ``old`` ("allegedly named ... is actually named ...": a race) -- and
    ``/vm/<uuid>/name`` are written.
    """
    holder = await domain_named(orch, new)
    if holder is not None and holder != domid:
        raise NameInUse(
            f"domain {holder} is already named {new!r}: domain {domid} not renamed",
            name=new,
            holder=holder,
            domid=domid,
            phase=Phase.VALIDATE,
        )
    xs = orch.host.xenstore.aio
    path = f"/local/domain/{domid}/name"
    uuid = orch.host.hypervisor.domain_info(domid).uuid

    async def body(tx: Any) -> None:
        got = await xs.read_or(path, None, tx=tx)
        if old is not None and got != old:
            raise MigrationFailed(
                f"domain {domid}, allegedly named {old!r}, is actually named {got!r}: "
                f"not renamed to {new!r}",
                domid=domid,
            )
        await xs.write(path, new, tx=tx)
        if uuid and uuid.strip("0-"):
            await xs.write(f"/vm/{uuid}/name", new, tx=tx)

    try:
        await xs.run_transaction(body)
    except MigrationFailed:
        raise
    except TorporError as e:
        raise MigrationFailed(
            f"renaming domain {domid} to {new!r} failed: {e.message}", domid=domid, cause=e
        ) from e

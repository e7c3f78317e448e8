"""A torpor plugin under which a restored guest never counts as resumed: the
receiving end of a migration refuses to start it (``-p refuse_start_plugin``)."""

from __future__ import annotations

from typing import Any

from torpor import Verdict, hookimpl


@hookimpl(tryfirst=True)
def torpor_check_resumed(ctx: Any) -> Verdict | None:
    if ctx.operation == "restore":
        return Verdict.fail(
            "refused", "refuse_start_plugin: this host does not start migrated guests"
        )
    return None

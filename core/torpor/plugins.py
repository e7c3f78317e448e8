"""The plugin manager factory: torpor's generic protocol, then guest-type plugins.

Like tox 4 and pluggy's eggsample, there is no global plugin manager: each
:class:`~torpor.orchestrator.Orchestrator` gets its own from
:func:`get_plugin_manager`.  Registration order:

1. :mod:`torpor.protocol` -- Xen's generic mechanisms (the xenstore handshake,
   the suspend event channel, hard shutdown; "suspended" = shut down with
   reason suspend).  Registered first, so ``firstresult`` hooks ask it last.
2. every plugin of the ``torpor`` entry-point group -- the built-in ``pv``,
   ``pvhvm`` and ``hvm`` plugins load this way, exactly as a third party's do
   -- unless ``TORPOR_DISABLE_PLUGIN_AUTOLOAD`` is set;
3. plugins passed explicitly (``plugins=``, the CLI's ``-p MODULE``).

Then ``check_pending()``: a hook implementation whose name matches no spec is
an error (a typo would otherwise be silently ignored).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any

import pluggy

from torpor import hookspecs
from torpor.errors import UsageError

__all__ = ["ENTRY_POINT_GROUP", "get_plugin_manager", "plugin_names"]

ENTRY_POINT_GROUP = "torpor"
AUTOLOAD_ENV = "TORPOR_DISABLE_PLUGIN_AUTOLOAD"


def get_plugin_manager(
    *,
    plugins: Iterable[Any] = (),
    block: Iterable[str] = (),
    autoload: bool | None = None,
) -> pluggy.PluginManager:
    """A new plugin manager with torpor's hook specs and plugins registered.

    :param plugins: extra plugins: module objects, instances, or dotted module names.
    :param block: plugin names not to load (``"pvhvm"``, an entry-point name).
    :param autoload: load the ``torpor`` entry points; default: unless
        ``TORPOR_DISABLE_PLUGIN_AUTOLOAD`` is set in the environment.
    """
    from torpor import protocol

    pm = pluggy.PluginManager("torpor")
    pm.add_hookspecs(hookspecs)
    pm.register(protocol, name="torpor.protocol")
    for name in block:
        pm.set_blocked(name)
    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    if autoload:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for item in plugins:
        plugin = item
        if isinstance(item, str):
            try:
                plugin = importlib.import_module(item)
            except ImportError as e:
                raise UsageError(f"cannot load torpor plugin {item!r}: {e}", cause=e) from e
        if pm.is_registered(plugin):
            continue
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise UsageError(f"invalid torpor plugin: {e}", cause=e) from e
    return pm


def plugin_names(pm: pluggy.PluginManager) -> list[tuple[str, str]]:
    """``(name, where it came from)`` for every registered plugin, in call order."""
    dists = {id(p): f"{d.project_name} {d.version}" for p, d in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        origin = dists.get(id(plugin)) or getattr(plugin, "__name__", type(plugin).__name__)
        out.append((name, str(origin)))
    return out

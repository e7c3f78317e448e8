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
3. plugins passed explicitly (``plugins=``, the CLI's ``-p MODULE``), each
   named by the caller (``("fsfreeze", obj)``), else by its module's name
   (a module) or its class's dotted name (an object).

Then ``check_pending()``: a hook implementation whose name matches no spec is
an error (a typo would otherwise be silently ignored).

**Who is asked first.**  pluggy calls the implementations of a hook from
the most recently registered to the first, except that ``tryfirst=True``
implementations come before all others and ``trylast=True`` ones after.  So
for ``firstresult`` hooks -- ``torpor_classify_domain`` above all -- a plugin
passed explicitly is asked before the entry-point plugins, and those before
:mod:`torpor.protocol`.  Among entry-point plugins the order is the order
the installed distributions are found in, which nobody controls: a
third-party type that must win over a built-in one for the same domains
(a Windows PV-drivers type over ``pvhvm``) marks its classifier
``@hookimpl(tryfirst=True)``.  :func:`ask_order` says the order one hook
asks in; ``torpor plugins`` prints it.
"""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Iterable
from typing import Any

import pluggy

from torpor import hookspecs
from torpor.errors import UsageError

__all__ = [
    "ENTRY_POINT_GROUP",
    "ask_order",
    "get_plugin_manager",
    "plugin_names",
    "refuse_wrappers",
]

ENTRY_POINT_GROUP = "torpor"
AUTOLOAD_ENV = "TORPOR_DISABLE_PLUGIN_AUTOLOAD"


def get_plugin_manager(
    *,
    plugins: Iterable[Any] = (),
    block: Iterable[str] = (),
    autoload: bool | None = None,
) -> pluggy.PluginManager:
    """A new plugin manager with torpor's hook specs and plugins registered.

    :param plugins: extra plugins: module objects, instances, dotted module names,
        or ``(name, plugin)`` pairs to give one a name (for errors and
        ``torpor plugins``).
    :param block: plugin names not to load (``"pvhvm"``, an entry-point name).
    :param autoload: load the ``torpor`` entry points; default: unless
        ``TORPOR_DISABLE_PLUGIN_AUTOLOAD`` is set in the environment.
    """
    from torpor import protocol

    pm = pluggy.PluginManager("torpor")
    pm.add_hookspecs(hookspecs)
    pm.register(protocol, name="torpor.protocol")
    for blocked in block:
        pm.set_blocked(blocked)
    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    if autoload:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for item in plugins:
        name: str | None = None
        plugin = item
        if isinstance(item, tuple):
            name, plugin = item
        if isinstance(plugin, str):
            try:
                plugin = importlib.import_module(plugin)
            except ImportError as e:
                raise UsageError(f"cannot load torpor plugin {plugin!r}: {e}", cause=e) from e
        if pm.is_registered(plugin):
            continue
        pm.register(plugin, name=_unique(pm, name or _default_name(plugin)))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise UsageError(f"invalid torpor plugin: {e}", cause=e) from e
    return pm


def _default_name(plugin: Any) -> str:
    """A module's name, or an object's class's dotted name (never ``id()``)."""
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    cls = plugin if isinstance(plugin, type) else type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _unique(pm: pluggy.PluginManager, name: str) -> str:
    if pm.get_plugin(name) is None and not pm.is_blocked(name):
        return name
    n = 2
    while pm.get_plugin(f"{name}#{n}") is not None:
        n += 1
    return f"{name}#{n}"


def plugin_names(pm: pluggy.PluginManager) -> list[tuple[str, str]]:
    """``(name, where it came from)`` for every registered plugin, in the order
    hooks ask them (the most recently registered first; ``tryfirst`` and
    ``trylast`` reorder single hooks: see :func:`ask_order`)."""
    dists = {id(p): f"{d.project_name} {d.version}" for p, d in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in reversed(pm.list_name_plugin()):
        if plugin is None:
            continue
        origin = dists.get(id(plugin)) or getattr(plugin, "__name__", type(plugin).__name__)
        out.append((name, str(origin)))
    return out


def ask_order(pm: pluggy.PluginManager, hook: str) -> list[str]:
    """The plugins implementing ``hook``, in the order they are asked."""
    caller: pluggy.HookCaller = getattr(pm.hook, hook)
    return [impl.plugin_name for impl in reversed(caller.get_hookimpls())]


def refuse_wrappers(pm: pluggy.PluginManager) -> None:
    """torpor calls hooks itself (awaiting coroutines): wrappers cannot work, so refuse them."""
    for caller in pm.hook.__dict__.values():
        if not isinstance(caller, pluggy.HookCaller) or not caller.name.startswith("torpor_"):
            continue
        for impl in caller.get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                raise UsageError(
                    f"plugin {impl.plugin_name!r}: torpor hooks take no wrappers "
                    f"({caller.name}); use the lifecycle hooks instead"
                )

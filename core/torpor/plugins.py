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

import contextlib
import importlib
import json
import os
import re
import sys
import types
import zlib
from collections.abc import Iterable
from typing import Any

import pluggy

from torpor import hookspecs
from torpor.errors import UsageError

__all__ = [
    "ENTRY_POINT_GROUP",
    "EntryPoint",
    "TorporPluginManager",
    "ask_order",
    "entry_points",
    "get_plugin_manager",
    "plugin_distributions",
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

    pm = TorporPluginManager("torpor")
    pm.add_hookspecs(hookspecs)
    pm.register(protocol, name="torpor.protocol")
    for blocked in block:
        pm.set_blocked(blocked)
    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    if autoload:
        pm.load_entry_points(ENTRY_POINT_GROUP)
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
    dists = plugin_distributions(pm)
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


# -- entry points, found without importlib.metadata ----------------------------------


class EntryPoint(tuple[str, str, str, str]):
    """``(name, value, distribution, version)`` of one entry point."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return self[0]

    @property
    def value(self) -> str:
        return self[1]

    def load(self) -> Any:
        """``module`` or ``module:attr.attr`` (the entry-point syntax), imported."""
        module, _, attrs = self.value.partition(":")
        obj: Any = importlib.import_module(module.strip())
        for part in filter(None, attrs.strip().split(".")):
            obj = getattr(obj, part)
        return obj


class TorporPluginManager(pluggy.PluginManager):
    """pluggy's manager, loading entry points with :func:`entry_points`."""

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        #: plugin name -> "distribution version" of what entry points loaded
        self.entry_point_origins: dict[str, str] = {}

    def load_entry_points(self, group: str) -> int:
        """Register every plugin of entry-point ``group`` (as pluggy's
        ``load_setuptools_entrypoints``: a name already registered or blocked is
        skipped); the number loaded."""
        count = 0
        for ep in entry_points(group):
            if self.get_plugin(ep.name) is not None or self.is_blocked(ep.name):
                continue
            self.register(ep.load(), name=ep.name)
            self.entry_point_origins[ep.name] = f"{ep[2]} {ep[3]}"
            count += 1
        return count


def plugin_distributions(pm: pluggy.PluginManager) -> dict[int, str]:
    """``id(plugin)`` -> "distribution version" for plugins loaded from entry points."""
    out = {id(p): f"{d.project_name} {d.version}" for p, d in pm.list_plugin_distinfo()}
    for name, origin in getattr(pm, "entry_point_origins", {}).items():
        plugin = pm.get_plugin(name)
        if plugin is not None:
            out[id(plugin)] = origin
    return out


def entry_points(group: str) -> list[EntryPoint]:
    """The entry points of ``group`` of the distributions on ``sys.path``, in the
    order ``importlib.metadata`` finds them (``sys.path`` order, each directory's
    listing order).

    ``importlib.metadata`` (what pluggy uses) costs a CLI ~10 ms of imports and
    reads every installed distribution's metadata on every start.  Here the
    ``*.dist-info`` / ``*.egg-info`` directories are read directly (only
    ``entry_points.txt``, and ``METADATA`` where the group has an entry), and
    the answer is cached in ``$XDG_CACHE_HOME/torpor`` keyed on each
    ``sys.path`` directory's modification time -- which changes whenever a
    distribution is installed, upgraded or removed there (its metadata
    directory is created or renamed) -- so a start with nothing installed since
    costs one ``stat`` per path entry and one small read.
    """
    key = []
    for entry in sys.path:
        path = entry or "."
        try:
            st = os.stat(path)
        except OSError:
            continue
        key.append([path, st.st_mtime_ns])
    cache = _cache_file(group)
    if cache is not None:
        try:
            with open(cache, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("key") == key:
                return [EntryPoint(tuple(e)) for e in saved["entry_points"]]
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    found = _scan(group)
    if cache is not None:
        _save(cache, {"key": key, "entry_points": [list(e) for e in found]})
    return found


def _cache_file(group: str) -> str | None:
    if os.environ.get("TORPOR_NO_ENTRY_POINT_CACHE"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    # One file per interpreter and path: two venvs never share an answer.
    tag = f"{sys.prefix} {sys.path}".encode()
    return os.path.join(
        base, "torpor", f"entry-points-{_CACHE_FORMAT}-{group}-{zlib.crc32(tag):08x}.json"
    )


#: bumped whenever what :func:`_scan` finds changes for the same files
_CACHE_FORMAT = 2


def _save(cache: str, data: dict[str, Any]) -> None:
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, cache)
    except OSError:  # a read-only home: no cache, same answer
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _scan(group: str) -> list[EntryPoint]:
    found: list[EntryPoint] = []
    seen: set[str] = set()  # a distribution found twice counts once (the first)
    for entry in sys.path:
        path = entry or "."
        try:
            names = os.listdir(path)
        except OSError:  # absent, or a zip file: no distributions of ours in either
            continue
        # importlib.metadata's order: a directory's .dist-info before its .egg-info
        metas = [n for n in names if n.endswith(".dist-info")]
        metas += [n for n in names if n.endswith(".egg-info")]
        for meta in metas:
            norm = re.sub(r"[-_.]+", "_", meta.rsplit(".", 1)[0].split("-")[0]).lower()
            if norm in seen:
                continue
            seen.add(norm)
            eps = _section(os.path.join(path, meta, "entry_points.txt"), group)
            if not eps:
                continue
            dist, version = _name_version(os.path.join(path, meta))
            found += [EntryPoint((n, v, dist, version)) for n, v in eps]
    return found


def _section(path: str, group: str) -> list[tuple[str, str]]:
    """``name = value`` lines of ``[group]`` in an ``entry_points.txt`` (an ini file)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    out: list[tuple[str, str]] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            inside = line[1:-1].strip() == group
            continue
        if inside and "=" in line:
            name, _, value = line.partition("=")
            out.append((name.strip(), value.strip()))
    return out


def _name_version(meta_dir: str) -> tuple[str, str]:
    """``Name`` and ``Version`` from a distribution's METADATA (or PKG-INFO)."""
    fields: dict[str, str] = {}
    for fname in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(meta_dir, fname), encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        break  # the headers end at the first blank line
                    key, sep, value = line.partition(":")
                    if sep and key in ("Name", "Version"):
                        fields[key] = value.strip()
        except OSError:
            continue
        break
    return fields.get("Name", "?"), fields.get("Version", "?")

"""The plugin manager: built-in plugins, entry-point autoload, a block list, tracing, name checks."""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import pluggy

import moe_lora_plugins.hooks.hookspec as hookspec_module
from moe_lora_plugins.envs import Settings, load_settings
from moe_lora_plugins.errors import PluginError
from moe_lora_plugins.hooks.context import ExportContext

PROJECT = "moelora"
ENTRY_POINT_GROUP = "moelora.plugins"
hookimpl = pluggy.HookimplMarker(PROJECT)

# Built-in plugins: (name, "module" or "module:object"). A class is instantiated; anything else is
# registered as it is.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("lora_actor", "moe_lora_plugins.plugins.lora_actor"),
    ("true_on_policy", "moe_lora_plugins.plugins.true_on_policy"),
    ("generate_state", "moe_lora_plugins.plugins.generate_state"),
    ("multi_lora", "moe_lora_plugins.plugins.multi_lora"),
)

logger = logging.getLogger("moe_lora_plugins.hooks")
_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


def new_plugin_manager(
    settings: Settings | None = None,
    builtin: Iterable[tuple[str, str]] | None = None,
    autoload: bool = True,
) -> pluggy.PluginManager:
    """Build a manager: specs, blocked names, built-ins, entry points, tracing; then check names."""
    settings = settings or load_settings()
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspec_module)
    for name in settings.blocked_plugins:
        pm.set_blocked(name)
    for name, module_name in BUILTIN_PLUGINS if builtin is None else builtin:
        if pm.is_blocked(name):
            continue
        try:
            pm.register(_load_plugin_object(module_name), name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"built-in plugin {name!r} ({module_name}) is invalid: {exc}") from exc
    if autoload:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"a plugin from the {ENTRY_POINT_GROUP!r} entry-point group is invalid: {exc}. Fix it, or "
                f"block it with MOELORA_BLOCKED_PLUGINS=<name>."
            ) from exc
    check_hook_names(pm)
    if settings.debug:
        pm.trace.root.setwriter(lambda message: sys.stderr.write(f"[moe-lora-plugins] {message}"))
        pm.enable_tracing()
    return pm


def _load_plugin_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    if attr:
        obj = getattr(obj, attr)
    return obj() if isinstance(obj, type) else obj


def loaded_plugin_names(pm: pluggy.PluginManager) -> list[str]:
    """Names of the registered plugins (blocked names, which pluggy lists with ``None``, left out)."""
    return sorted(name for name, plugin in pm.list_name_plugin() if plugin is not None)


def check_hook_names(pm: pluggy.PluginManager) -> None:
    """Raise if a plugin implements a hook name that no spec declares (a misspelling, usually)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        known = sorted(name for name in dir(pm.hook) if not name.startswith("_"))
        raise PluginError(f"{exc}. Known hooks: {known}") from exc


def get_plugin_manager(settings: Settings | None = None) -> pluggy.PluginManager:
    """The process-wide manager, built on first use."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = new_plugin_manager(settings)
        return _manager


def reset_plugin_manager() -> None:
    global _manager
    with _lock:
        _manager = None


def chain_export_weights(
    pm: pluggy.PluginManager, weights: Iterable[tuple[str, Any]], context: ExportContext
) -> Iterator[tuple[str, Any]]:
    """Thread the weight stream through every ``on_export_weights`` implementation, in call order."""
    stream: Iterable[tuple[str, Any]] = weights
    for impl in reversed(pm.hook.on_export_weights.get_hookimpls()):
        wrapped = impl.function(weights=stream, context=context)
        if wrapped is not None:
            stream = wrapped
    return iter(stream)

"""``activate()``: read the switches, hand every enabled patch to the registry, set up the plugins.

Activation is cheap by design: it imports our small spec modules and wrapt and registers post-import
hooks. Version checks against package metadata happen when a target module is actually imported (or
at once for ``MOELORA_REQUIRE`` ids, which must fail fast); the pluggy manager is built when a hook
is first needed, or at once when a third-party plugin is installed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_lora_plugins.envs import Settings, load_settings, validate_patch_ids
from moe_lora_plugins.registry import PatchRegistry, PatchStatus

if TYPE_CHECKING:
    import pluggy

logger = logging.getLogger("moe_lora_plugins")

_lock = threading.RLock()
_registry: PatchRegistry | None = None
_state: ActivationReport | None = None
_pm: pluggy.PluginManager | None = None


@dataclass(frozen=True)
class ActivationReport:
    """How this process was activated; ``get_registry().rows()`` says where each patch stands."""

    role: str | None
    settings: Settings
    pid: int


def get_registry(pm: pluggy.PluginManager | None = None) -> PatchRegistry:
    """The process-wide registry: the specs of ``moe_lora_plugins.patches`` and of loaded plugins."""
    global _registry
    with _lock:
        if _registry is None:
            from moe_lora_plugins.patches import all_specs

            _registry = PatchRegistry(all_specs())
        if pm is not None:
            for specs in pm.hook.moelora_patch_specs():
                for spec in specs:
                    _registry.add(spec)
        return _registry


def is_active() -> bool:
    return _state is not None


def current() -> ActivationReport | None:
    return _state


def _configure_debug_logging() -> None:
    if any(getattr(h, "_moelora", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[moe-lora-plugins %(process)d] %(levelname)s %(name)s: %(message)s"))
    handler._moelora = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def third_party_plugins_installed() -> bool:
    """Whether any distribution on ``sys.path`` declares a ``moelora.plugins`` entry point.

    A plain scan of ``*.dist-info/entry_points.txt`` files: it avoids importing importlib.metadata at
    start-up (a third of the interpreter's own start-up time) when no third-party plugin exists.
    """
    import sys

    marker = "[moelora.plugins]"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                try:
                    with open(os.path.join(entry or ".", name, "entry_points.txt"), encoding="utf-8") as fh:
                        if marker in fh.read():
                            return True
                except OSError:
                    continue
    return False


def plugin_manager() -> pluggy.PluginManager:
    """The process's plugin manager, built on first use: plugin specs registered, activate hook called.

    Patch implementations and host integrations call this when they need a hook; ``activate``
    builds it at once only when a third-party plugin is installed (it may bring PatchSpecs).
    """
    global _pm
    with _lock:
        if _pm is not None:
            return _pm
        from moe_lora_plugins.hooks.manager import get_plugin_manager

        state = _state
        settings = state.settings if state is not None else load_settings()
        pm = get_plugin_manager(settings)
        registry = get_registry(pm)
        if state is not None:
            validate_patch_ids(settings, registry.ids())  # the plugins' ids are known now
            _apply_enabled(registry, settings, state.role)
            registry.check_required()
        _pm = pm
        pm.hook.moelora_activate(role=state.role if state else None, settings=settings)
        return pm


def _apply_enabled(registry: PatchRegistry, settings: Settings, role: str | None) -> None:
    for spec in registry.specs:
        if registry.status(spec.id) != PatchStatus.NOT_ACTIVATED:
            continue
        if not settings.patch_enabled(spec.id):
            registry.disable(spec.id, "switched off by MOELORA_PATCHES / MOELORA_DISABLED_PATCHES")
        elif spec.roles is not None and role not in spec.roles:
            registry.disable(spec.id, f"not for role {role!r} (roles: {sorted(spec.roles)})")
        else:
            registry.apply(spec.id)


def activate(
    role: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    load_plugins: bool | None = None,
) -> ActivationReport:
    """Apply every enabled patch of this process (lazily) and set up the plugins. Idempotent.

    ``role`` names the process (``"trainer"``, ``"vllm"``, ``"sglang"``, ...): it is written to the
    status file and passed to plugins; specs declared for other roles stay disabled. An explicit call
    activates even when ``MOELORA_PLUGINS`` is off: calling it is the opt-in.

    ``load_plugins``: ``True`` builds the plugin manager now; ``False`` never here (``plugin_manager()``
    builds it on first use); ``None`` (default) builds it now only if a third-party plugin is
    installed, since only those can add PatchSpecs that must be in place before their targets import.
    """
    global _state
    with _lock:
        if _state is not None:
            return _state
        settings = settings or load_settings(environ)
        if settings.debug:
            _configure_debug_logging()
        registry = get_registry()
        registry.strict = settings.strict
        registry.required = frozenset(settings.require)
        writer = None
        if settings.status_dir:
            from moe_lora_plugins.status_file import StatusWriter

            writer = StatusWriter(settings.status_dir, role)
            registry.add_listener(writer)
        _state = ActivationReport(role=role, settings=settings, pid=os.getpid())
        eager = third_party_plugins_installed() if load_plugins is None else load_plugins
        try:
            if eager:
                plugin_manager()  # registers plugin specs, validates ids, applies, runs the activate hook
            else:
                validate_patch_ids(settings, registry.ids())
                _apply_enabled(registry, settings, role)
                registry.check_required()
        except BaseException:
            _state = None
            raise
        if writer is not None:
            writer(registry)
        logger.debug("activated in pid %d as role %r", os.getpid(), role)
        return _state


def deactivate() -> None:
    """Revert every patch and forget the activation (tests, benchmarks, hosts that need a clean
    process); a later :func:`activate` applies every enabled patch again."""
    global _state, _pm
    with _lock:
        if _registry is not None:
            _registry.reset()
        _state = None
        _pm = None

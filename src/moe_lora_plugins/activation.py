"""``activate()``: read the switches, hand every enabled patch to the registry, load the plugins.

Activation is cheap by design: it imports only our small spec modules, wrapt and pluggy, and
registers post-import hooks. Version checks against package metadata happen when a target module is
actually imported (or at once for ``MOELORA_REQUIRE`` ids, which must fail fast).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from moe_lora_plugins.envs import Settings, load_settings
from moe_lora_plugins.registry import PatchRegistry, PatchStatus

logger = logging.getLogger("moe_lora_plugins")

_lock = threading.RLock()
_registry: PatchRegistry | None = None
_state: ActivationReport | None = None


@dataclass(frozen=True)
class ActivationReport:
    """What ``activate`` did in this process."""

    role: str | None
    settings: Settings
    statuses: Mapping[str, PatchStatus]
    plugins: tuple[str, ...]
    pid: int


def get_registry() -> PatchRegistry:
    """The process-wide registry holding every spec of ``moe_lora_plugins.patches``."""
    global _registry
    with _lock:
        if _registry is None:
            from moe_lora_plugins.patches import all_specs

            _registry = PatchRegistry(all_specs())
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


def activate(
    role: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    load_plugins: bool = True,
) -> ActivationReport:
    """Apply every enabled patch of this process and load the plugins. Calling it again is a no-op.

    ``role`` names the process (``"trainer"``, ``"vllm"``, ``"sglang"``, ...): it is written to the
    status file and passed to plugins; specs declared for other roles stay disabled. An explicit call
    activates even when ``MOELORA_PLUGINS`` is off: calling it is the opt-in.
    """
    global _state
    with _lock:
        if _state is not None:
            return _state
        registry = get_registry()
        settings = settings or load_settings(environ, known_patch_ids=registry.ids())
        if settings.debug:
            _configure_debug_logging()
        registry.strict = settings.strict
        registry.required = frozenset(settings.require)
        if settings.status_dir:
            from moe_lora_plugins.status_file import StatusWriter

            registry.add_listener(StatusWriter(settings.status_dir, role))
        for spec in registry.specs:
            if not settings.patch_enabled(spec.id):
                registry.disable(spec.id, "switched off by MOELORA_PATCHES / MOELORA_DISABLED_PATCHES")
            elif spec.roles is not None and role not in spec.roles:
                registry.disable(spec.id, f"not for role {role!r} (roles: {sorted(spec.roles)})")
            else:
                registry.apply(spec.id)
        registry.check_required()
        plugin_names: tuple[str, ...] = ()
        if load_plugins:
            from moe_lora_plugins.hooks.manager import get_plugin_manager

            pm = get_plugin_manager(settings)
            plugin_names = tuple(sorted(name for name, _ in pm.list_name_plugin()))
            pm.hook.moelora_activate(role=role, settings=settings)
        _state = ActivationReport(
            role=role,
            settings=settings,
            statuses={spec.id: registry.status(spec.id) for spec in registry.specs},
            plugins=plugin_names,
            pid=os.getpid(),
        )
        logger.debug("activated in pid %d as role %r: %s", os.getpid(), role, dict(_state.statuses))
        return _state


def deactivate() -> None:
    """Revert every patch and forget the activation (tests, and hosts that need a clean process)."""
    global _state
    with _lock:
        if _registry is not None:
            _registry.revert_all()
        _state = None

"""moe-lora-plugins: MoE LoRA across every parallel layout and true on-policy RL, as import-time patches.

``activate(role=...)`` is the one call a host needs (the ``.pth`` bootstrap makes it for you when
``MOELORA_PLUGINS=on``). Importing this package is cheap: nothing heavy is imported until a patched
upstream module is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "activate", "deactivate", "get_registry", "is_active"]

if TYPE_CHECKING:
    from moe_lora_plugins.activation import ActivationReport
    from moe_lora_plugins.registry import PatchRegistry


def activate(role: str | None = None, **kwargs: Any) -> ActivationReport:
    """Apply every enabled patch in this process (lazily) and load the plugins; idempotent."""
    from moe_lora_plugins.activation import activate as _activate

    return _activate(role=role, **kwargs)


def deactivate() -> None:
    """Revert every patch applied in this process."""
    from moe_lora_plugins.activation import deactivate as _deactivate

    _deactivate()


def is_active() -> bool:
    from moe_lora_plugins.activation import is_active as _is_active

    return _is_active()


def get_registry() -> PatchRegistry:
    from moe_lora_plugins.activation import get_registry as _get_registry

    return _get_registry()

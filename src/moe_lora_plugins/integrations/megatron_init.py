"""slime / miles ``--custom-megatron-init-path moe_lora_plugins.integrations.megatron_init.init``.

The host calls the dotted path with its parsed ``args`` on every train rank after model-parallel
initialisation. This activates the suite as role ``trainer`` (so the Megatron-Bridge patches are in
place before the first export) whatever ``MOELORA_PLUGINS`` says: naming the hook is the opt-in.
"""

from __future__ import annotations

from typing import Any


def init(args: Any = None) -> None:
    from moe_lora_plugins.activation import activate

    activate(role="trainer")

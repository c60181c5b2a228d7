"""Several LoRA adapters on the actor: an ``on_build_model`` hook that wraps every LoRA target for multi-LoRA.

When a host builds the actor with a :class:`~moe_lora_plugins.multilora.megatron.MultiLoraSetup` as its
LoRA config, every ``linear_qkv`` / ``linear_proj`` / ``linear_fc1`` / ``linear_fc2`` (routed experts
included) is wrapped by :func:`~moe_lora_plugins.multilora.megatron.apply_multi_lora` and the base is
frozen; adapters are then added per slot. Any other role or config is left to the other plugins
(``lora_actor`` ignores this config, this plugin ignores theirs).
"""

from __future__ import annotations

import logging
from typing import Any

from moe_lora_plugins.hooks import hookimpl

logger = logging.getLogger("moe_lora_plugins.multi_lora")

ACTOR_ROLE = "actor"


@hookimpl
def on_build_model(model_chunks: list[Any], provider: Any, role: str, config: Any) -> None:
    """Wrap the actor's LoRA targets for multi-LoRA in place; anything else changes nothing."""
    from moe_lora_plugins.multilora.megatron import MultiLoraSetup, apply_multi_lora

    if role != ACTOR_ROLE or not isinstance(config, MultiLoraSetup):
        return
    wrappers = apply_multi_lora(model_chunks, config.targets)
    logger.info("moe-lora-plugins: multi-LoRA on the actor: %d target linears wrapped (%d routed-expert)",
                len(wrappers), sum(w.is_expert for w in wrappers))

"""GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``) for Megatron-Bridge releases that lack a bridge for it.

GLM-4.7-Flash is DeepSeek-V3-shaped (multi-latent attention, sigmoid-routed experts with a bias, a
dense first layer), so the DeepSeek-V3 bridge converts it. Megatron-Bridge's dispatch keeps the last
registration for an architecture, so registering over a native bridge would replace it: we register
only when no bridge answers for the architecture, and say which one answered otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("moe_lora_plugins.trainer.glm_bridge")

ARCHITECTURE = "Glm4MoeLiteForCausalLM"
MODEL_TYPE = "glm4_moe_lite"


def registered_bridge(architecture: str = ARCHITECTURE) -> Any:
    """The bridge class Megatron-Bridge's dispatch holds for ``architecture`` (by class or name), or ``None``."""
    import megatron.bridge.models  # noqa: F401  (registers every native bridge)
    from megatron.bridge.models.conversion import model_bridge

    for key, impl in model_bridge.get_model_bridge._exact_types.items():
        name = key if isinstance(key, str) else getattr(key, "__name__", None)
        if name == architecture:
            return impl
    return None


def ensure_glm47_flash_bridge() -> bool:
    """Register a DeepSeek-V3-based bridge for GLM-4.7-Flash unless one exists; return whether we did."""
    if registered_bridge() is not None:
        logger.debug("moe-lora-plugins: Megatron-Bridge has a native %s bridge; not registering ours", ARCHITECTURE)
        return False
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
    from megatron.bridge.models.deepseek.deepseek_v3_bridge import DeepSeekV3Bridge
    from megatron.bridge.models.mla_provider import MLAModelProvider
    from megatron.core.models.gpt.gpt_model import GPTModel

    bridge_class = type(
        "MoeLoraGlm47FlashBridge",
        (DeepSeekV3Bridge,),
        {"__doc__": "GLM-4.7-Flash through the DeepSeek-V3 bridge (moe-lora-plugins; no native bridge here).",
         "__module__": __name__},
    )
    MegatronModelBridge.register_bridge(
        source=ARCHITECTURE, target=GPTModel, provider=MLAModelProvider, model_type=MODEL_TYPE
    )(bridge_class)
    logger.info("moe-lora-plugins: registered %s for %s (the installed Megatron-Bridge has none)",
                bridge_class.__name__, ARCHITECTURE)
    return True

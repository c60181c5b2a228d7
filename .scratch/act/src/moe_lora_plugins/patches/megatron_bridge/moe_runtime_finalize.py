"""Patch: a provider's ``finalize()`` first applies the MoE runtime settings a host seam declared.

Wraps Megatron-Bridge's ``TransformerConfig.finalize`` and ``MLATransformerConfig.finalize`` (every
GPT / MLA model provider inherits one of them). Hosts set their fields on the provider and then call
``finalize()`` (slime / miles ``get_model_provider_func`` in bridge mode, verl's Megatron engine), so
the last moment a setting can still change the derived config is just before that call. When a host
seam declared a build configuration carrying a ``MoeRuntimeConfig`` (``integrations.megatron_init.
init(args)`` reads slime's / miles' ``--moe-*`` flags into it), a MoE provider (``num_moe_experts``
set) gets those settings, validated, before upstream's ``finalize`` runs. Otherwise the call is
upstream's, untouched.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.registry import PatchSpec

_COMMON = dict(
    distribution="megatron-bridge",
    versions=">=0.6,<0.7",
    target="megatron.bridge.models.transformer_config",
    kind="wrap",
    implementation="moe_lora_plugins.patches.megatron_bridge.moe_runtime_finalize:finalize",
    fingerprint="(self)",
    why=(
        "slime and miles build Megatron-Bridge providers from the HF config in bridge mode and pass none of "
        "their --moe-* flags to them (get_model_provider_func, slime 13c3a7537c47, miles ef3bb705d981). The "
        "MoE runtime settings must reach the provider before finalize() derives the config from it, and "
        "finalize() is the one call every such build makes."
    ),
    upstream="Megatron-Bridge 0.6.2 models/transformer_config.py (finalize runs Megatron-Core's deferred __post_init__)",
    remove_when="hosts pass all five MoE runtime settings to their bridge providers themselves",
    verified="megatron-bridge 0.6.2 / megatron-core 0.19.2, CPU gloo: after init(args) with --moe-* flags a tiny "
    "Qwen3-MoE provider builds with the alltoall dispatcher, seq_aux_loss, sigmoid scores and expert bias "
    "(tests/megatron/test_moe_runtime_build.py)",
)

SPECS = (
    PatchSpec(id="megatron_bridge.moe_runtime_finalize", attribute="TransformerConfig.finalize", **_COMMON),
    PatchSpec(id="megatron_bridge.moe_runtime_finalize_mla", attribute="MLATransformerConfig.finalize", **_COMMON),
)


def finalize(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Apply the declared MoE runtime settings to a MoE provider, then upstream's ``finalize``."""
    from moe_lora_plugins.hooks.build import build_config

    config = build_config()
    runtime = getattr(config, "moe_runtime", None)
    if runtime is not None and not runtime.is_empty() and getattr(instance, "num_moe_experts", None):
        runtime.apply(instance)
    return wrapped(*args, **kwargs)

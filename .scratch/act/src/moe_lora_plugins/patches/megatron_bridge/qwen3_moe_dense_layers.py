"""Patch: Megatron-Bridge's Qwen3-MoE bridge honours ``mlp_only_layers`` and ``decoder_sparse_step``.

Upstream 0.6.x builds every Qwen3-MoE layer as MoE, has no mapping for a dense layer's
``mlp.{gate,up,down}_proj`` and writes ``decoder_sparse_step=1`` back, so a checkpoint with dense
layers cannot be loaded (and a Megatron model with dense layers would export a config that calls them
MoE). Four wrappers: the provider gets ``moe_layer_freq`` from the HF rule; the mapping registry gets
the dense-MLP mappings; the exported HF config gets ``decoder_sparse_step`` / ``mlp_only_layers``
back; and ``GPTModelProvider.provide`` builds mixed layers with Megatron-Core's decoder block spec
when the provider names one of upstream's single-layer specs (local or Transformer Engine), which
would otherwise make every layer MoE. A config without dense layers is left exactly as upstream has
it. The layer-kind rule is :mod:`moe_lora_plugins.topology.moe_layers`.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.registry import PatchSpec

_BRIDGE = "megatron.bridge.models.qwen.qwen3_moe_bridge"
_VERIFIED = (
    "megatron-bridge 0.6.2 + megatron-core 0.19.2: CPU gloo, local spec, tiny Qwen3-MoE with "
    "mlp_only_layers=[0]: HF -> Megatron -> HF bitwise, HF+PEFT logits = Megatron+LoRA logits, EP=2, "
    "PP=2xEP=2 and PP=2xVPP=2 exports = world size 1; for the TE specs only the block-spec call is checked "
    "(no Transformer Engine here)."
)
_UPSTREAM = "Megatron-Bridge 0.6.2 qwen/qwen3_moe_bridge.Qwen3MoEBridge (no mlp_only_layers handling)"
_REMOVE_WHEN = "Megatron-Bridge's Qwen3-MoE bridge maps mlp_only_layers / decoder_sparse_step itself"

_COMMON = dict(distribution="megatron-bridge", versions=">=0.6,<0.7", kind="wrap", verified=_VERIFIED)
_QWEN3_BRIDGE = dict(_COMMON, target=_BRIDGE, upstream=_UPSTREAM, remove_when=_REMOVE_WHEN)

SPECS = (
    PatchSpec(
        id="megatron_bridge.qwen3_moe_dense_layer_provider",
        **_QWEN3_BRIDGE,
        attribute="Qwen3MoEBridge.provider_bridge",
        implementation="moe_lora_plugins.patches.megatron_bridge.qwen3_moe_dense_layers:provider_with_dense_layers",
        fingerprint="(self, hf_pretrained)",
        why=(
            "The provider makes every layer MoE whatever mlp_only_layers / decoder_sparse_step say, so a "
            "Qwen3-MoE checkpoint with dense layers fails to load (its dense MLP has no Megatron home)."
        ),
    ),
    PatchSpec(
        id="megatron_bridge.qwen3_moe_dense_layer_mappings",
        **_QWEN3_BRIDGE,
        attribute="Qwen3MoEBridge.mapping_registry",
        implementation="moe_lora_plugins.patches.megatron_bridge.qwen3_moe_dense_layers:mappings_with_dense_mlp",
        fingerprint="(self)",
        why=(
            "No mapping for a dense layer's mlp.linear_fc1 / linear_fc2 (HF mlp.gate_proj, up_proj, "
            "down_proj), so dense-layer weights and their LoRA adapters cannot be converted or exported."
        ),
    ),
    PatchSpec(
        id="megatron_bridge.qwen3_moe_dense_layer_hf_config",
        **_QWEN3_BRIDGE,
        attribute="Qwen3MoEBridge.megatron_to_hf_config",
        implementation="moe_lora_plugins.patches.megatron_bridge.qwen3_moe_dense_layers:hf_config_with_dense_layers",
        fingerprint="(cls, provider)",
        why=(
            "The exported HF config always says decoder_sparse_step=1 and no mlp_only_layers, so a model "
            "with dense layers is described as all-MoE and its checkpoint does not load in HF or vLLM."
        ),
    ),
    PatchSpec(
        id="megatron_bridge.mixed_dense_moe_block_spec",
        **_COMMON,
        target="megatron.bridge.models.gpt_provider",
        attribute="GPTModelProvider.provide",
        implementation="moe_lora_plugins.patches.megatron_bridge.qwen3_moe_dense_layers:provide_with_block_spec",
        fingerprint="(self, pre_process=, post_process=, vp_stage=)",
        why=(
            "local_layer_spec / transformer_engine_layer_spec / default_layer_spec describe one layer and "
            "ignore moe_layer_freq, so a provider whose moe_layer_freq asks for dense layers still builds "
            "every layer as MoE."
        ),
        upstream="Megatron-Bridge 0.6.2 gpt_provider single-layer spec functions (GLM-4.5's bridge sets "
        "get_gpt_decoder_block_spec itself; Qwen3-MoE's does not)",
        remove_when="the Qwen3-MoE bridge (or GPTModelProvider) picks the decoder block spec for mixed layers",
    ),
)


def _hf_config_of(hf_pretrained: Any) -> Any:
    return getattr(hf_pretrained, "config", hf_pretrained)


def hf_pattern(hf_config: Any) -> list[int]:
    """Per layer 1 (MoE) / 0 (dense) of an HF Qwen3-MoE config, by the HF rule."""
    from moe_lora_plugins.topology.moe_layers import hf_moe_layer_pattern

    return hf_moe_layer_pattern(
        int(hf_config.num_hidden_layers),
        getattr(hf_config, "num_experts", 0),
        getattr(hf_config, "decoder_sparse_step", 1),
        getattr(hf_config, "mlp_only_layers", None),
    )


def provider_with_dense_layers(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Upstream's provider, with ``moe_layer_freq`` as a 0/1 list when the HF config has dense layers."""
    from moe_lora_plugins.topology.moe_layers import has_dense_layers

    provider = wrapped(*args, **kwargs)
    hf_pretrained = args[0] if args else kwargs["hf_pretrained"]
    pattern = hf_pattern(_hf_config_of(hf_pretrained))
    if has_dense_layers(pattern):
        provider.moe_layer_freq = pattern
    return provider


def mappings_with_dense_mlp(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Upstream's registry plus the dense-MLP mappings, when the HF config has dense layers (or is unknown)."""
    from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
    from megatron.bridge.models.conversion.param_mapping import AutoMapping, GatedMLPMapping

    from moe_lora_plugins.topology.moe_layers import has_dense_layers

    registry = wrapped(*args, **kwargs)
    hf_config = getattr(instance, "hf_config", None)
    if hf_config is not None and not has_dense_layers(hf_pattern(hf_config)):
        return registry
    dense = [
        GatedMLPMapping(
            megatron_param="decoder.layers.*.mlp.linear_fc1.weight",
            gate="model.layers.*.mlp.gate_proj.weight",
            up="model.layers.*.mlp.up_proj.weight",
        ),
        AutoMapping(megatron_param="decoder.layers.*.mlp.linear_fc2.weight",
                    hf_param="model.layers.*.mlp.down_proj.weight"),
        # Transformer Engine fuses a dense layer's pre-MLP norm into fc1 (MoE layers keep pre_mlp_layernorm).
        AutoMapping(megatron_param="decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
                    hf_param="model.layers.*.post_attention_layernorm.weight"),
    ]
    return MegatronMappingRegistry(*registry.get_all_mappings(), *dense)


def hf_config_with_dense_layers(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> dict:
    """Upstream's HF config dict, with ``decoder_sparse_step`` / ``mlp_only_layers`` of the provider's layers."""
    from moe_lora_plugins.topology.moe_layers import (
        has_dense_layers,
        hf_sparse_fields,
        megatron_moe_layer_pattern,
    )

    hf_config = wrapped(*args, **kwargs)
    provider = args[0] if args else kwargs["provider"]
    if not getattr(provider, "num_moe_experts", None):
        return hf_config
    pattern = megatron_moe_layer_pattern(provider.moe_layer_freq, int(provider.num_layers))
    if has_dense_layers(pattern):
        hf_config["decoder_sparse_step"], hf_config["mlp_only_layers"] = hf_sparse_fields(pattern)
    return hf_config


def mixed_layer_block_spec(provider: Any) -> Any:
    """A ``(config, vp_stage=None)`` spec function that builds dense and MoE layers per ``moe_layer_freq``,
    or ``None`` when the provider needs none (no dense layers, or a spec upstream's functions did not make)."""
    from megatron.bridge.models import gpt_provider

    from moe_lora_plugins.topology.moe_layers import has_dense_layers, megatron_moe_layer_pattern

    if not getattr(provider, "num_moe_experts", None):
        return None
    if not has_dense_layers(megatron_moe_layer_pattern(provider.moe_layer_freq, int(provider.num_layers))):
        return None
    spec = provider.transformer_layer_spec
    if spec is gpt_provider.local_layer_spec:
        use_te = False
    elif spec is gpt_provider.transformer_engine_layer_spec or (
        spec is gpt_provider.default_layer_spec and not provider.use_transformer_engine_full_layer_spec
    ):
        use_te = True
    else:
        return None

    def block_spec(config: Any, vp_stage: int | None = None) -> Any:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization=config.normalization, vp_stage=vp_stage
        )

    return block_spec


def provide_with_block_spec(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Upstream ``provide``; for the duration of the call a mixed dense/MoE provider uses the block spec."""
    block_spec = mixed_layer_block_spec(instance)
    if block_spec is None:
        return wrapped(*args, **kwargs)
    layer_spec = instance.transformer_layer_spec
    instance.transformer_layer_spec = block_spec
    try:
        return wrapped(*args, **kwargs)
    finally:
        instance.transformer_layer_spec = layer_spec

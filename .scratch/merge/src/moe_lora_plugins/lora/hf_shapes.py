"""The (out, in) shape of every LoRA-able projection of a decoder layer, read from an HF ``config.json``.

Covers every family the converter has a table for (:mod:`moe_lora_plugins.lora.families`): GQA
attention (Qwen3 / Qwen2 / Llama / Mistral, Qwen3-MoE, Qwen2-MoE, GLM4-MoE) and MLA attention
(DeepSeek-V2 / V3, with or without ``q_lora_rank``); dense SwiGLU MLPs; MoE layers with their
router (``mlp.gate``), routed experts (``mlp.experts.{e}``) and shared experts (Qwen2-MoE's
``mlp.shared_expert`` sized ``shared_expert_intermediate_size``; GLM4-MoE / DeepSeek's
``mlp.shared_experts`` sized ``moe_intermediate_size * n_shared_experts``). Which layers are MoE
follows the HF rules: Qwen's ``decoder_sparse_step`` / ``mlp_only_layers``, then
``first_k_dense_replace`` and DeepSeek's ``moe_layer_freq``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_lora_plugins.errors import MoeLoraError


class HfConfigError(MoeLoraError, ValueError):
    """An HF config lacks a field the shapes need, or holds a value that cannot describe a model."""


def _int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is not None:
            return default
        raise HfConfigError(f"the model config has no {key!r}; pass the base model's own config.json")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HfConfigError(f"the model config's {key}={value!r} is not a non-negative integer")
    return value


def routed_experts(config: Mapping[str, Any]) -> int:
    """Routed experts per MoE layer (0 for a dense model), whatever the config family calls them."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if config.get(key):
            return _int(config, key)
    return 0


def moe_layers(config: Mapping[str, Any]) -> set[int]:
    """The MoE layers: Qwen's ``decoder_sparse_step`` / ``mlp_only_layers``, then ``first_k_dense_replace``
    (the first k layers dense) and ``moe_layer_freq`` (DeepSeek: every N-th layer from there)."""
    from moe_lora_plugins.topology.moe_layers import hf_moe_layer_pattern

    layers = _int(config, "num_hidden_layers")
    pattern = hf_moe_layer_pattern(layers, routed_experts(config), config.get("decoder_sparse_step") or 1,
                                   config.get("mlp_only_layers"))
    first_dense = _int(config, "first_k_dense_replace", 0)
    every = max(_int(config, "moe_layer_freq", 1), 1)
    return {i for i, moe in enumerate(pattern) if moe and i >= first_dense and i % every == 0}


def _attention_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    if config.get("kv_lora_rank"):  # MLA (DeepSeek-V2 / V3)
        nope, rope = _int(config, "qk_nope_head_dim"), _int(config, "qk_rope_head_dim")
        v_dim, kv_rank = _int(config, "v_head_dim"), _int(config, "kv_lora_rank")
        shapes = {
            "self_attn.kv_a_proj_with_mqa": (kv_rank + rope, hidden),
            "self_attn.kv_b_proj": (heads * (nope + v_dim), kv_rank),
            "self_attn.o_proj": (hidden, heads * v_dim),
        }
        if config.get("q_lora_rank"):
            q_rank = _int(config, "q_lora_rank")
            shapes["self_attn.q_a_proj"] = (q_rank, hidden)
            shapes["self_attn.q_b_proj"] = (heads * (nope + rope), q_rank)
        else:
            shapes["self_attn.q_proj"] = (heads * (nope + rope), hidden)
        return shapes
    if heads == 0:
        raise HfConfigError("the model config's num_attention_heads=0 cannot describe attention")
    kv_heads = _int(config, "num_key_value_heads", heads)
    head_dim = _int(config, "head_dim", hidden // heads)
    return {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
    }


def _swiglu(prefix: str, inter: int, hidden: int) -> dict[str, tuple[int, int]]:
    return {f"{prefix}.gate_proj": (inter, hidden), f"{prefix}.up_proj": (inter, hidden),
            f"{prefix}.down_proj": (hidden, inter)}


def layer_module_shapes(config: Mapping[str, Any], layer: int) -> dict[str, tuple[int, int]]:
    """(out, in) of every LoRA-able projection of decoder layer ``layer``, keyed by its path in the layer
    (``self_attn.q_proj``, ``mlp.experts.3.down_proj``, ``mlp.shared_expert.gate_proj``, ``mlp.gate``)."""
    hidden = _int(config, "hidden_size")
    shapes = _attention_shapes(config)
    if layer in moe_layers(config):
        experts = routed_experts(config)
        inter = _int(config, "moe_intermediate_size")
        shapes["mlp.gate"] = (experts, hidden)
        for e in range(experts):
            shapes.update(_swiglu(f"mlp.experts.{e}", inter, hidden))
        if config.get("shared_expert_intermediate_size"):
            shapes.update(_swiglu("mlp.shared_expert", _int(config, "shared_expert_intermediate_size"), hidden))
        elif config.get("n_shared_experts"):
            shapes.update(_swiglu("mlp.shared_experts", inter * _int(config, "n_shared_experts"), hidden))
    else:
        shapes.update(_swiglu("mlp", _int(config, "intermediate_size"), hidden))
    return shapes

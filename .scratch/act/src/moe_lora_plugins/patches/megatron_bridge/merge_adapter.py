"""Patch: merge each EP-gathered SequentialMLP expert weight with its own expert's LoRA delta.

Wraps ``MegatronPeftBridge._merge_lora_adapter_weights``. Under EP > 1 the export gathers the base
weight of local expert ``L`` from every EP rank (global experts ``L + k * E/EP``) into one dict, and
upstream merges this rank's adapter into all of them. The wrapper all-gathers the (already TP /
PP materialized) adapter over the expert-parallel group (one flat ``all_gather``) and merges each
expert with its owner's adapter through upstream's own fc1 split and ``_merge_single_adapter_weight``,
the steps upstream takes at world size 1, so the result is bitwise the world-size-1 merge. Every other adapter (dense, grouped experts, EP = 1) goes to upstream untouched.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.merge_expert_adapters_per_owner",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.peft_bridge",
        attribute="MegatronPeftBridge._merge_lora_adapter_weights",
        kind="wrap",
        implementation="moe_lora_plugins.patches.megatron_bridge.merge_adapter:merge_lora_adapter_weights",
        fingerprint="(self, megatron_model, converted_weights_dict, adapter_weights)",
        why=(
            "export_hf_weights(merge_adapter_weights=True) under EP > 1 merges one EP rank's local expert "
            "delta into the base weights of every EP rank's expert with the same local number."
        ),
        upstream="Megatron-Bridge 0.6.2 peft_bridge.MegatronPeftBridge._merge_lora_adapter_weights",
        remove_when="Megatron-Bridge gathers SequentialMLP expert adapters across EP before merging",
        verified="megatron-bridge 0.6.2: CPU gloo EP=2/4, PP=2xEP=2; 2xH200 NCCL bf16 (tiny model and the "
        "2.69 B anchor model). "
        "0.4.0 (read, not run): same signature and the same per-rank merge; left out of the range until "
        "run there.",
        requires=tuple(
            f"megatron.bridge.models.conversion.peft_bridge:MegatronPeftBridge.{name}"
            for name in ("_is_fused_fc1_gate_up", "_split_fused_fc1_linear_out_weight", "_is_fused_fc1_gate_proj",
                         "_is_fused_fc1_up_proj", "_merge_single_adapter_weight")
        ),
    ),
)


def merge_lora_adapter_weights(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Upstream's merge arithmetic, each expert with the adapter of the EP rank that owns it."""
    from moe_lora_plugins.errors import MoeLoraError
    from moe_lora_plugins.patches.megatron_bridge._export_common import (
        all_gather_flat,
        ep_group_and_size,
        model_config,
        prefetched_expert_adapter,
    )
    from moe_lora_plugins.topology.naming import expert_owner, hf_expert_index

    adapters = args[2] if len(args) > 2 else kwargs.get("adapter_weights")
    if not adapters or len(adapters) != 1 or ".local_experts." not in adapters[0].global_base_prefix:
        return wrapped(*args, **kwargs)  # dense and grouped adapters: no cost at all
    models = args[0] if args else kwargs["megatron_model"]
    converted = args[1] if len(args) > 1 else kwargs["converted_weights_dict"]
    group, size = ep_group_and_size(models)
    if size == 1 or not converted:
        return wrapped(*args, **kwargs)
    adapter = adapters[0]
    linear_in_all = prefetched_expert_adapter(models, adapter.linear_in_weight.vp_stage, adapter.linear_in_weight.param_name)
    linear_out_all = prefetched_expert_adapter(
        models, adapter.linear_out_weight.vp_stage, adapter.linear_out_weight.param_name
    )
    if linear_in_all is not None and linear_out_all is not None:
        gathered = list(zip(linear_in_all, linear_out_all, strict=True))
    else:
        gathered = all_gather_flat([adapter.linear_in_weight.weight, adapter.linear_out_weight.weight], group)
    num_experts = model_config(models).num_moe_experts
    by_owner: dict[int, dict[str, Any]] = {}
    for hf_name, base in converted.items():
        expert = hf_expert_index(hf_name)
        if expert is None:
            raise MoeLoraError(
                f"expert adapter {adapter.global_base_prefix} is merged into {hf_name!r}, which names no "
                "expert; cannot tell which EP rank's adapter belongs to it. Report it with the model type."
            )
        by_owner.setdefault(expert_owner(expert, size, num_experts)[0], {})[hf_name] = base
    for owner, weights in by_owner.items():
        linear_in, linear_out = gathered[owner]
        base_shape = next(iter(weights.values())).shape
        fused_fc1 = instance._is_fused_fc1_gate_up(list(weights), linear_out, base_shape)
        if fused_fc1:
            gate, up = instance._split_fused_fc1_linear_out_weight(linear_out, is_expert=True)
        for hf_name, base in weights.items():
            delta_out = linear_out
            if fused_fc1:
                if instance._is_fused_fc1_gate_proj(hf_name):
                    delta_out = gate
                elif instance._is_fused_fc1_up_proj(hf_name):
                    delta_out = up
                else:
                    raise MoeLoraError(f"{hf_name!r} is neither the gate nor the up projection of a fused fc1")
            converted[hf_name] = instance._merge_single_adapter_weight(
                base, adapter.alpha, adapter.dim, linear_in, delta_out
            )
    return converted

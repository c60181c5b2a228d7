"""Patch: merge each EP-gathered SequentialMLP expert weight with its own expert's LoRA delta.

Wraps ``MegatronPeftBridge._merge_lora_adapter_weights``. Under EP > 1 the export gathers the base
weight of local expert ``L`` from every EP rank (global experts ``L + k * E/EP``) into one dict, and
upstream merges this rank's adapter into all of them. The wrapper all-gathers the (already TP /
PP materialized) adapter over the expert-parallel group and hands upstream's own merge each owner's
experts with that owner's adapter, so the arithmetic is upstream's and the result is bitwise the
world-size-1 merge. Every other adapter (dense, grouped experts, EP = 1) goes to upstream untouched.
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
    ),
)


def _all_gather_pair(linear_in: Any, linear_out: Any, group: Any, size: int) -> list[tuple[Any, Any]]:
    """``[(linear_in, linear_out)]`` of every EP rank, in rank order, through one ``all_gather``."""
    import torch
    import torch.distributed as dist

    from moe_lora_plugins.topology.ep_gather import pack_tensors, tensor_meta, unpack_tensors

    flat = pack_tensors([linear_in, linear_out])
    gathered = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(gathered, flat, group=group)
    metas = [tensor_meta("linear_in", linear_in), tensor_meta("linear_out", linear_out)]
    pairs = []
    for buffer in gathered:
        (_, a), (_, b) = unpack_tensors(buffer, metas)
        pairs.append((a, b))
    return pairs


def merge_lora_adapter_weights(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Upstream's merge, called once per owning EP rank with that rank's adapter."""
    import dataclasses

    from moe_lora_plugins.errors import MoeLoraError
    from moe_lora_plugins.patches.megatron_bridge._export_common import (
        bind_call,
        ep_group_and_size,
        model_config,
    )
    from moe_lora_plugins.topology.naming import expert_owner, hf_expert_index

    adapters = args[2] if len(args) > 2 else kwargs.get("adapter_weights")
    if not adapters or len(adapters) != 1 or ".local_experts." not in adapters[0].global_base_prefix:
        return wrapped(*args, **kwargs)  # dense and grouped adapters: no binding cost at all
    models = args[0] if args else kwargs["megatron_model"]
    group, size = ep_group_and_size(models)
    if size == 1:
        return wrapped(*args, **kwargs)
    call = bind_call(wrapped, args, kwargs)
    converted = call["converted_weights_dict"]
    if not converted:
        return wrapped(*args, **kwargs)
    adapter = adapters[0]
    gathered = _all_gather_pair(adapter.linear_in_weight.weight, adapter.linear_out_weight.weight, group, size)
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
    merged: dict[str, Any] = {}
    for owner, weights in sorted(by_owner.items()):
        owned = dataclasses.replace(
            adapter,
            linear_in_weight=adapter.linear_in_weight._replace(weight=gathered[owner][0]),
            linear_out_weight=adapter.linear_out_weight._replace(weight=gathered[owner][1]),
        )
        merged.update(wrapped(models, weights, [owned]))
    return merged

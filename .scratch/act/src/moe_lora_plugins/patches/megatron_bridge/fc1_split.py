"""Patch: split a fused fc1 LoRA B into gate and up per expert-TP shard.

Replaces ``MegatronPeftBridge._split_fused_fc1_linear_out_weight``. Upstream forces ``tp_size = 1``
for expert adapters, so under expert-TP > 1 the gathered ``[g0; u0; g1; u1]`` is cut in the middle
and gate / up rows are mixed. Ours uses the expert-TP size for experts and the TP size otherwise;
the split is :func:`moe_lora_plugins.topology.split_fused_gate_up`.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.split_fused_fc1_lora_b",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.peft_bridge",
        attribute="MegatronPeftBridge._split_fused_fc1_linear_out_weight",
        kind="replace",
        implementation="moe_lora_plugins.patches.megatron_bridge.fc1_split:split_fused_fc1_linear_out_weight",
        fingerprint="(self, linear_out_weight, *, is_expert)",
        why=(
            "Expert fc1 LoRA B is split into gate/up as if expert-TP were 1; under expert-TP > 1 the "
            "exported gate_proj/up_proj lora_B (and merged gate/up weights) mix rows of both."
        ),
        upstream="Megatron-Bridge 0.6.2 peft_bridge.MegatronPeftBridge._split_fused_fc1_linear_out_weight",
        remove_when="Megatron-Bridge splits expert fc1 LoRA B per expert-TP shard",
        verified="megatron-bridge 0.6.2: CPU gloo ETP=2 (SequentialMLP, local spec) bitwise equal to world "
        "size 1. "
        "0.4.0 (read, not run): uses the expert-TP size there already (the bug is a 0.6 regression); "
        "out of range.",
    ),
)


def split_fused_fc1_linear_out_weight(self: Any, linear_out_weight: Any, *, is_expert: bool) -> tuple[Any, Any]:
    """``(gate, up)`` of a TP-gathered fused fc1 LoRA B, per (expert-)TP shard."""
    from megatron.core import parallel_state

    from moe_lora_plugins.topology.shards import split_fused_gate_up

    if is_expert:
        tp_size = parallel_state.get_expert_tensor_parallel_world_size()
    else:
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return split_fused_gate_up(linear_out_weight, tp_size)

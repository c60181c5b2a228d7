"""Framework-free topology math: local -> global layer and expert numbers, the expert-parallel
gather plan, and how fused projections are laid out in tensor-parallel shards."""

from moe_lora_plugins.topology.ep_gather import EPGatherPlan, plan_ep_gather
from moe_lora_plugins.topology.naming import (
    ExpertFamily,
    MegatronParamRef,
    expert_owner,
    global_expert_index,
    globalize_megatron_name,
    hf_expert_index,
    parse_megatron_name,
)
from moe_lora_plugins.topology.shards import merge_fused_gate_up_shards, split_fused_gate_up

__all__ = [
    "EPGatherPlan",
    "ExpertFamily",
    "MegatronParamRef",
    "expert_owner",
    "global_expert_index",
    "globalize_megatron_name",
    "hf_expert_index",
    "merge_fused_gate_up_shards",
    "parse_megatron_name",
    "plan_ep_gather",
    "split_fused_gate_up",
]

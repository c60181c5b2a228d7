"""A Qwen3-MoE dense layer's (``mlp_only_layers``) MLP LoRA converts to PEFT's ``mlp.{gate,up,down}_proj``."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.lora.convert import megatron_to_peft, peft_to_megatron
from moe_lora_plugins.lora.families import ModelDims

P = "base_model.model.model.layers.0.mlp"
M = "decoder.layers.0.mlp"
DIMS = ModelDims(num_attention_heads=4, num_query_groups=2, head_dim=4, num_experts=4)


def _dense_layer(tp: int, seed: int = 0) -> tuple[dict, dict]:
    """(PEFT tensors, Megatron tensors) of one dense SwiGLU MLP adapter; fc1 B is [gate_i; up_i] per TP shard."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, r = 16, 8, 4
    a1, bg, bu = torch.randn(r, hidden, generator=g), torch.randn(inter, r, generator=g), torch.randn(inter, r, generator=g)
    a2, bd = torch.randn(r, inter, generator=g), torch.randn(hidden, r, generator=g)
    n = inter // tp
    fc1_b = torch.cat([piece for i in range(tp) for piece in (bg[i * n:(i + 1) * n], bu[i * n:(i + 1) * n])])
    peft = {
        f"{P}.gate_proj.lora_A.weight": a1, f"{P}.gate_proj.lora_B.weight": bg,
        f"{P}.up_proj.lora_A.weight": a1, f"{P}.up_proj.lora_B.weight": bu,
        f"{P}.down_proj.lora_A.weight": a2, f"{P}.down_proj.lora_B.weight": bd,
    }
    megatron = {
        f"{M}.linear_fc1.adapter.linear_in.weight": a1, f"{M}.linear_fc1.adapter.linear_out.weight": fc1_b,
        f"{M}.linear_fc2.adapter.linear_in.weight": a2, f"{M}.linear_fc2.adapter.linear_out.weight": bd,
    }
    return peft, megatron


@pytest.mark.parametrize("tp", [1, 2])
def test_dense_mlp_lora_of_a_qwen3_moe_layer_becomes_peft_gate_up_down(tp):
    peft, megatron = _dense_layer(tp)
    adapter = megatron_to_peft(megatron, "qwen3_moe", DIMS, alpha=8, tp=tp)
    assert sorted(adapter.tensors) == sorted(peft)
    for name, tensor in peft.items():
        assert torch.equal(adapter.tensors[name], tensor), name
    assert {"gate_proj", "up_proj", "down_proj"} <= set(adapter.peft_config()["target_modules"])


@pytest.mark.parametrize("tp", [1, 2])
def test_peft_dense_mlp_of_a_qwen3_moe_layer_goes_back_to_megatron_fc1_fc2(tp):
    peft, megatron = _dense_layer(tp, seed=1)
    back = peft_to_megatron(peft, "qwen3_moe", DIMS, tp=tp)
    assert sorted(back) == sorted(megatron)
    for name, tensor in megatron.items():
        assert torch.equal(back[name], tensor), name

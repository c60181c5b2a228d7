"""Writers of each engine format: PEFT directory, vLLM 3-D fused, vLLM shared-outer; format choice."""

from __future__ import annotations

import json

import pytest
import torch

from moe_lora_plugins.lora.convert import megatron_to_peft
from moe_lora_plugins.lora.families import ExpertsRule, ModelDims, ModelFamily, get_family
from moe_lora_plugins.lora.formats import (
    FormatError,
    adapter_from_peft,
    choose_format,
    from_vllm_3d,
    read_peft_dir,
    render,
    to_vllm_3d,
    to_vllm_shared_outer,
    write_peft_dir,
)

E, H, INTER, R = 4, 16, 6, 4
DIMS = ModelDims(4, 2, 4, E)
EXP = "base_model.model.model.layers.0.mlp.experts"


def megatron_experts(
    shared_in: bool = False, shared_out: bool = False, rank: int = R
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    p = "decoder.layers.0.mlp.experts"

    def t(shared, *shape):
        return torch.randn(*shape, generator=g) if shared else torch.randn(E, *shape, generator=g)

    return {
        "decoder.layers.0.self_attention.linear_proj.adapter.linear_in.weight": torch.randn(
            R, 8, generator=g
        ),
        "decoder.layers.0.self_attention.linear_proj.adapter.linear_out.weight": torch.randn(
            H, R, generator=g
        ),
        f"{p}.linear_fc1.adapter.linear_in.weight": t(shared_in, rank, H),
        f"{p}.linear_fc1.adapter.linear_out.weight": t(shared_out, 2 * INTER, rank),
        f"{p}.linear_fc2.adapter.linear_in.weight": t(shared_out, rank, INTER),
        f"{p}.linear_fc2.adapter.linear_out.weight": t(shared_in, H, rank),
    }


def peft_delta(a: torch.Tensor, b: torch.Tensor, experts: int) -> torch.Tensor:
    """PEFT's ParamWrapper delta for a 3-D expert parameter stored (E, out, in)."""
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts)
    return torch.einsum("o r e, e r i -> e o i", b3, a3)


def test_peft_dir_round_trips_tensors_and_config(tmp_path):
    adapter = megatron_to_peft(
        megatron_experts(), "qwen3_moe", DIMS, alpha=16, base_model_name_or_path="tiny"
    )
    write_peft_dir(adapter, tmp_path)
    tensors, config = read_peft_dir(tmp_path)
    assert sorted(tensors) == sorted(adapter.tensors)
    assert all(torch.equal(tensors[n], adapter.tensors[n]) for n in tensors)
    assert config["r"] == R and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {"o_proj", "gate_proj", "up_proj", "down_proj"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"


def test_other_ranks_go_into_rank_pattern():
    tensors = megatron_experts()
    tensors.update({k: v for k, v in megatron_experts(rank=2).items() if ".experts." in k})
    config = megatron_to_peft(tensors, "qwen3_moe", DIMS, alpha=16).peft_config()
    assert config["r"] == 2
    assert config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.o_proj": R}


def test_adapter_from_peft_refuses_rslora():
    with pytest.raises(FormatError, match="rsLoRA"):
        adapter_from_peft({}, {"lora_alpha": 8, "use_rslora": True}, "qwen3_moe")


def test_3d_format_has_the_same_per_expert_deltas_as_the_2d_one():
    adapter = megatron_to_peft(megatron_experts(), "qwen3_moe", DIMS, alpha=16)
    fused = to_vllm_3d(adapter)
    t2 = adapter.tensors
    a, b = fused[f"{EXP}.base_layer.lora_A.weight"], fused[f"{EXP}.base_layer.lora_B.weight"]
    assert a.shape == (E * R, H) and b.shape == (2 * INTER, R * E)
    delta = peft_delta(a, b, E)
    for e in range(E):
        gate = t2[f"{EXP}.{e}.gate_proj.lora_B.weight"] @ t2[f"{EXP}.{e}.gate_proj.lora_A.weight"]
        up = t2[f"{EXP}.{e}.up_proj.lora_B.weight"] @ t2[f"{EXP}.{e}.up_proj.lora_A.weight"]
        torch.testing.assert_close(delta[e], torch.cat((gate, up)), rtol=0, atol=1e-5)
    down = peft_delta(fused[f"{EXP}.lora_A.weight"], fused[f"{EXP}.lora_B.weight"], E)
    for e in range(E):
        want = t2[f"{EXP}.{e}.down_proj.lora_B.weight"] @ t2[f"{EXP}.{e}.down_proj.lora_A.weight"]
        torch.testing.assert_close(down[e], want, rtol=0, atol=1e-5)
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" in fused


def test_3d_format_inverts_to_the_2d_tensors():
    adapter = megatron_to_peft(megatron_experts(), "qwen3_moe", DIMS, alpha=16)
    back = from_vllm_3d(to_vllm_3d(adapter), E, "qwen3_moe")
    assert sorted(back) == sorted(adapter.tensors)
    assert all(torch.equal(back[n], adapter.tensors[n]) for n in back)


def test_interleaved_gate_up_families_alternate_rows():
    base = get_family("qwen3_moe")
    family = ModelFamily("interleaved", ("x",), base.modules, ExpertsRule(gate_up_interleaved=True))
    adapter = megatron_to_peft(megatron_experts(), family, DIMS, alpha=16)
    b = to_vllm_3d(adapter)[f"{EXP}.base_layer.lora_B.weight"].reshape(2 * INTER, R, E)
    assert torch.equal(b[0::2, :, 1], adapter.tensors[f"{EXP}.1.gate_proj.lora_B.weight"])
    assert torch.equal(b[1::2, :, 1], adapter.tensors[f"{EXP}.1.up_proj.lora_B.weight"])
    back = from_vllm_3d(to_vllm_3d(adapter), E, family)
    assert all(torch.equal(back[n], adapter.tensors[n]) for n in back)


def test_shared_outer_stores_shared_factors_once():
    adapter = megatron_to_peft(megatron_experts(shared_in=True), "qwen3_moe", DIMS, alpha=16)
    out = to_vllm_shared_outer(adapter)
    assert out[f"{EXP}.w1.lora_A.weight"].shape == (1, R, H)
    assert out[f"{EXP}.w1.lora_B.weight"].shape == (E, INTER, R)
    assert out[f"{EXP}.w2.lora_A.weight"].shape == (E, R, INTER)
    assert out[f"{EXP}.w2.lora_B.weight"].shape == (1, H, R)
    assert torch.equal(out[f"{EXP}.w3.lora_B.weight"][2], adapter.tensors[f"{EXP}.2.up_proj.lora_B.weight"])


def test_shared_outer_refuses_per_expert_lora_a():
    adapter = megatron_to_peft(megatron_experts(), "qwen3_moe", DIMS, alpha=16)
    with pytest.raises(FormatError, match=r"gate_proj: LoRA A differs between experts"):
        to_vllm_shared_outer(adapter)


def test_dense_family_has_no_3d_format():
    tensors = {k: v for k, v in megatron_experts().items() if ".experts." not in k}
    adapter = megatron_to_peft(tensors, "qwen3", DIMS, alpha=16)
    with pytest.raises(FormatError, match="no routed experts"):
        render(adapter, "vllm_3d")


@pytest.mark.parametrize(
    ("engine", "model_type", "shared_outer", "want"),
    [
        ("vllm", "qwen3_moe", False, "vllm_2d"),
        ("vllm", "glm4_moe", False, "vllm_2d"),
        ("vllm", "qwen3_vl_moe", False, "vllm_3d"),
        ("vllm", "gpt_oss", False, "vllm_3d"),
        ("vllm", "qwen3_moe", True, "vllm_shared_outer"),
        ("sglang", "qwen3_moe", False, "sglang"),
        ("peft", None, False, "peft"),
    ],
)
def test_format_follows_engine_and_model(engine, model_type, shared_outer, want):
    assert choose_format(engine, model_type, shared_outer=shared_outer) == want


def test_explicit_format_wins_and_unknown_ones_are_refused():
    assert choose_format("vllm", "qwen3_moe", explicit="vllm_3d") == "vllm_3d"
    with pytest.raises(FormatError, match="unknown adapter format 'vllm_4d'"):
        choose_format("vllm", explicit="vllm_4d")

"""Sync validation accepts exactly what our converter makes, for every family it has a table for.

The reference is Hugging Face transformers itself: each family's model class is built (on the meta
device) from a tiny config, and every LoRA-able projection it has (attention, dense MLP, router,
routed experts from the fused 3-D parameters, shared experts) gives its (out, in) shape. A Megatron
adapter of those shapes goes through ``megatron_to_peft``; the PEFT adapter must cover exactly those
modules with those shapes, and ``sync.validation`` must accept it and name what is taken away.
"""

from __future__ import annotations

import re

import pytest
import torch

from moe_lora_plugins.lora.convert import megatron_to_peft
from moe_lora_plugins.lora.families import ModelDims, get_family
from moe_lora_plugins.sync.errors import AdapterValidationError
from moe_lora_plugins.sync.validation import check_adapter, expected_adapter

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2)
FAMILY_CONFIGS = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[0]),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=24, decoder_sparse_step=1,
                      mlp_only_layers=[0]),
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                     head_dim=8, partial_rotary_factor=0.5, n_group=1, topk_group=1),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
                        kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        n_group=1, topk_group=1),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        moe_layer_freq=1, n_group=1, topk_group=1),
}
RANK = 2
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **COMMON, **FAMILY_CONFIGS[model_type])


def hf_lora_shapes(model_type: str) -> dict[str, tuple[int, int]]:
    """HF module path -> (out, in) of every projection the family's table covers, read from the HF model."""
    from transformers import AutoModelForCausalLM

    family = get_family(model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(model_type))
    shapes: dict[str, tuple[int, int]] = {}
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        if match is None:
            continue
        layer, path = match.groups()
        head = f"model.layers.{layer}"
        if path.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, hidden)
            inter = param.shape[1] // 2
            for e in range(param.shape[0]):
                shapes[f"{head}.mlp.experts.{e}.gate_proj"] = (inter, param.shape[2])
                shapes[f"{head}.mlp.experts.{e}.up_proj"] = (inter, param.shape[2])
        elif path.endswith("mlp.experts.down_proj"):  # (E, hidden, I)
            for e in range(param.shape[0]):
                shapes[f"{head}.mlp.experts.{e}.down_proj"] = tuple(param.shape[1:])
        elif path.endswith(".weight") and param.dim() == 2 and family.rule_for_hf(path.removesuffix(".weight")):
            shapes[f"{head}.{path.removesuffix('.weight')}"] = tuple(param.shape)
    return shapes


def megatron_adapter(model_type: str, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Random Megatron LoRA tensors (fused qkv / fc1 where the table fuses) of exactly the HF shapes."""
    family = get_family(model_type)
    g = torch.Generator().manual_seed(0)
    fused: dict[str, list[tuple[int, int]]] = {}
    for module, shape in shapes.items():
        layer, path = _LAYER.match(module).groups()
        expert = re.match(r"^mlp\.experts\.(\d+)\.(\w+)$", path)
        if expert is not None:
            fc = "linear_fc2" if expert[2] == family.experts.down else "linear_fc1"
            key = f"decoder.layers.{layer}.{family.experts.megatron}.local_experts.{expert[1]}.{fc}"
        else:
            rule, _ = family.rule_for_hf(path)
            key = f"decoder.layers.{layer}.{rule.megatron}"
        fused.setdefault(key, []).append(shape)
    tensors = {}
    for key, parts in fused.items():
        tensors[f"{key}.adapter.linear_in.weight"] = torch.randn(RANK, parts[0][1], generator=g)
        tensors[f"{key}.adapter.linear_out.weight"] = torch.randn(sum(out for out, _ in parts), RANK, generator=g)
    return tensors


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_sync_validation_accepts_exactly_the_converters_adapter_for_every_family(model_type):
    config = hf_config(model_type).to_dict()
    shapes = hf_lora_shapes(model_type)
    adapter = megatron_to_peft(megatron_adapter(model_type, shapes), model_type, ModelDims.from_hf_config(config),
                               alpha=4)
    converted = {module: (int(b.shape[0]), int(a.shape[1])) for module, (a, b) in adapter.modules().items()}
    assert converted == shapes, "the converter must produce every HF projection of the family, with its shape"
    expected = expected_adapter(config, adapter.peft_config(), torch.float32)
    check_adapter(adapter.tensors, expected, f"{model_type} adapter")
    assert len(expected) == len(adapter.tensors)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "glm4_moe", "deepseek_v3"])
def test_sync_validation_names_a_missing_shared_expert_tensor(model_type):
    config = hf_config(model_type).to_dict()
    adapter = megatron_to_peft(megatron_adapter(model_type, hf_lora_shapes(model_type)), model_type,
                               ModelDims.from_hf_config(config), alpha=4)
    tensors = dict(adapter.tensors)
    shared = next(name for name in sorted(tensors) if ".shared_expert" in name and "down_proj.lora_B" in name)
    del tensors[shared]
    with pytest.raises(AdapterValidationError, match=re.escape(f"missing {shared}")):
        check_adapter(tensors, expected_adapter(config, adapter.peft_config(), torch.float32))

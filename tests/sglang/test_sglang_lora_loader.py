"""Our SGLang-format adapter (``lora.formats.sglang_payload``) through SGLang 0.5.23's own loader.

SGLang's path behind ``Engine.load_lora_adapter_from_tensors`` is
``LoRAManager._load_lora_adapter_from_tensors``: ``LoRAConfig.from_dict``, ``validate_new_adapter``,
then ``LoRAAdapter.initialize_weights_from_tensors`` (per-layer weights, q/k/v and gate/up stacked by
its normalizers). The manager is built without its GPU memory pool or base model (``__new__`` plus
the attributes that path reads); every step of the path itself is SGLang's. What SGLang then holds
is checked against an independent reference: for the dense model, HF transformers + PEFT's own
``get_delta_weight``; for the MoE experts, the Megatron LoRA tensors the adapter was converted from
(fused fc1 = [gate; up] per expert).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.sglang

lora_module = pytest.importorskip("sglang.srt.lora.lora")
lora_manager_module = pytest.importorskip("sglang.srt.lora.lora_manager")

from sglang.srt.configs.load_config import LoadConfig  # noqa: E402
from sglang.srt.lora.lora_registry import LoRARef  # noqa: E402

from moe_lora_plugins.lora.convert import megatron_to_peft  # noqa: E402
from moe_lora_plugins.lora.families import ModelDims  # noqa: E402
from moe_lora_plugins.lora.formats import adapter_from_peft, read_peft_dir, sglang_payload  # noqa: E402

R, ALPHA = 4, 8


class _HFConfig:
    """The two base-model fields SGLang's adapter path reads."""

    def __init__(self, num_hidden_layers: int, vocab_size: int) -> None:
        self.num_hidden_layers = num_hidden_layers
        self.vocab_size = vocab_size


def _sglang_load(tensors: dict[str, torch.Tensor], config: dict, layers: int) -> lora_module.LoRAAdapter:
    """Run SGLang's load-from-tensors path; return the LoRAAdapter it keeps."""
    manager = lora_manager_module.LoRAManager.__new__(lora_manager_module.LoRAManager)
    manager.base_hf_config = _HFConfig(layers, vocab_size=64)
    manager.load_config = LoadConfig()
    manager.lora_backend = None
    manager.base_model = None
    manager.attn_dp_enabled = False
    manager.configs, manager.loras, manager.lora_refs = {}, {}, {}
    manager.num_pinned_loras, manager.max_loras_per_batch = 0, 4
    manager.speculative_algorithm = None
    ref = LoRARef(lora_name="synced", lora_path="moelora://synced", pinned=False)
    result = manager._load_lora_adapter_from_tensors(ref, tensors, config)
    assert result.success, result.error_message
    return manager.loras[ref.lora_id]


def _row_blocks(b: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(b, sizes, dim=0))


def test_a_dense_adapter_is_held_as_peft_computes_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    model = transformers.Qwen3ForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path)
    tensors, adapter_config = read_peft_dir(tmp_path)
    payload, config_dict = sglang_payload(adapter_from_peft(tensors, adapter_config, "qwen3"))

    held = _sglang_load(payload, config_dict, layers=2)

    sizes = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "gate_proj": 48, "up_proj": 48}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}"
        modules = dict(peft_model.base_model.model.model.layers[layer].named_modules())

        weights = held.layers[layer].weights
        for fused, parts, pieces in (
            ("self_attn.qkv_proj", 3, ("q_proj", "k_proj", "v_proj")),
            ("mlp.gate_up_proj", 2, ("gate_proj", "up_proj")),
        ):
            a = weights[f"{prefix}.{fused}.lora_A.weight"]
            b_blocks = _row_blocks(weights[f"{prefix}.{fused}.lora_B.weight"], [sizes[p] for p in pieces])
            assert a.shape[0] == parts * R
            for index, piece in enumerate(pieces):
                got = held.scaling * (b_blocks[index] @ a[index * R : (index + 1) * R])
                owner = f"{fused.split('.')[0]}.{piece}"
                torch.testing.assert_close(got, modules[owner].get_delta_weight("default"), rtol=1e-5, atol=1e-6)
        for single in ("self_attn.o_proj", "mlp.down_proj"):
            a = weights[f"{prefix}.{single}.lora_A.weight"]
            b = weights[f"{prefix}.{single}.lora_B.weight"]
            torch.testing.assert_close(
                held.scaling * (b @ a), modules[single].get_delta_weight("default"), rtol=1e-5, atol=1e-6
            )
    assert held.scaling == ALPHA / R


E, H, INTER = 4, 16, 6


def _megatron_moe_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    experts = "decoder.layers.0.mlp.experts"
    return {
        "decoder.layers.0.self_attention.linear_proj.adapter.linear_in.weight": torch.randn(R, 8, generator=g),
        "decoder.layers.0.self_attention.linear_proj.adapter.linear_out.weight": torch.randn(H, R, generator=g),
        f"{experts}.linear_fc1.adapter.linear_in.weight": torch.randn(E, R, H, generator=g),
        f"{experts}.linear_fc1.adapter.linear_out.weight": torch.randn(E, 2 * INTER, R, generator=g),
        f"{experts}.linear_fc2.adapter.linear_in.weight": torch.randn(E, R, INTER, generator=g),
        f"{experts}.linear_fc2.adapter.linear_out.weight": torch.randn(E, H, R, generator=g),
    }


def test_moe_expert_adapters_are_held_as_the_megatron_lora_they_came_from():
    megatron = _megatron_moe_tensors()
    adapter = megatron_to_peft(megatron, "qwen3_moe", ModelDims(4, 2, 4, E), alpha=ALPHA)
    payload, config_dict = sglang_payload(adapter)

    held = _sglang_load(payload, config_dict, layers=1)

    scale = ALPHA / R
    fc1_in = megatron["decoder.layers.0.mlp.experts.linear_fc1.adapter.linear_in.weight"]
    fc1_out = megatron["decoder.layers.0.mlp.experts.linear_fc1.adapter.linear_out.weight"]
    fc2_in = megatron["decoder.layers.0.mlp.experts.linear_fc2.adapter.linear_in.weight"]
    fc2_out = megatron["decoder.layers.0.mlp.experts.linear_fc2.adapter.linear_out.weight"]
    weights = held.layers[0].weights
    prefix = "base_model.model.model.layers.0.mlp.experts"
    for expert in range(E):
        a = weights[f"{prefix}.{expert}.gate_up_proj.lora_A.weight"]
        b = weights[f"{prefix}.{expert}.gate_up_proj.lora_B.weight"]
        gate_b, up_b = _row_blocks(b, [INTER, INTER])
        fc1_delta = scale * (fc1_out[expert] @ fc1_in[expert])
        torch.testing.assert_close(held.scaling * (gate_b @ a[:R]), fc1_delta[:INTER])
        torch.testing.assert_close(held.scaling * (up_b @ a[R:]), fc1_delta[INTER:])
        down_a = weights[f"{prefix}.{expert}.down_proj.lora_A.weight"]
        down_b = weights[f"{prefix}.{expert}.down_proj.lora_B.weight"]
        torch.testing.assert_close(held.scaling * (down_b @ down_a), scale * (fc2_out[expert] @ fc2_in[expert]))
    o_a = weights["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"]
    o_b = weights["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"]
    proj_in = megatron["decoder.layers.0.self_attention.linear_proj.adapter.linear_in.weight"]
    proj_out = megatron["decoder.layers.0.self_attention.linear_proj.adapter.linear_out.weight"]
    torch.testing.assert_close(held.scaling * (o_b @ o_a), scale * (proj_out @ proj_in))
    held_experts = {name.split(".experts.")[1].split(".")[0] for name in weights if ".experts." in name}
    assert held_experts == {str(e) for e in range(E)}

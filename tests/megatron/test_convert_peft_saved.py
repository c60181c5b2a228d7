"""``moe-lora-plugins convert`` reads what PEFT itself saves with transformers 5.

With transformers 5 the experts of Qwen3-MoE are 3-D parameters, so PEFT 0.21 stores LoRA on
``gate_proj`` / ``up_proj`` / ``down_proj`` as ``target_parameters`` on the fused ``gate_up_proj`` and
``down_proj`` (with its own ``rank_pattern`` and ``alpha_pattern`` for gate_up). The converted
per-expert adapter must give, module by module, the weight delta that PEFT's own merge gives.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_lora_plugins.cli import main
from moe_lora_plugins.lora.formats import read_peft_dir

TARGETS = ["q_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    root = tmp_path_factory.mktemp("peft-saved")
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = get_peft_model(Qwen3MoeForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: give the adapter a delta to compare
                param.normal_()
    model.save_pretrained(root / "P")
    (root / "config.json").write_text(json.dumps(config.to_dict()))
    base = {n: p.detach().clone() for n, p in model.base_model.model.named_parameters() if "lora_" not in n}
    merged = {n: p.detach().clone() for n, p in model.merge_and_unload().named_parameters()}
    deltas = {}
    for name, before in base.items():
        plain = name.replace(".base_layer", "")  # where merge_and_unload puts the parameter back
        if plain in merged:
            deltas[plain.removesuffix(".weight")] = merged[plain] - before
    return root, config, deltas


def test_peft_saves_fused_experts_with_an_alpha_pattern(peft_saved):
    root, _, _ = peft_saved
    saved = json.loads((root / "P" / "adapter_config.json").read_text())
    assert saved["alpha_pattern"] and saved["target_parameters"], saved


def test_convert_to_vllm_2d_gives_peft_merges_delta_for_every_module(peft_saved):
    root, config, deltas = peft_saved
    out = root / "vllm_2d"
    assert main(["convert", str(root / "P"), str(out), "--to", "vllm_2d", "--hf-config", str(root / "config.json")]) == 0
    tensors, converted = read_peft_dir(out)
    assert not converted["alpha_pattern"]
    modules = {name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for name in tensors}
    inter = config.moe_intermediate_size

    def ours(module: str) -> torch.Tensor:
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        return converted["lora_alpha"] / a.shape[0] * (b @ a)

    checked = 0
    for layer in range(config.num_hidden_layers):
        head = f"model.layers.{layer}"
        torch.testing.assert_close(ours(f"{head}.self_attn.q_proj"), deltas[f"{head}.self_attn.q_proj"])
        gate_up, down = deltas[f"{head}.mlp.experts.gate_up_proj"], deltas[f"{head}.mlp.experts.down_proj"]
        for e in range(config.num_experts):
            torch.testing.assert_close(ours(f"{head}.mlp.experts.{e}.gate_proj"), gate_up[e, :inter])
            torch.testing.assert_close(ours(f"{head}.mlp.experts.{e}.up_proj"), gate_up[e, inter:])
            torch.testing.assert_close(ours(f"{head}.mlp.experts.{e}.down_proj"), down[e])
            checked += 3
        checked += 1
    assert checked == len(modules) == config.num_hidden_layers * (1 + 3 * config.num_experts)

"""``moe-lora-plugins convert``: PEFT directory -> engine formats and Megatron names, and back."""

from __future__ import annotations

import json

import torch

from moe_lora_plugins.cli import main
from moe_lora_plugins.lora.convert import megatron_to_peft
from moe_lora_plugins.lora.families import ModelDims
from moe_lora_plugins.lora.formats import read_peft_dir, write_peft_dir

HF_CONFIG = {
    "model_type": "qwen3_moe",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 4,
    "hidden_size": 16,
    "num_experts": 2,
}


def _peft_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    megatron = {}
    for e in range(2):
        p = f"decoder.layers.0.mlp.experts.local_experts.{e}"
        megatron[f"{p}.linear_fc1.adapter.linear_in.weight"] = torch.randn(2, 16, generator=g)
        megatron[f"{p}.linear_fc1.adapter.linear_out.weight"] = torch.randn(12, 2, generator=g)
        megatron[f"{p}.linear_fc2.adapter.linear_in.weight"] = torch.randn(2, 6, generator=g)
        megatron[f"{p}.linear_fc2.adapter.linear_out.weight"] = torch.randn(16, 2, generator=g)
    adapter = megatron_to_peft(megatron, "qwen3_moe", ModelDims.from_hf_config(HF_CONFIG), alpha=4)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    return write_peft_dir(adapter, tmp_path / "peft"), adapter, megatron


def test_convert_to_3d_writes_fused_expert_tensors(tmp_path, capsys):
    src, _, _ = _peft_dir(tmp_path)
    rc = main(
        [
            "convert",
            str(src),
            str(tmp_path / "v3d"),
            "--to",
            "vllm_3d",
            "--hf-config",
            str(tmp_path / "config.json"),
        ]
    )
    tensors, config = read_peft_dir(tmp_path / "v3d")
    assert rc == 0 and config["r"] == 2
    assert tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (4, 16)
    assert "distinct bytes" in capsys.readouterr().out


def test_convert_to_megatron_and_back_is_identity(tmp_path):
    src, adapter, megatron = _peft_dir(tmp_path)
    cfg = str(tmp_path / "config.json")
    assert main(["convert", str(src), str(tmp_path / "mg"), "--to", "megatron", "--hf-config", cfg]) == 0
    mg_tensors, _ = read_peft_dir(tmp_path / "mg")
    assert sorted(mg_tensors) == sorted(megatron)
    args = [
        "convert",
        str(tmp_path / "mg" / "adapter_model.safetensors"),
        str(tmp_path / "back"),
        "--from",
        "megatron",
    ]
    assert main([*args, "--alpha", "4", "--hf-config", cfg]) == 0
    back, _ = read_peft_dir(tmp_path / "back")
    assert sorted(back) == sorted(adapter.tensors)
    assert all(torch.equal(back[n], adapter.tensors[n]) for n in back)

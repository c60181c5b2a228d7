"""The PEFT adapter we write from a live Megatron model gives, in HF transformers + peft, the same logits
as the Megatron model with LoRA (float32, CPU).

The base weights reach HF through Megatron-Bridge's plain export (saved as a checkpoint that
transformers loads; transformers v5 fuses the per-expert tensors into its 3-D expert parameters on
load), the adapter through :func:`moe_lora_plugins.lora.export.save_peft_adapter`; ``peft`` converts
its per-expert LoRA to the 3-D ``target_parameters`` form for transformers v5 on load (and the
router's ``mlp.gate`` LoRA to a ``gate.weight`` parameter LoRA).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lora_plugins.testing.distributed import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

TOLERANCE = 1e-5


def _megatron_and_peft_dirs(config_kind: str, target_modules: tuple[str, ...], out: str) -> dict:
    """One rank (world 1): the Megatron logits, the base checkpoint and the adapter (LoRA B non-zero)."""
    from moe_lora_plugins.testing.peft_reference import megatron_logits_and_peft_dirs
    from moe_lora_plugins.testing.tiny_models import LoraSettings, tiny_qwen3_config, tiny_qwen3_moe_config

    hf_config = tiny_qwen3_moe_config() if config_kind == "moe" else tiny_qwen3_config()
    return megatron_logits_and_peft_dirs(hf_config, LoraSettings(target_modules=target_modules), out)


def _hf_peft_logits(base_dir: Path, adapter_dir: Path, tokens):
    import torch

    from moe_lora_plugins.testing.peft_reference import load_hf_with_peft

    _, model = load_hf_with_peft(base_dir, adapter_dir)
    with torch.no_grad():
        with_adapter = model(input_ids=tokens).logits
        with model.disable_adapter():
            without_adapter = model(input_ids=tokens).logits
    return with_adapter, without_adapter


@pytest.mark.parametrize(
    ("config_kind", "target_modules"),
    [
        ("moe", ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")),
        ("moe", ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router")),
        ("dense", ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")),
    ],
    ids=["qwen3_moe", "qwen3_moe-router", "qwen3"],
)
def test_peft_adapter_logits_equal_megatron_lora_logits(tmp_path, config_kind, target_modules):
    (result,) = run_distributed(_megatron_and_peft_dirs, 1, args=(config_kind, target_modules, str(tmp_path)))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    logits, base_logits = _hf_peft_logits(tmp_path / "base", tmp_path / "adapter", result["tokens"])
    diff = (logits - result["logits"]).abs().max().item()
    lora_effect = (base_logits - result["logits"]).abs().max().item()
    print(
        f"{config_kind} {'+'.join(target_modules)}: max |HF+PEFT - Megatron+LoRA| = {diff:.3e} (LoRA moves logits by {lora_effect:.3e})"
    )
    assert lora_effect > 1e3 * TOLERANCE, (
        "the adapter barely changes the logits: the comparison would prove nothing"
    )
    assert diff <= TOLERANCE

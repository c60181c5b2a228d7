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
    """One rank (world 1): build, fill (LoRA B non-zero), forward, write base checkpoint and adapter."""
    import torch
    from safetensors.torch import save_file

    from moe_lora_plugins.lora.export import save_peft_adapter
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu
    from moe_lora_plugins.testing.tiny_models import (
        LoraSettings,
        build_lora_model,
        fill_from_global_names,
        tiny_qwen3_config,
        tiny_qwen3_moe_config,
    )

    prepare_megatron_cpu()
    # Megatron's rotary embedding moves its buffer to ``torch.cuda.current_device()``: keep it on the CPU.
    torch.cuda.current_device = lambda: "cpu"
    hf_config = tiny_qwen3_moe_config() if config_kind == "moe" else tiny_qwen3_config()
    built = build_lora_model(hf_config, lora=LoraSettings(target_modules=target_modules))
    fill_from_global_names(built)
    import contextlib

    from megatron.core import tensor_parallel

    # Attention forks the CUDA RNG tracker around dropout; in eval mode there is no dropout to seed.
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    model = built.model[0]
    model.eval()
    tokens = torch.tensor([[3, 17, 42, 99, 5, 64, 8, 120, 1, 77, 31, 2]])
    seq = tokens.shape[1]
    positions = torch.arange(seq).unsqueeze(0)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=causal)

    base_dir, adapter_dir = Path(out) / "base", Path(out) / "adapter"
    base_dir.mkdir(parents=True)
    weights = dict(
        built.bridge.export_hf_weights(
            built.model, cpu=True, show_progress=False, merge_adapter_weights=False
        )
    )
    # With LoRA applied the bridge names LoRA-wrapped expert bases '<module>.base_layer.weight'.
    base = {k.replace(".base_layer.", "."): v.contiguous() for k, v in weights.items()}
    save_file(base, str(base_dir / "model.safetensors"))
    hf_config.save_pretrained(base_dir)
    save_peft_adapter(built.model, adapter_dir, bridge=built.bridge, base_model_name_or_path=str(base_dir))
    return {"tokens": tokens, "logits": logits.float()}


def _hf_peft_logits(base_dir: Path, adapter_dir: Path, tokens):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, info = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), f"base checkpoint does not load cleanly: {info}"
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
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

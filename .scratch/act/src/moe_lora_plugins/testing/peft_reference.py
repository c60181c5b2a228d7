"""The HF transformers + peft reference for Megatron + LoRA logits, as the megatron-lane tests use it.

:func:`megatron_logits_and_peft_dirs` runs in one rank (world size 1, see
:func:`~moe_lora_plugins.testing.distributed.run_distributed`): it builds a model with LoRA, fills it
from global names, computes the logits of fixed tokens in eval mode, and writes what HF needs to
compute the same logits independently: the bridge's plain export as an HF checkpoint (``out/base``)
and the adapter as a PEFT directory (``out/adapter``). :func:`load_hf_with_peft` loads both back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENS = (3, 17, 42, 99, 5, 64, 8, 120, 1, 77, 31, 2)


def megatron_logits_and_peft_dirs(hf_config: Any, lora: Any, out: str) -> dict[str, Any]:
    """``{"tokens", "logits"}`` of the Megatron model with LoRA; ``out/base`` and ``out/adapter`` written."""
    import contextlib

    import torch
    from safetensors.torch import save_file

    from moe_lora_plugins.lora.export import save_peft_adapter
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names

    prepare_megatron_cpu()
    # Megatron's rotary embedding moves its buffer to ``torch.cuda.current_device()``: keep it on the CPU.
    torch.cuda.current_device = lambda: "cpu"
    built = build_lora_model(hf_config, lora=lora)
    fill_from_global_names(built)
    from megatron.core import tensor_parallel

    # Attention forks the CUDA RNG tracker around dropout; in eval mode there is no dropout to seed.
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    model = built.model[0]
    model.eval()
    tokens = torch.tensor([TOKENS])
    seq = tokens.shape[1]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        logits = model(input_ids=tokens, position_ids=torch.arange(seq)[None], attention_mask=causal)

    base_dir, adapter_dir = Path(out) / "base", Path(out) / "adapter"
    base_dir.mkdir(parents=True)
    weights = built.bridge.export_hf_weights(built.model, cpu=True, show_progress=False, merge_adapter_weights=False)
    # With LoRA applied the bridge names LoRA-wrapped bases '<module>.base_layer.weight'.
    save_file({k.replace(".base_layer.", "."): v.contiguous() for k, v in weights}, str(base_dir / "model.safetensors"))
    hf_config.save_pretrained(base_dir)
    save_peft_adapter(built.model, adapter_dir, bridge=built.bridge, base_model_name_or_path=str(base_dir))
    return {"tokens": tokens, "logits": logits.float()}


def load_hf_with_peft(base_dir: Path, adapter_dir: Path) -> tuple[Any, Any]:
    """``(base, peft_model)`` in float32, eval mode; the base checkpoint must load without missing,
    unexpected or mismatched tensors."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, info = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), f"base checkpoint does not load cleanly: {info}"
    return base, PeftModel.from_pretrained(base, adapter_dir).eval()


def load_hf_with_peft_and_dense_mlp_lora(base_dir: Path, adapter_dir: Path) -> tuple[Any, Any]:
    """:func:`load_hf_with_peft`, plus the adapter's LoRA on the dense MLPs of ``mlp_only_layers``.

    peft 0.21 on transformers v5 re-targets every ``gate_proj`` / ``up_proj`` / ``down_proj`` of a
    ``qwen3_moe`` model to the fused expert parameters, so ``PeftModel`` drops the dense layers' MLP
    LoRA; peft's own ``inject_adapter_in_model`` adds it on each dense MLP here (an adapter without
    dense-MLP tensors is left as it is).
    """
    import json

    import torch
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    base, model = load_hf_with_peft(base_dir, adapter_dir)
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    for layer in getattr(base.config, "mlp_only_layers", None) or []:
        prefix = f"base_model.model.model.layers.{layer}.mlp."
        state = {"mlp." + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            continue
        holder = torch.nn.Module()  # no .config: peft leaves the target names alone
        holder.mlp = base.model.layers[layer].mlp
        targets = sorted({k.split(".")[1] for k in state})
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=targets)
        inject_adapter_in_model(lora, holder, adapter_name="dense")
        result = set_peft_model_state_dict(holder, state, adapter_name="dense")
        if result.unexpected_keys:
            raise AssertionError(f"dense-MLP LoRA of layer {layer} did not load: {result.unexpected_keys}")
    return base, model

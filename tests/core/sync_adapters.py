"""The adapter the sync tests send between processes: two layers, attention LoRA per layer and one expert
adapter that every expert of a layer shares (so a sync's dedupe has copies to fold)."""

from __future__ import annotations

import torch

CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]}
EXPERTS = 8


def shared_expert_adapter(seed: int) -> dict[str, torch.Tensor]:
    """PEFT-named tensors of two layers: bf16 q_proj LoRA, float32 up_proj LoRA shared by all ``EXPERTS``
    experts; the values depend on ``seed`` only."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for layer in range(2):
        head = f"base_model.model.model.layers.{layer}"
        out[f"{head}.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 64, generator=g).to(torch.bfloat16)
        out[f"{head}.self_attn.q_proj.lora_B.weight"] = torch.randn(64, 4, generator=g).to(torch.bfloat16)
        shared_a, shared_b = torch.randn(4, 64, generator=g), torch.randn(32, 4, generator=g)
        for expert in range(EXPERTS):
            out[f"{head}.mlp.experts.{expert}.up_proj.lora_A.weight"] = shared_a
            out[f"{head}.mlp.experts.{expert}.up_proj.lora_B.weight"] = shared_b
    return out

"""Tiny Qwen3 / Qwen3-MoE checkpoints, tokenizers and LoRA adapters made locally for the vLLM tests.

Nothing here downloads: configs, weights and a word-level tokenizer are built in place. The
reference forward merges each LoRA delta (W + scaling * B @ A) into a Hugging Face model, an
implementation independent of vLLM's punica path and of our CPU MoE-LoRA patch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

VOCAB = 256
HIDDEN = 64
HEADS, KV_HEADS, HEAD_DIM = 2, 1, 32
INTERMEDIATE = 128
MOE_INTERMEDIATE = 32
NUM_EXPERTS, TOP_K = 4, 2
LAYERS = 2
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model.model.layers"


@dataclass(frozen=True)
class TinyModel:
    path: str
    moe: bool


def _write_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def build_tiny_model(path: str, moe: bool, seed: int = 0) -> TinyModel:
    """Write a randomly initialised tiny checkpoint (float32, head_dim 32) with its tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2,
    )
    if moe:
        config = Qwen3MoeConfig(**common, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                                moe_intermediate_size=MOE_INTERMEDIATE, decoder_sparse_step=1, norm_topk_prob=True)
        model = Qwen3MoeForCausalLM(config)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    model.save_pretrained(path)
    _write_tokenizer(path)
    return TinyModel(path, moe)


def module_shapes(moe: bool) -> dict[str, tuple[int, int]]:
    """(out, in) of every LoRA-able projection of one layer, keyed by its path under the layer."""
    shapes = {
        "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    }
    if moe:
        for expert in range(NUM_EXPERTS):
            shapes[f"mlp.experts.{expert}.gate_proj"] = (MOE_INTERMEDIATE, HIDDEN)
            shapes[f"mlp.experts.{expert}.up_proj"] = (MOE_INTERMEDIATE, HIDDEN)
            shapes[f"mlp.experts.{expert}.down_proj"] = (HIDDEN, MOE_INTERMEDIATE)
    else:
        shapes["mlp.gate_proj"] = (INTERMEDIATE, HIDDEN)
        shapes["mlp.up_proj"] = (INTERMEDIATE, HIDDEN)
        shapes["mlp.down_proj"] = (HIDDEN, INTERMEDIATE)
    return shapes


def make_adapter(moe: bool, rank: int = 4, seed: int = 1, scale: float = 0.3,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A PEFT-named adapter with non-zero A and B for every projection of every layer."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(LAYERS):
        for module, (out_dim, in_dim) in module_shapes(moe).items():
            base = f"{PREFIX}.{layer}.{module}"
            tensors[f"{base}.lora_A.weight"] = (torch.randn(rank, in_dim, generator=generator) * scale).to(dtype)
            tensors[f"{base}.lora_B.weight"] = (torch.randn(out_dim, rank, generator=generator) * scale).to(dtype)
    return tensors


def adapter_config(moe: bool, rank: int = 4, alpha: int = 8) -> dict:
    targets = list(ATTENTION) + list(DENSE_MLP)
    return {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
        "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
    }


def save_peft_dir(path: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return path


def reference_logprobs(model: TinyModel, prompts: list[list[int]], completions: list[list[int]],
                       adapter: dict[str, torch.Tensor] | None, scaling: float) -> list[list[float]]:
    """log p(completion_t | prompt, completion_<t) of each sequence, from HF with the LoRA deltas merged."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    if adapter:
        state = hf.state_dict()
        with torch.no_grad():
            for name, a in adapter.items():
                if ".lora_A." not in name:
                    continue
                module = name[len("base_model.model."):].rsplit(".lora_A.", 1)[0]
                delta = scaling * (adapter[name.replace(".lora_A.", ".lora_B.")].double() @ a.double())
                _merge(state, module, delta)
    out = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = list(prompt) + list(completion)
            logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
            out.append([logprobs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))])
    return out


def _merge(state: dict[str, torch.Tensor], module: str, delta: torch.Tensor) -> None:
    if ".experts." in module:
        head, expert, proj = module.rsplit(".", 2)
        expert = int(expert)
        if proj == "down_proj":
            target = state[f"{head}.down_proj"][expert]
        else:
            fused = state[f"{head}.gate_up_proj"][expert]
            half = fused.shape[0] // 2
            target = fused[:half] if proj == "gate_proj" else fused[half:]
    else:
        target = state[f"{module}.weight"]
    target += delta.to(target.dtype)


def make_megatron_moe_adapter(rank: int = 8, seed: int = 3, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Megatron-named LoRA of the tiny Qwen3-MoE: fused qkv / proj per layer and one grouped expert
    adapter shared by every expert (2-D ``mlp.experts.linear_fc1/2``), as a trainer exports it."""
    generator = torch.Generator().manual_seed(seed)
    qkv_out = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    shapes = {
        "self_attention.linear_qkv": ((rank, HIDDEN), (qkv_out, rank)),
        "self_attention.linear_proj": ((rank, HEADS * HEAD_DIM), (HIDDEN, rank)),
        "mlp.experts.linear_fc1": ((rank, HIDDEN), (2 * MOE_INTERMEDIATE, rank)),
        "mlp.experts.linear_fc2": ((rank, MOE_INTERMEDIATE), (HIDDEN, rank)),
    }
    out = {}
    for layer in range(LAYERS):
        for module, (a_shape, b_shape) in shapes.items():
            head = f"decoder.layers.{layer}.{module}.adapter"
            out[f"{head}.linear_in.weight"] = torch.randn(*a_shape, generator=generator) * scale
            out[f"{head}.linear_out.weight"] = torch.randn(*b_shape, generator=generator) * scale
    return out


def megatron_to_lora_adapter(tensors: dict[str, torch.Tensor], alpha: float = 16) -> object:
    """The export's conversion (``moe_lora_plugins.lora.convert.megatron_to_peft``) for the tiny Qwen3-MoE."""
    from moe_lora_plugins.lora.convert import megatron_to_peft
    from moe_lora_plugins.lora.families import ModelDims

    return megatron_to_peft(tensors, "qwen3_moe", ModelDims(HEADS, KV_HEADS, HEAD_DIM, NUM_EXPERTS), alpha=alpha)


def peft_reference_logprobs(model: TinyModel, adapter_dir: str, prompts: list[list[int]],
                            completions: list[list[int]]) -> list[list[float]]:
    """The same log-probabilities from Hugging Face transformers with the PEFT library's own LoRA layers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    out = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = list(prompt) + list(completion)
            logprobs = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0].double(), dim=-1)
            out.append([logprobs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))])
    return out

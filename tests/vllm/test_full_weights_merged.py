"""Merged weights streamed into a real vLLM engine (CPU) through its own model loader serve exactly what
HF + PEFT's merge_and_unload serves."""

from __future__ import annotations

import os

import pytest
import torch

from moe_lora_plugins.engines.vllm_full import sync_full_weights
from moe_lora_plugins.merge import AdapterTable, merge_weight_stream

pytestmark = pytest.mark.vllm

RANK, ALPHA = 4, 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = [3, 17, 42, 5, 99, 64, 7, 12, 80, 1, 33, 21]


def _tiny_qwen3(path: str) -> torch.nn.Module:
    from transformers import Qwen3ForCausalLM

    from moe_lora_plugins.testing.tiny_models import tiny_qwen3_config

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _adapters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            out.append((f"{name}.lora_A.weight", torch.randn(RANK, module.in_features, generator=g) * 0.1))
            out.append((f"{name}.lora_B.weight", torch.randn(module.out_features, RANK, generator=g) * 0.1))
    return out


def _peft_merged_logprobs(model: torch.nn.Module, adapters: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS)))
    state = {f"base_model.model.{n.replace('.weight', '.default.weight')}": t for n, t in adapters}
    missing = set(state) - set(peft_model.state_dict())
    assert not missing, sorted(missing)[:3]
    peft_model.load_state_dict(state, strict=False)
    return _hf_logprobs(peft_model.merge_and_unload())


def _hf_logprobs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return torch.stack([logprobs[i, PROMPT[i + 1]] for i in range(len(PROMPT) - 1)])


def _vllm_logprobs(llm) -> torch.Tensor:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    [out] = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    values = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], PROMPT[1:], strict=True)]
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    path = str(tmp_path_factory.mktemp("tiny-qwen3"))
    model = _tiny_qwen3(path)
    llm = LLM(model=path, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=64,
              max_num_seqs=2, seed=0)
    return llm, model


def test_the_engine_serves_merged_weights_after_a_chunked_full_weight_sync(engine_and_model):
    llm, model = engine_and_model
    adapters = _adapters(model)
    reference = _peft_merged_logprobs(model, adapters)
    assert torch.allclose(_vllm_logprobs(llm), _hf_logprobs(model), atol=1e-4), "engine does not serve the base first"
    assert not torch.allclose(reference, _hf_logprobs(model), atol=1e-3), "the adapter must change the output"

    merged = merge_weight_stream(model.state_dict().items(), AdapterTable.from_stream(adapters), ALPHA / RANK)
    counts = sync_full_weights(llm, merged, max_bytes=64 * 1024)

    assert counts["chunks"] > 1 and counts["tensors"] == len(model.state_dict())
    served = _vllm_logprobs(llm)
    print(f"max |vLLM - PEFT merge_and_unload| logprob difference: {(served - reference).abs().max():.2e}")
    assert torch.allclose(served, reference, atol=1e-4), (served - reference).abs().max()


def test_a_failing_chunk_closes_the_reload_session_and_the_engine_keeps_serving(engine_and_model):
    llm, model = engine_and_model
    state = list(model.state_dict().items())
    broken = [*state[:3], ("model.layers.0.mlp.no_such_proj.weight", torch.zeros(4, 4)), *state[3:]]
    with pytest.raises(ValueError, match="no_such_proj"):
        sync_full_weights(llm, broken, max_bytes=64 * 1024)
    counts = sync_full_weights(llm, state, max_bytes=64 * 1024)
    assert counts["tensors"] == len(state)
    assert torch.allclose(_vllm_logprobs(llm), _hf_logprobs(model), atol=1e-4)


def _merged_stream(model: torch.nn.Module):
    return merge_weight_stream(model.state_dict().items(), AdapterTable.from_stream(_adapters(model)), ALPHA / RANK)


def test_a_failed_export_audit_leaves_the_engine_serving_exactly_the_previous_weights(engine_and_model):
    from moe_lora_plugins.audit.export_audit import ExportAudit, ExportAuditError, audited

    llm, model = engine_and_model
    before = _vllm_logprobs(llm)  # also fills the prefix cache with KV of the weights served now
    without_layer_1 = (item for item in _merged_stream(model) if ".layers.1." not in item[0])
    with pytest.raises(ExportAuditError, match=r"missing layers: \[1\]"):
        sync_full_weights(llm, audited(without_layer_1, ExportAudit("merged", num_layers=2)), max_bytes=16 * 1024)
    assert torch.equal(_vllm_logprobs(llm), before), "layer 0's merged weights must not be served"


def test_a_chunk_refused_at_commit_leaves_the_engine_serving_exactly_the_previous_weights(engine_and_model):
    llm, model = engine_and_model
    before = _vllm_logprobs(llm)
    stream = [*_merged_stream(model), ("model.layers.1.mlp.no_such_proj.weight", torch.zeros(4, 4))]
    with pytest.raises(ValueError, match="no_such_proj"):
        sync_full_weights(llm, stream, max_bytes=16 * 1024)
    assert torch.equal(_vllm_logprobs(llm), before), "every layer loaded before the bad chunk must be rolled back"
    counts = sync_full_weights(llm, _merged_stream(model), max_bytes=16 * 1024)
    assert counts["tensors"] == len(model.state_dict())
    assert torch.allclose(_vllm_logprobs(llm), _peft_merged_logprobs(model, _adapters(model)), atol=1e-4)

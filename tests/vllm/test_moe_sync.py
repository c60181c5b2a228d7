"""MoE LoRA on vLLM's CPU backend (tiny Qwen3-MoE, in-process engine, LoRA enabled).

The CPU MoE-LoRA patch is checked against Hugging Face transformers with the LoRA deltas merged
into the weights; expert adapters synced over gloo against vLLM's own PEFT-directory loader.
"""

from __future__ import annotations

import pytest
import torch

from .conftest import greedy, max_abs_diff, sync_adapter
from .tiny_models import LAYERS, NUM_EXPERTS, adapter_config, make_adapter, reference_logprobs, save_peft_dir

pytestmark = pytest.mark.vllm

TOLERANCE = 1e-4  # float32 vLLM kernels vs HF eager with merged weights


@pytest.fixture(scope="module")
def engine(moe_engine):
    return moe_engine


def test_moe_base_model_matches_hugging_face(engine, moe_model):
    generated = greedy(engine)
    reference = reference_logprobs(moe_model, [[1, 5, 9, 33, 7, 100, 20], [1, 200, 3, 4, 5]], generated.tokens,
                                   None, 0.0)
    assert max_abs_diff(generated.logprobs, reference) < TOLERANCE


def test_moe_expert_lora_through_the_cpu_patch_matches_hugging_face_with_merged_deltas(engine, moe_model, tmp_path):
    from vllm.lora.request import LoRARequest

    tensors, config = make_adapter(True, seed=5), adapter_config(True)
    path = save_peft_dir(str(tmp_path / "moe-adapter"), tensors, config)
    generated = greedy(engine, LoRARequest("moe-from-disk", 2, path))
    engine.collective_rpc("remove_lora", args=(2,))
    scaling = config["lora_alpha"] / config["r"]
    reference = reference_logprobs(moe_model, [[1, 5, 9, 33, 7, 100, 20], [1, 200, 3, 4, 5]], generated.tokens,
                                   tensors, scaling)
    difference = max_abs_diff(generated.logprobs, reference)
    print(f"MoE + expert LoRA, vLLM CPU vs HF merged: max |dlogprob| = {difference:.2e}")
    assert difference < TOLERANCE
    assert max_abs_diff(generated.logprobs, greedy(engine).logprobs) > 1e-2


@pytest.fixture(scope="module")
def moe_served(engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe-served")
    tensors, config = make_adapter(True, seed=6), adapter_config(True)
    outcome = sync_adapter(engine, tmp, "moe-policy", 1, tensors, config, bucket_bytes=4096)
    assert outcome.error is None, outcome.error
    return {"tensors": tensors, "config": config, "outcome": outcome,
            "dir": save_peft_dir(str(tmp / "peft"), tensors, config)}


def test_synced_moe_adapter_equals_vllms_own_load_of_the_peft_dir(engine, moe_served):
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.integrations.vllm_worker import lora_request

    synced = greedy(engine, lora_request("moe-policy", 1))
    from_disk = greedy(engine, LoRARequest("moe-from-disk", 2, moe_served["dir"]))
    engine.collective_rpc("remove_lora", args=(2,))
    assert synced.logprobs == from_disk.logprobs
    assert moe_served["outcome"].report["buckets"] >= 3


def shared_expert_adapter(seed: int) -> dict[str, torch.Tensor]:
    """Every expert of a layer shares one LoRA (Megatron's shared expert adapter)."""
    tensors = make_adapter(True, seed=seed)
    for name in list(tensors):
        if ".mlp.experts." in name and ".experts.0." not in name:
            expert = name.split(".mlp.experts.")[1].split(".")[0]
            tensors[name] = tensors[name.replace(f".experts.{expert}.", ".experts.0.")]
    return tensors


def test_shared_expert_adapter_travels_once_and_is_expanded_on_the_receiver(engine, tmp_path):
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.integrations.vllm_worker import lora_request

    tensors, config = shared_expert_adapter(seed=8), adapter_config(True)
    outcome = sync_adapter(engine, tmp_path, "moe-shared", 3, tensors, config,
                           sender_options={"compact_shared_experts": True})
    assert outcome.error is None, outcome.error
    expanded_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    expert_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if ".experts." in n)
    true_bytes = expanded_bytes - expert_bytes + expert_bytes // NUM_EXPERTS
    print(f"shared-expert sync: wire {outcome.report['wire_bytes']} B = true {true_bytes} B; "
          f"E-fold expansion would send {expanded_bytes} B")
    assert outcome.report["wire_bytes"] == outcome.wire_bytes == true_bytes
    synced = greedy(engine, lora_request("moe-shared", 3))
    from_disk = greedy(engine, LoRARequest("moe-shared-from-disk", 2,
                                           save_peft_dir(str(tmp_path / "expanded"), tensors, config)))
    engine.collective_rpc("remove_lora", args=(2,))
    engine.collective_rpc("moelora_remove_adapter", args=("moe-shared",))
    assert synced.logprobs == from_disk.logprobs


def test_sync_missing_an_expert_is_refused_and_names_it(engine, moe_served, tmp_path):
    from moe_lora_plugins.integrations.vllm_worker import lora_request

    before = greedy(engine, lora_request("moe-policy", 1))
    missing = f"layers.{LAYERS - 1}.mlp.experts.{NUM_EXPERTS - 1}."
    outcome = sync_adapter(engine, tmp_path, "moe-policy", 1, make_adapter(True, seed=9), adapter_config(True),
                           version=2, sender_options={"drop": [missing]})
    assert outcome.error is not None
    message = str(outcome.error)
    assert f"missing base_model.model.model.{missing}gate_proj.lora_A.weight" in message, message
    assert greedy(engine, lora_request("moe-policy", 1)).logprobs == before.logprobs


def test_a_megatron_adapter_converted_and_sent_by_two_trainer_stages_is_served_like_its_peft_dir(engine, tmp_path):
    """The trainer path end to end: Megatron LoRA (fused qkv, one grouped expert adapter shared by all
    experts) -> the export's converter -> ``send_lora_adapter`` per pipeline stage -> hot swap."""
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.integrations.vllm_worker import lora_request
    from moe_lora_plugins.lora.formats import write_peft_dir

    from .tiny_models import make_megatron_moe_adapter, megatron_to_lora_adapter

    megatron = make_megatron_moe_adapter()
    adapter = megatron_to_lora_adapter(megatron, alpha=16)
    outcome = sync_adapter(engine, tmp_path, "from-megatron", 4, megatron, {}, bucket_bytes=2048,
                           sender_options={"megatron": {"alpha": 16}})
    assert outcome.error is None, outcome.error
    expanded = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
    print(f"Megatron adapter sync: {outcome.report['buckets']} buckets, wire {outcome.report['wire_bytes']} B = "
          f"distinct {adapter.nbytes()} B; the PEFT-named adapter is {expanded} B")
    assert outcome.report["wire_bytes"] == adapter.nbytes() < expanded
    synced = greedy(engine, lora_request("from-megatron", 4))
    from_disk = greedy(engine, LoRARequest("megatron-peft-dir", 2, str(write_peft_dir(adapter, tmp_path / "peft"))))
    engine.collective_rpc("remove_lora", args=(2,))
    engine.collective_rpc("moelora_remove_adapter", args=("from-megatron",))
    assert synced.logprobs == from_disk.logprobs
    assert synced.logprobs != greedy(engine).logprobs


NAN_TENSOR = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"


def _with_one_nan(seed: int) -> dict[str, torch.Tensor]:
    tensors = make_adapter(True, seed=seed)
    tensors[NAN_TENSOR] = tensors[NAN_TENSOR].clone()
    tensors[NAN_TENSOR][3, 1] = float("nan")
    return tensors


def test_a_synced_adapter_holding_one_nan_is_refused_by_name_and_the_previous_one_keeps_serving(
    engine, moe_served, tmp_path
):
    from moe_lora_plugins.integrations.vllm_worker import lora_request

    before, base_before = greedy(engine, lora_request("moe-policy", 1)), greedy(engine)
    outcome = sync_adapter(engine, tmp_path, "moe-policy", 1, _with_one_nan(12), adapter_config(True), version=3,
                           bucket_bytes=4096)
    assert outcome.error is not None
    assert f"{NAN_TENSOR} has 1 non-finite value(s) (first: nan at [3, 1])" in str(outcome.error), str(outcome.error)
    after, base_after = greedy(engine, lora_request("moe-policy", 1)), greedy(engine)
    assert after.logprobs == before.logprobs and base_after.logprobs == base_before.logprobs
    assert all(torch.isfinite(torch.tensor(row)).all() for row in after.logprobs + base_after.logprobs)
    assert engine.collective_rpc("moelora_adapter_status")[0]["moe-policy"]["version"] == 1


def test_a_peft_dir_holding_one_nan_is_refused_by_the_disk_fallback_and_the_previous_one_keeps_serving(
    engine, moe_served, tmp_path
):
    from moe_lora_plugins.integrations.vllm_worker import lora_request

    before = greedy(engine, lora_request("moe-policy", 1))
    path = save_peft_dir(str(tmp_path / "nan-adapter"), _with_one_nan(13), adapter_config(True))
    with pytest.raises(Exception, match=rf"{NAN_TENSOR.replace('.', '[.]')} has 1 non-finite value"):
        engine.collective_rpc("moelora_load_adapter_dir", args=("moe-policy", 1, path, 4))
    assert greedy(engine, lora_request("moe-policy", 1)).logprobs == before.logprobs
    assert engine.collective_rpc("moelora_adapter_status")[0]["moe-policy"]["version"] == 1

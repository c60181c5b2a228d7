"""What a complete adapter must contain, derived from the model and PEFT configs, and the check."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.sync.errors import AdapterValidationError
from moe_lora_plugins.sync.validation import check_adapter, expected_adapter

DENSE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 32, "intermediate_size": 128}
MOE = {**DENSE, "num_local_experts": 4, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
       "mlp_only_layers": [0]}
PEFT = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]}


def complete(expected):
    return {name: torch.zeros(spec.shape, dtype=spec.dtype) for name, spec in expected.items()}


def test_dense_expectation_covers_every_layer_and_projection_with_peft_shapes():
    expected = expected_adapter(DENSE, PEFT, torch.float32)
    assert len(expected) == 2 * 7 * 2
    assert expected["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert expected["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 128)


def test_moe_expectation_has_every_routed_expert_of_moe_layers_only():
    expected = expected_adapter(MOE, PEFT, torch.bfloat16)
    experts = [n for n in expected if ".experts." in n]
    assert len(experts) == 1 * 4 * 3 * 2  # layer 0 is an mlp-only layer
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in expected
    assert expected["base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_A.weight"].shape == (4, 32)


def test_rank_pattern_overrides_the_rank_of_matching_modules():
    expected = expected_adapter(DENSE, {**PEFT, "rank_pattern": {"o_proj": 8}}, torch.float32)
    assert expected["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (8, 64)
    assert expected["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)


def test_a_complete_adapter_passes():
    expected = expected_adapter(MOE, PEFT, torch.float32)
    check_adapter(complete(expected), expected)


def test_the_error_names_the_missing_expert_and_every_other_problem():
    expected = expected_adapter(MOE, PEFT, torch.float32)
    tensors = complete(expected)
    del tensors["base_model.model.model.layers.1.mlp.experts.2.up_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 65)
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"] = torch.zeros(4, 64, dtype=torch.half)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    with pytest.raises(AdapterValidationError) as caught:
        check_adapter(tensors, expected, "adapter 'policy'")
    message = str(caught.value)
    assert len(caught.value.problems) == 4
    assert "missing base_model.model.model.layers.1.mlp.experts.2.up_proj.lora_B.weight (expected shape [32, 4])" in message
    assert "layers.1.self_attn.q_proj.lora_A.weight has shape [4, 65], expected [4, 64]" in message
    assert "has dtype torch.float16, expected torch.float32" in message
    assert "unexpected base_model.model.model.layers.9" in message
    assert message.startswith("adapter 'policy': the adapter was rejected (4 problem(s)); the adapter being served")


def test_a_regex_target_modules_cannot_be_validated():
    with pytest.raises(AdapterValidationError, match="regex"):
        expected_adapter(DENSE, {**PEFT, "target_modules": ".*proj"}, torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_refused_and_the_error_names_the_tensor(bad):
    expected = expected_adapter(MOE, PEFT, torch.float32)
    tensors = complete(expected)
    name = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][5, 2] = bad
    with pytest.raises(AdapterValidationError) as caught:
        check_adapter(tensors, expected, "adapter 'policy'")
    assert caught.value.problems == [
        f"{name} has 1 non-finite value(s) (first: {bad} at [5, 2]); a NaN or inf adapter would poison the engine"
    ]


def test_a_shared_non_finite_tensor_is_named_under_every_name_it_serves():
    expected = expected_adapter(MOE, PEFT, torch.bfloat16)
    tensors = complete(expected)
    shared = torch.zeros(4, 64, dtype=torch.bfloat16)
    shared[0, 0] = float("nan")
    names = [f"base_model.model.model.layers.1.mlp.experts.{e}.up_proj.lora_A.weight" for e in range(4)]
    tensors.update(dict.fromkeys(names, shared))
    with pytest.raises(AdapterValidationError) as caught:
        check_adapter(tensors, expected)
    assert [p.split(" ")[0] for p in caught.value.problems] == names


@pytest.mark.parametrize("where", ["first", "middle", "last", "between"])
def test_views_of_one_payload_are_checked_together_and_a_non_finite_one_is_still_named(where):
    """Received tensors are views of one bucket payload: one scan certifies them, and a NaN anywhere (in a
    tensor, or in bytes between two tensors that belong to none) falls back to naming exactly the bad ones."""
    from moe_lora_plugins.sync.validation import non_finite_problems

    payload = torch.zeros(4 * 16 + 3, dtype=torch.float32)
    tensors = {f"t{i}": payload[i * 16 + (3 if i == 3 else 0):i * 16 + 16 + (3 if i == 3 else 0)].view(4, 4)
               for i in range(4)}
    assert non_finite_problems(tensors) == []
    index = {"first": 0, "middle": 20, "last": 4 * 16 + 2, "between": 49}[where]  # 48..50: in no view
    payload[index] = float("nan")
    problems = non_finite_problems(tensors)
    named = {"first": ["t0"], "middle": ["t1"], "last": ["t3"], "between": []}[where]
    assert [p.split(" ")[0] for p in problems] == named
    assert all("1 non-finite value(s)" in p for p in problems)


def test_a_received_adapter_with_a_nan_names_it_and_a_clean_one_passes():
    """The same through the receiver's own assembly (tensors as views of one payload)."""
    from moe_lora_plugins.sync.assembly import AdapterAssembler
    from moe_lora_plugins.sync.protocol import AdapterPiece, BucketHeader, Manifest
    from moe_lora_plugins.sync.staging import bucket_layout, pack_payload
    from moe_lora_plugins.sync.validation import non_finite_problems

    sent = {f"base_model.model.model.layers.0.self_attn.{p}.lora_A.weight": torch.randn(4, 8) for p in "qkv"}
    for bad in (None, "base_model.model.model.layers.0.self_attn.k.lora_A.weight"):
        pieces = [AdapterPiece(n, t) for n, t in sent.items()]
        entries, nbytes = bucket_layout(pieces)
        payload = pack_payload(pieces, entries, nbytes, "cpu")
        assembler = AdapterAssembler(1, 0)
        assembler.add_bucket(BucketHeader(0, 0, 0, False, 0, nbytes), Manifest(entries), payload)
        assembler.add_bucket(BucketHeader(0, 1, 0, True, 0, 0), Manifest([], {"buckets": 1, "payload_bytes": nbytes}),
                             torch.empty(0, dtype=torch.uint8))
        received = assembler.finish().tensors
        if bad is not None:
            received[bad][1, 2] = float("inf")
        problems = non_finite_problems(received)
        assert [p.split(" ")[0] for p in problems] == ([] if bad is None else [bad])

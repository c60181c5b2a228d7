"""merge_weight_stream: adapters folded into a stream of base weights, names and arity preserved."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.merge import (
    AdapterTable,
    MergeStreamError,
    merge_weight_stream,
    merged_weight,
    module_key,
)

PREFIX = "model.layers.0"


def _adapter(out_f: int, in_f: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)


def _model():
    """A base stream with two LoRA-wrapped weights (PEFT base_layer names) and one plain weight."""
    q = torch.randn(8, 6)
    down = torch.randn(6, 4)
    norm = torch.randn(6)
    base = [
        (f"{PREFIX}.self_attn.q_proj.base_layer.weight", q),
        (f"{PREFIX}.input_layernorm.weight", norm),
        (f"{PREFIX}.mlp.experts.3.down_proj.base_layer.weight", down),
    ]
    qa, qb = _adapter(8, 6, 2, seed=1)
    da, db = _adapter(6, 4, 2, seed=2)
    adapters = [
        (f"{PREFIX}.self_attn.q_proj.lora_A.weight", qa),
        (f"{PREFIX}.self_attn.q_proj.lora_B.weight", qb),
        (f"{PREFIX}.mlp.experts.3.down_proj.lora_A.weight", da),
        (f"{PREFIX}.mlp.experts.3.down_proj.lora_B.weight", db),
    ]
    return base, adapters


def test_wrapped_weights_leave_merged_under_their_plain_names_and_others_pass_through():
    base, adapters = _model()
    out = dict(merge_weight_stream(base, AdapterTable.from_stream(adapters), scale=2.0))
    assert list(out) == [
        f"{PREFIX}.self_attn.q_proj.weight",
        f"{PREFIX}.input_layernorm.weight",
        f"{PREFIX}.mlp.experts.3.down_proj.weight",
    ]
    a = dict(adapters)
    assert torch.equal(
        out[f"{PREFIX}.self_attn.q_proj.weight"],
        merged_weight(base[0][1], a[f"{PREFIX}.self_attn.q_proj.lora_A.weight"], a[f"{PREFIX}.self_attn.q_proj.lora_B.weight"], 2.0),
    )
    assert out[f"{PREFIX}.input_layernorm.weight"] is base[1][1]


def test_three_tuples_of_the_slime_fork_keep_their_megatron_name():
    base, adapters = _model()
    triples = [(name, tensor, f"megatron.{i}") for i, (name, tensor) in enumerate(base)]
    out = list(merge_weight_stream(triples, AdapterTable.from_stream(adapters), scale=1.0))
    assert [len(item) for item in out] == [3, 3, 3]
    assert [item[2] for item in out] == ["megatron.0", "megatron.1", "megatron.2"]


def test_the_stream_is_lazy_and_releases_each_adapter_once_used():
    base, adapters = _model()
    table = AdapterTable.from_stream(adapters)
    stream = merge_weight_stream(iter(base), table, scale=1.0)
    assert len(table) == 2
    next(stream)
    assert len(table) == 1


def test_out_dtype_casts_merged_and_untouched_weights_alike():
    base, adapters = _model()
    out = dict(merge_weight_stream(base, AdapterTable.from_stream(adapters), 1.0, out_dtype=torch.bfloat16))
    assert {t.dtype for t in out.values()} == {torch.bfloat16}


def test_a_wrapped_weight_without_its_adapter_fails_instead_of_serving_the_unmerged_weight():
    base, adapters = _model()
    table = AdapterTable.from_stream(adapters[2:])
    with pytest.raises(MergeStreamError, match=r"q_proj.base_layer.weight is a LoRA-wrapped weight"):
        list(merge_weight_stream(base, table, 1.0))


def test_adapters_whose_weight_never_streams_are_reported():
    base, adapters = _model()
    with pytest.raises(MergeStreamError, match=r"1 adapters were exported for weights that never streamed"):
        list(merge_weight_stream(base[:2], AdapterTable.from_stream(adapters), 1.0))


def test_one_name_with_two_different_values_is_the_ep_naming_bug_and_is_refused():
    _, adapters = _model()
    name, tensor = adapters[0]
    with pytest.raises(MergeStreamError, match="EP naming bug"):
        AdapterTable.from_stream([adapters[0], (name, tensor + 1)])


def test_the_same_adapter_from_two_ranks_is_accepted():
    _, adapters = _model()
    table = AdapterTable.from_stream(adapters + [(adapters[0][0], adapters[0][1].clone())])
    assert len(table) == 2


def test_a_half_adapter_is_refused_when_its_weight_arrives():
    base, adapters = _model()
    table = AdapterTable.from_stream(adapters[:1] + adapters[2:])
    with pytest.raises(MergeStreamError, match=r"q_proj has no \.lora_B\.weight"):
        list(merge_weight_stream(base, table, 1.0))


def test_non_lora_names_in_the_adapter_stream_are_refused():
    with pytest.raises(MergeStreamError, match="neither a .lora_A.weight nor a .lora_B.weight"):
        AdapterTable.from_stream([("model.embed_tokens.weight", torch.zeros(2))])


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("m.layers.0.self_attn.q_proj.weight", "m.layers.0.self_attn.q_proj"),
        ("m.layers.0.self_attn.q_proj.base_layer.weight", "m.layers.0.self_attn.q_proj"),
        ("m.layers.0.self_attn.q_proj.lora_B.weight", "m.layers.0.self_attn.q_proj"),
        ("m.layers.0.mlp.experts.base_layer.gate_up_proj", "m.layers.0.mlp.experts.gate_up_proj"),
        ("m.layers.0.mlp.experts.gate_up_proj.lora_A.weight", "m.layers.0.mlp.experts.gate_up_proj"),
    ],
)
def test_module_key_pairs_base_weights_with_their_lora_factors(name, key):
    assert module_key(name) == key

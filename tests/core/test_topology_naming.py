"""Local -> global numbering of Megatron parameter names, for every expert family."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_lora_plugins.topology.naming import (
    ExpertFamily,
    expert_owner,
    global_expert_index,
    globalize_megatron_name,
    hf_expert_index,
    parse_megatron_name,
)


@st.composite
def ep_layouts(draw):
    ep_size = draw(st.integers(1, 16))
    per_rank = draw(st.integers(1, 16))
    ep_rank = draw(st.integers(0, ep_size - 1))
    local = draw(st.integers(0, per_rank - 1))
    return ep_size, per_rank * ep_size, ep_rank, local


@given(ep_layouts())
def test_expert_owner_inverts_global_expert_index(layout):
    ep_size, num_experts, ep_rank, local = layout
    assert expert_owner(global_expert_index(local, ep_rank, ep_size, num_experts), ep_size, num_experts) == (
        ep_rank,
        local,
    )


@given(st.integers(1, 8), st.integers(1, 8))
def test_global_expert_indices_cover_every_expert_once(ep_size, per_rank):
    num_experts = ep_size * per_rank
    indices = [global_expert_index(le, r, ep_size, num_experts) for r in range(ep_size) for le in range(per_rank)]
    assert sorted(indices) == list(range(num_experts))


def test_uneven_expert_split_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match="6 experts cannot be split evenly over expert-parallel size 4"):
        global_expert_index(0, 0, 4, 6)


@given(ep_layouts(), st.integers(0, 95), st.sampled_from(["linear_fc1", "linear_fc2"]), st.booleans())
def test_sequential_expert_weights_and_their_adapters_get_the_same_global_number(layout, layer, fc, adapter):
    ep_size, num_experts, ep_rank, local = layout
    leaf = f"{fc}.adapter.linear_in.weight" if adapter else f"{fc}.weight"
    name = f"decoder.layers.3.mlp.experts.local_experts.{local}.{leaf}"
    expected = global_expert_index(local, ep_rank, ep_size, num_experts)
    got = globalize_megatron_name(
        name, global_layer=layer, ep_rank=ep_rank, ep_size=ep_size, num_experts=num_experts
    )
    assert got == f"decoder.layers.{layer}.mlp.experts.local_experts.{expected}.{leaf}"


@given(ep_layouts(), st.sampled_from(["weight", "bias"]))
def test_grouped_expert_weight_suffix_is_renumbered(layout, kind):
    ep_size, num_experts, ep_rank, local = layout
    name = f"decoder.layers.0.mlp.experts.linear_fc2.{kind}{local}"
    got = globalize_megatron_name(name, global_layer=None, ep_rank=ep_rank, ep_size=ep_size, num_experts=num_experts)
    assert got == f"decoder.layers.0.mlp.experts.linear_fc2.{kind}{global_expert_index(local, ep_rank, ep_size, num_experts)}"


@pytest.mark.parametrize(
    "name",
    [
        "decoder.layers.1.mlp.experts.linear_fc1.adapter.linear_in.weight",  # shared 2-D or per-expert 3-D
        "decoder.layers.1.mlp.experts.linear_fc2.adapter.linear_out.weight",
        "decoder.layers.1.mlp.experts.weight1",  # legacy GroupedMLP: fc1 of every local expert
        "decoder.layers.1.mlp.experts.weight2",
        "decoder.layers.1.mlp.router.weight",
        "decoder.layers.1.self_attention.linear_qkv.adapter.linear_out.weight",
        "embedding.word_embeddings.weight",
    ],
)
def test_names_without_an_expert_number_keep_it_under_expert_parallelism(name):
    got = globalize_megatron_name(name, global_layer=None, ep_rank=1, ep_size=2, num_experts=8)
    assert got == name


def test_legacy_grouped_weight_digit_is_not_read_as_an_expert_number():
    ref = parse_megatron_name("decoder.layers.2.mlp.experts.weight1")
    assert (ref.family, ref.expert, ref.layer) == (ExpertFamily.LEGACY_GROUPED, None, 2)


def test_families_are_told_apart():
    assert parse_megatron_name("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight").family is (
        ExpertFamily.SEQUENTIAL
    )
    assert parse_megatron_name("decoder.layers.0.mlp.experts.linear_fc1.weight3").family is ExpertFamily.GROUPED
    assert parse_megatron_name("decoder.layers.0.mlp.experts.linear_fc1.adapter.linear_in.weight").family is (
        ExpertFamily.GROUPED_ADAPTER
    )
    assert parse_megatron_name("decoder.layers.0.mlp.linear_fc1.weight").family is ExpertFamily.NONE


@given(st.integers(0, 200), st.integers(0, 200))
def test_layer_renumbering_does_not_depend_on_expert_parallelism(local_layer, global_layer):
    # Upstream PR #4592 binds the layer module only when PP > 1; our EP step never needs it.
    name = f"decoder.layers.{local_layer}.mlp.experts.local_experts.1.linear_fc1.weight"
    with_ep = globalize_megatron_name(name, global_layer=None, ep_rank=1, ep_size=2, num_experts=4)
    assert with_ep == f"decoder.layers.{local_layer}.mlp.experts.local_experts.3.linear_fc1.weight"
    both = globalize_megatron_name(name, global_layer=global_layer, ep_rank=1, ep_size=2, num_experts=4)
    assert both == f"decoder.layers.{global_layer}.mlp.experts.local_experts.3.linear_fc1.weight"


def test_hf_expert_index_reads_per_expert_names_only():
    assert hf_expert_index("model.layers.0.mlp.experts.17.gate_proj.lora_A.weight") == 17
    assert hf_expert_index("model.layers.0.mlp.experts.gate_up_proj") is None


def test_global_param_name_reads_layer_and_expert_numbers_from_the_live_modules():
    from types import SimpleNamespace

    from moe_lora_plugins.topology.naming import global_param_name

    # PP stage 1 of 2 holding global layers 2 and 3; EP rank 1 of 2 holding global experts 4..7.
    layers = [
        SimpleNamespace(layer_number=3, mlp=SimpleNamespace(local_expert_indices=[4, 5, 6, 7])),
        SimpleNamespace(layer_number=4, mlp=SimpleNamespace(local_expert_indices=[4, 5, 6, 7])),
    ]
    model = SimpleNamespace(decoder=SimpleNamespace(layers=layers))
    chunk = SimpleNamespace(module=SimpleNamespace(module=model))  # DDP / Float16Module wrappers
    local = "module.module.decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.adapter.linear_in.weight"
    assert global_param_name(chunk, local) == (
        "decoder.layers.3.mlp.experts.local_experts.6.linear_fc1.adapter.linear_in.weight"
    )
    assert global_param_name(chunk, "decoder.layers.0.self_attention.linear_qkv.weight") == (
        "decoder.layers.2.self_attention.linear_qkv.weight"
    )
    assert global_param_name(chunk, "embedding.word_embeddings.weight") == "embedding.word_embeddings.weight"

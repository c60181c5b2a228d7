"""Which layers of a Qwen3-MoE-style model are dense: the HF rule, Megatron's moe_layer_freq, and back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_lora_plugins.topology.moe_layers import (
    has_dense_layers,
    hf_moe_layer_pattern,
    hf_sparse_fields,
    megatron_moe_layer_pattern,
)


def _hf_rule(layer: int, num_experts: int, step: int, mlp_only_layers: list[int]) -> bool:
    # Written as transformers' Qwen3MoeDecoderLayer and vLLM's Qwen3MoeDecoderLayer decide it.
    return (layer not in mlp_only_layers) and (num_experts > 0 and (layer + 1) % step == 0)


def test_every_layer_is_moe_by_default():
    assert hf_moe_layer_pattern(4, 8) == [1, 1, 1, 1]
    assert not has_dense_layers(hf_moe_layer_pattern(4, 8, 1, []))
    assert hf_moe_layer_pattern(4, 8, None, None) == [1, 1, 1, 1]


def test_mlp_only_layers_are_dense():
    assert hf_moe_layer_pattern(4, 8, 1, [0]) == [0, 1, 1, 1]
    assert hf_moe_layer_pattern(4, 8, 1, [0, 3, 17]) == [0, 1, 1, 0]


def test_sparse_step_counts_from_one_unlike_megatron_freq():
    assert hf_moe_layer_pattern(6, 8, 2) == [0, 1, 0, 1, 0, 1]
    assert megatron_moe_layer_pattern(2, 6) == [1, 0, 1, 0, 1, 0]


def test_no_experts_means_every_layer_dense():
    assert hf_moe_layer_pattern(3, 0, 1, []) == [0, 0, 0]


def test_bad_sparse_step_is_refused_with_the_value():
    with pytest.raises(ValueError, match="decoder_sparse_step must be >= 1.*got 0"):
        hf_moe_layer_pattern(4, 8, 0)


def test_megatron_list_must_cover_every_layer():
    assert megatron_moe_layer_pattern([0, 1, 1], 3) == [0, 1, 1]
    with pytest.raises(ValueError, match="each of the 4 layers"):
        megatron_moe_layer_pattern([0, 1, 1], 4)
    with pytest.raises(ValueError, match="0 \\(dense\\) or 1"):
        megatron_moe_layer_pattern([0, 2, 1], 3)


def test_hf_fields_keep_a_sparse_step_and_list_only_extra_dense_layers():
    assert hf_sparse_fields([1, 1, 1, 1]) == (1, [])
    assert hf_sparse_fields([0, 1, 1, 1]) == (1, [0])
    assert hf_sparse_fields([0, 1, 0, 1, 0, 1]) == (2, [])
    assert hf_sparse_fields([0, 0, 0, 1, 0, 0]) == (4, [])
    assert hf_sparse_fields([0, 0, 0]) == (1, [0, 1, 2])


@given(
    num_layers=st.integers(0, 12),
    num_experts=st.sampled_from([0, 1, 4]),
    step=st.integers(1, 5),
    mlp_only_layers=st.lists(st.integers(0, 14), max_size=6),
)
def test_pattern_follows_the_hf_rule_and_survives_the_round_trip(num_layers, num_experts, step, mlp_only_layers):
    pattern = hf_moe_layer_pattern(num_layers, num_experts, step, mlp_only_layers)
    assert pattern == [int(_hf_rule(i, num_experts, step, mlp_only_layers)) for i in range(num_layers)]
    back_step, back_dense = hf_sparse_fields(pattern)
    assert hf_moe_layer_pattern(num_layers, 1, back_step, back_dense) == pattern or num_experts == 0
    assert megatron_moe_layer_pattern(pattern, num_layers) == pattern

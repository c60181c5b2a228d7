"""Fused gate/up fc1 tensors gathered over (expert-)TP shards split into the right gate and up."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_lora_plugins.topology.shards import merge_fused_gate_up_shards, split_fused_gate_up


def _megatron_gathered(gate: torch.Tensor, up: torch.Tensor, tp: int) -> torch.Tensor:
    """What Megatron's column-parallel fc1 holds across ``tp`` shards, concatenated: [g_i; u_i] per shard."""
    shards = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
    return torch.cat(shards)


@given(st.integers(1, 8), st.integers(1, 6), st.integers(1, 5))
def test_split_recovers_gate_and_up_from_any_shard_count(tp, rows_per_shard, cols):
    gate = torch.arange(tp * rows_per_shard * cols, dtype=torch.float32).reshape(-1, cols)
    up = -1 - gate
    got_gate, got_up = split_fused_gate_up(_megatron_gathered(gate, up, tp), tp)
    assert torch.equal(got_gate, gate) and torch.equal(got_up, up)


@given(st.integers(1, 8), st.integers(1, 6))
def test_merge_is_the_inverse_of_split(tp, rows_per_shard):
    fused = torch.randn(2 * tp * rows_per_shard, 3)
    assert torch.equal(merge_fused_gate_up_shards(*split_fused_gate_up(fused, tp), tp), fused)


def test_split_with_tp_1_is_a_plain_halving():
    fused = torch.arange(8.0).reshape(4, 2)
    gate, up = split_fused_gate_up(fused, 1)
    assert torch.equal(gate, fused[:2]) and torch.equal(up, fused[2:])


def test_ignoring_the_shards_mixes_gate_and_up_rows():
    gate, up = torch.zeros(4, 1), torch.ones(4, 1)
    naive_gate, _ = torch.chunk(_megatron_gathered(gate, up, 2), 2)
    assert not torch.equal(naive_gate, gate)


def test_indivisible_rows_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="6 rows along dim 0 .* over 2 tensor-parallel shards"):
        split_fused_gate_up(torch.zeros(6, 2), 2)

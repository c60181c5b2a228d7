"""The batched expert deltas and the one-kernel merge: bitwise the per-expert float32 formula (the one
Megatron-Bridge 0.6.2 uses) on this CPU, in float32 and bfloat16, and clear errors on bad input.
The comparison with Megatron-Bridge's own ``_merge_single_adapter_weight`` is in
tests/megatron/test_batched_merge.py; the GPU check is benchmarks/merge_bitwise_gpu.py."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.merge import merged_weight
from moe_lora_plugins.merge.batched import (
    batched_deltas,
    deltas_match_per_expert,
    experts_per_block,
    merge_expert,
    per_expert_delta,
)
from moe_lora_plugins.merge.math import MergeShapeError


def _factors(experts: int, out_f: int, in_f: int, rank: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = [(torch.randn(rank, in_f, generator=gen) * 0.05).to(dtype) for _ in range(experts)]
    b = [(torch.randn(out_f, rank, generator=gen) * 0.05).to(dtype) for _ in range(experts)]
    bases = [torch.randn(out_f, in_f, generator=gen).to(dtype) for _ in range(experts)]
    return a, b, bases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts", [1, 5, 16])
def test_batched_deltas_are_bitwise_the_per_expert_formula(dtype, experts):
    a, b, _ = _factors(experts, 48, 80, 8, dtype)
    scale = 32 / 16
    deltas = batched_deltas(a, b, scale)
    assert deltas.dtype == torch.float32 and deltas.shape == (experts, 48, 80)
    for e in range(experts):
        expected = scale * (b[e].to(torch.float32) @ a[e].to(torch.float32))
        assert torch.equal(deltas[e], expected), e
    assert deltas_match_per_expert(deltas, a, b, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_expert_is_bitwise_upcast_add_and_cast_back(dtype):
    a, b, bases = _factors(6, 32, 64, 4, dtype, seed=3)
    scale = 8 / 4
    deltas = batched_deltas(a, b, scale)
    for e in range(6):
        merged = merge_expert(bases[e], deltas[e])
        reference = (bases[e].float() + per_expert_delta(a[e], b[e], scale, bases[e].device)).to(dtype)
        assert merged.dtype == dtype and torch.equal(merged, reference), e
        # and equal to the suite's one-tensor merge (merge/math.py), which follows the same arithmetic
        assert torch.equal(merged, merged_weight(bases[e], a[e], b[e], scale)), e


def test_merge_expert_leaves_the_base_untouched_and_returns_a_new_tensor():
    a, b, bases = _factors(1, 16, 16, 2, torch.bfloat16)
    before = bases[0].clone()
    merged = merge_expert(bases[0], batched_deltas(a, b, 1.5)[0])
    assert torch.equal(bases[0], before) and merged.data_ptr() != bases[0].data_ptr()


def test_a_changed_delta_is_detected_by_the_per_expert_check():
    a, b, _ = _factors(4, 16, 24, 4, torch.bfloat16)
    deltas = batched_deltas(a, b, 2.0)
    deltas[2, 0, 0] = torch.nextafter(deltas[2, 0, 0], torch.tensor(float("inf")))
    assert not deltas_match_per_expert(deltas, a, b, 2.0)


def test_a_batched_delta_of_mismatched_factors_is_refused_with_the_shapes():
    a, b, _ = _factors(2, 16, 24, 4, torch.float32)
    with pytest.raises(MergeShapeError, match="same factor shapes"):
        batched_deltas([a[0], a[1][:, :20]], b, 1.0)
    with pytest.raises(MergeShapeError, match="one A and one B per expert"):
        batched_deltas(a, b[:1], 1.0)
    with pytest.raises(MergeShapeError, match="same rank"):
        batched_deltas([torch.zeros(4, 24)], [torch.zeros(16, 3)], 1.0)
    with pytest.raises(MergeShapeError, match="float32 delta of the weight's shape"):
        merge_expert(torch.zeros(16, 24, dtype=torch.bfloat16), torch.zeros(16, 23))


def test_experts_per_block_fits_the_budget():
    # anchor shapes: gate+up (2 x 768 x 2048) and down (2048 x 768) in 128 MiB
    assert experts_per_block(768, 2048, 2, 128 << 20) == 10
    assert experts_per_block(2048, 768, 1, 128 << 20) == 21
    assert experts_per_block(4096, 4096, 2, 1 << 20) == 1
    with pytest.raises(MergeShapeError, match="positive sizes"):
        experts_per_block(0, 16, 1, 1 << 20)

"""merged_weight: W + scale * B @ A in float32, cast to the export dtype, for dense and expert weights."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lora_plugins.merge import MergeShapeError, expert_factor, fused_row_blocks, lora_scale, merged_weight


def _factors(out_f: int, in_f: int, rank: int, dtype: torch.dtype, seed: int, experts: int | None = None):
    g = torch.Generator().manual_seed(seed)
    lead = () if experts is None else (experts,)
    base = torch.randn(*lead, out_f, in_f, generator=g).to(dtype)
    a = torch.randn(*lead, rank, in_f, generator=g).to(dtype)
    b = torch.randn(*lead, out_f, rank, generator=g).to(dtype)
    return base, a, b


def _fp32_rounding_bound(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Worst-case float32 error of a rank-r dot product, a scaling and an addition (elementwise)."""
    rank = a.shape[-2]
    eps = torch.finfo(torch.float32).eps
    magnitude = abs(scale) * (b.double().abs() @ a.double().abs())
    return eps * ((rank + 2) * magnitude + base.double().abs())


@settings(max_examples=40, deadline=None)
@given(
    out_f=st.integers(1, 24),
    in_f=st.integers(1, 24),
    rank=st.integers(1, 8),
    alpha=st.floats(0.5, 64.0),
    seed=st.integers(0, 2**16),
)
def test_fp32_merge_matches_the_float64_formula_within_fp32_rounding(out_f, in_f, rank, alpha, seed):
    base, a, b = _factors(out_f, in_f, rank, torch.float32, seed)
    scale = alpha / rank
    merged = merged_weight(base, a, b, scale)
    reference = base.double() + scale * (b.double() @ a.double())
    assert merged.dtype == torch.float32
    assert torch.all((merged.double() - reference).abs() <= _fp32_rounding_bound(base, a, b, scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(48, 40), (600, 4096)], ids=["one-block", "several-blocks"])
def test_result_is_bitwise_the_megatron_bridge_formula_fp32_merge_then_cast(dtype, shape):
    base, a, b = _factors(*shape, 8, dtype, seed=3)
    scale = 16 / 8
    upstream_formula = (base.float() + scale * (b.float() @ a.float())).to(dtype)
    merged = merged_weight(base, a, b, scale)
    assert merged.dtype == dtype
    assert torch.equal(merged, upstream_formula)


def test_bf16_merge_rounds_once_from_the_float64_value():
    base, a, b = _factors(32, 32, 4, torch.bfloat16, seed=5)
    scale = 0.5
    merged = merged_weight(base, a, b, scale)
    exact = base.double() + scale * (b.double() @ a.double())
    # one bf16 rounding of a float32 value: within half a bf16 ulp plus the float32 error
    bf16_half_ulp = exact.abs() * 2.0**-8
    assert torch.all((merged.double() - exact).abs() <= bf16_half_ulp + _fp32_rounding_bound(base, a, b, scale))


def test_out_dtype_overrides_the_base_dtype():
    base, a, b = _factors(8, 8, 2, torch.float32, seed=1)
    merged = merged_weight(base, a, b, 1.0, out_dtype=torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (base + b @ a).to(torch.bfloat16))


def test_inputs_are_never_modified():
    base, a, b = _factors(16, 12, 4, torch.bfloat16, seed=7)
    snapshots = [t.clone() for t in (base, a, b)]
    versions = [t._version for t in (base, a, b)]
    merged_weight(base, a, b, 2.0)
    merged_weight(base.float(), a.float(), b.float(), 2.0)
    assert all(torch.equal(t, s) for t, s in zip((base, a, b), snapshots, strict=True))
    assert [t._version for t in (base, a, b)] == versions


def test_fp32_result_never_aliases_the_base():
    base, a, b = _factors(4, 4, 2, torch.float32, seed=2)
    merged = merged_weight(base, a, b, 0.0)
    assert merged.data_ptr() != base.data_ptr()
    assert torch.equal(merged, base)


def test_packed_experts_with_per_expert_adapters_merge_each_expert_with_its_own_factors():
    base, a, b = _factors(6, 5, 3, torch.float32, seed=11, experts=4)
    merged = merged_weight(base, a, b, 1.5)
    for e in range(4):
        assert torch.equal(merged[e], merged_weight(base[e], a[e], b[e], 1.5))


def test_packed_experts_with_a_shared_adapter_add_the_same_delta_to_every_expert():
    base, _, _ = _factors(6, 5, 3, torch.float32, seed=12, experts=3)
    _, a, b = _factors(6, 5, 3, torch.float32, seed=13)
    merged = merged_weight(base, a, b, 2.0)
    for e in range(3):
        assert torch.equal(merged[e], merged_weight(base[e], a, b, 2.0))


def test_shared_outer_adapter_with_per_expert_b_and_shared_a():
    base, _, b = _factors(6, 5, 3, torch.float32, seed=14, experts=2)
    _, a, _ = _factors(6, 5, 3, torch.float32, seed=15)
    merged = merged_weight(base, a, b, 1.0)
    for e in range(2):
        assert torch.equal(merged[e], merged_weight(base[e], a, b[e], 1.0))


def test_expert_factor_selects_a_per_expert_slice_and_passes_a_shared_factor_through():
    per_expert = torch.arange(24.0).reshape(3, 2, 4)
    shared = torch.ones(2, 4)
    assert torch.equal(expert_factor(per_expert, 2), per_expert[2])
    assert expert_factor(shared, 5) is shared
    with pytest.raises(MergeShapeError, match="expert 3 is outside the adapter's 3 experts"):
        expert_factor(per_expert, 3)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_fused_gate_up_b_splits_into_the_hf_gate_and_up_rows_for_any_shard_count(shards):
    ffn, rank = 8, 3
    gate_b, up_b = torch.randn(ffn, rank), torch.randn(ffn, rank)
    # what a gather of `shards` column-parallel fc1 shards looks like: [g0; u0; g1; u1; ...]
    fused = torch.cat(
        [torch.cat([g, u]) for g, u in zip(gate_b.chunk(shards), up_b.chunk(shards), strict=True)]
    )
    gate, up = fused_row_blocks(fused, [ffn, ffn], shards)
    assert torch.equal(gate, gate_b)
    assert torch.equal(up, up_b)


def test_fused_split_merges_like_merging_the_fused_weight_and_splitting_after():
    ffn, hidden, rank = 6, 5, 2
    w_gate, w_up = torch.randn(ffn, hidden), torch.randn(ffn, hidden)
    a, b = torch.randn(rank, hidden), torch.randn(2 * ffn, rank)
    fused_merged = merged_weight(torch.cat([w_gate, w_up]), a, b, 2.0)
    gate_b, up_b = fused_row_blocks(b, [ffn, ffn])
    assert torch.equal(merged_weight(w_gate, a, gate_b, 2.0), fused_merged[:ffn])
    assert torch.equal(merged_weight(w_up, a, up_b, 2.0), fused_merged[ffn:])


def test_fused_split_rejects_rows_that_do_not_add_up():
    with pytest.raises(MergeShapeError, match=r"fused B has 10 rows but the projections \[4, 4\] add up to 8"):
        fused_row_blocks(torch.zeros(10, 2), [4, 4])
    with pytest.raises(MergeShapeError, match="do not divide into 3 shards"):
        fused_row_blocks(torch.zeros(8, 2), [4, 4], shards=3)


@pytest.mark.parametrize(
    ("base_shape", "a_shape", "b_shape", "message"),
    [
        ((8, 6), (2, 5), (8, 2), "A has 5 input features, the weight 6"),
        ((8, 6), (2, 6), (7, 2), "B has 7 output features, the weight 8"),
        ((8, 6), (2, 6), (8, 3), "A has rank 2, B rank 3"),
        ((3, 8, 6), (4, 2, 6), (3, 8, 2), r"the expert dimensions differ \(\[3, 4\]\)"),
        ((8, 6), (3, 2, 6), (3, 8, 2), "a 2-D weight cannot take a 3-D"),
    ],
)
def test_mismatched_shapes_are_refused_with_the_shapes_named(base_shape, a_shape, b_shape, message):
    with pytest.raises(MergeShapeError, match=message) as info:
        merged_weight(torch.zeros(base_shape), torch.zeros(a_shape), torch.zeros(b_shape), 1.0, name="layers.0.q_proj")
    assert "layers.0.q_proj" in str(info.value)


def test_lora_scale_is_alpha_over_rank_and_refuses_rank_zero():
    assert lora_scale(32, 16) == 2.0
    with pytest.raises(MergeShapeError, match="rank=0"):
        lora_scale(32, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def _bf16_merge_peak(_: int) -> tuple[int, int]:
    """In a fresh process (a long pytest process's resident size moves for unrelated reasons)."""
    from moe_lora_plugins.testing.merge_memory import malloc_returns_memory_at_once, peak_during

    torch.set_num_threads(1)
    malloc_returns_memory_at_once()
    base, a, b = _factors(3072, 2048, 16, torch.bfloat16, seed=21)
    merged_weight(base, a, b, 2.0)  # first call: the BLAS library allocates its lasting workspace
    kept = []
    return peak_during(lambda: kept.append(merged_weight(base, a, b, 2.0))), base.numel() * 4


def test_merging_a_bf16_weight_needs_one_float32_copy_plus_the_result_not_four():
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peak, fp32_bytes = pool.map(_bf16_merge_peak, [0])[0]
    # float32 working buffer + bf16 result + one 4 MiB promotion block; the upstream formula needs ~3x fp32
    assert peak <= fp32_bytes + fp32_bytes // 2 + 6 * 2**20, peak

"""The batch-invariant ops: a row's result never depends on the other rows, their count, the thread count,
or (for attention) on how many masked keys follow — checked bitwise against the row computed alone."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.onpolicy import ops


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", [1, 3, 8, 13, 64, 100])
def test_tree_sum_ignores_trailing_zeros_of_any_length(n: int) -> None:
    x = torch.randn(5, n, generator=_gen(n))
    padded = torch.cat([x, torch.zeros(5, 3 * n + 7)], dim=1)
    assert torch.equal(ops.tree_sum(x), ops.tree_sum(padded))


def test_tree_sum_is_close_to_torch_sum() -> None:
    x = torch.randn(7, 333, generator=_gen(1), dtype=torch.float64)
    assert torch.allclose(ops.tree_sum(x), x.sum(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [2, 7, 16, 33])
def test_linear_row_alone_equals_row_in_batch(dtype: torch.dtype, batch: int) -> None:
    w = torch.randn(48, 64, generator=_gen(2)).to(dtype)
    x = torch.randn(batch, 64, generator=_gen(3)).to(dtype)
    full = ops.linear(x, w)
    for i in (0, batch // 2, batch - 1):
        assert torch.equal(ops.linear(x[i : i + 1], w), full[i : i + 1])


def test_linear_output_does_not_depend_on_the_weight_row_position() -> None:
    """A fused qkv (Megatron) and separate q/k/v (vLLM, HF) give the same bits per output column."""
    w = torch.randn(96, 64, generator=_gen(4))
    x = torch.randn(5, 64, generator=_gen(5))
    perm = torch.randperm(96, generator=_gen(6))
    assert torch.equal(ops.linear(x, w)[:, perm], ops.linear(x, w[perm]))
    assert torch.equal(ops.linear(x, w)[:, 10:30], ops.linear(x, w[10:30]))


def test_linear_differs_from_torch_matmul_somewhere() -> None:
    """The reason the mode exists: the default kernel's bits depend on the batch (or at least differ from ours)."""
    w = torch.randn(256, 512, generator=_gen(7))
    x = torch.randn(64, 512, generator=_gen(8))
    assert not torch.equal(ops.linear(x, w), x @ w.t())
    assert torch.allclose(ops.linear(x, w), x @ w.t(), atol=1e-4)


def test_linear_gradients_match_matmul() -> None:
    w = torch.randn(6, 5, generator=_gen(9), requires_grad=True)
    x = torch.randn(4, 5, generator=_gen(10), requires_grad=True)
    ops.linear(x, w).square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (x @ w.t()).square().sum().backward()
    assert torch.allclose(gx, x.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)


def test_lora_delta_folds_the_scale_into_b() -> None:
    x, a, b = torch.randn(3, 8), torch.randn(2, 8), torch.randn(6, 2)
    assert torch.equal(ops.lora_delta(x, a, b, 0.37), ops.linear(ops.linear(x, a), b * 0.37))


def test_decode_with_kv_cache_equals_masked_full_sequence() -> None:
    seq, heads, kv_heads, dim = 11, 4, 2, 32
    q = torch.randn(1, seq, heads, dim, generator=_gen(11))
    k = torch.randn(1, seq, kv_heads, dim, generator=_gen(12))
    v = torch.randn(1, seq, kv_heads, dim, generator=_gen(13))
    positions = torch.arange(seq)
    full = ops.attention(q, k, v, ops.causal_allowed(positions, positions)[None], dim**-0.5)
    for t in range(seq):
        step = ops.attention(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1],
                             ops.causal_allowed(positions[t : t + 1], positions[: t + 1])[None], dim**-0.5)
        assert torch.equal(step, full[:, t : t + 1]), t


def test_attention_matches_torch_sdpa_numerically() -> None:
    q, k, v = (torch.randn(2, 9, 2, 32, generator=_gen(14 + i)) for i in range(3))
    positions = torch.arange(9)
    ours = ops.attention(q, k, v, ops.causal_allowed(positions, positions)[None], 32**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_norm_softmax_route_and_rope_are_row_invariant() -> None:
    x = torch.randn(19, 64, generator=_gen(20))
    w = torch.randn(64, generator=_gen(21))
    logits = torch.randn(19, 8, generator=_gen(22))
    positions = torch.arange(19)
    for i in (0, 7, 18):
        row = slice(i, i + 1)
        assert torch.equal(ops.rms_norm(x[row], w, 1e-6), ops.rms_norm(x, w, 1e-6)[row])
        assert torch.equal(ops.log_softmax(x[row]), ops.log_softmax(x)[row])
        assert torch.equal(ops.silu_and_mul(x[row]), ops.silu_and_mul(x)[row])
        assert torch.equal(ops.apply_rope(x[row], positions[row], 10000.0), ops.apply_rope(x, positions, 10000.0)[row])
        for got, want in zip(ops.route(logits[row], 2), ops.route(logits, 2), strict=True):
            assert torch.equal(got, want[row])


def test_route_breaks_ties_toward_the_lower_expert() -> None:
    weights, ids = ops.route(torch.tensor([[0.0, 1.0, 1.0, 1.0, -2.0]]), 2)
    assert ids.tolist() == [[1, 2]]
    assert torch.equal(weights, torch.tensor([[0.5, 0.5]]))


def test_pointwise_gives_the_same_bits_as_one_element_alone() -> None:
    x = torch.randn(20_000, generator=_gen(23)) * 4
    together = ops.pointwise(torch.sigmoid, x)
    alone = torch.stack([ops.pointwise(torch.sigmoid, x[i : i + 1])[0] for i in range(0, 20_000, 997)])
    assert torch.equal(together[::997], alone)


def test_combine_and_routed_outputs_are_exact_across_expert_owners() -> None:
    """Summing per-owner outputs (zeros elsewhere) equals computing every expert in one place."""
    x = torch.randn(10, 16, generator=_gen(24))
    weights, ids = ops.route(torch.randn(10, 4, generator=_gen(25)), 2)
    mats = torch.randn(4, 16, 16, generator=_gen(26))

    def fn(e: int, rows: torch.Tensor) -> torch.Tensor:
        return ops.linear(rows, mats[e])

    whole = ops.routed_expert_outputs(x, ids, range(4), fn, 16)
    halves = ops.routed_expert_outputs(x, ids, range(2), fn, 16) + ops.routed_expert_outputs(x, ids, range(2, 4), fn, 16)
    assert torch.equal(whole, halves)
    assert torch.equal(ops.combine_topk(whole, weights)[3:4], ops.combine_topk(whole[3:4], weights[3:4]))

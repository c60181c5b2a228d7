"""grouped_lora_delta: every expert's LoRA in one grouped matmul per factor equals the per-expert loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lora_plugins.lora.grouped import (
    GroupedLoraShapeError,
    grouped_lora_delta,
    grouped_mm_supported,
    resolve_backend,
)


def _upstream_per_expert(x, a_list, b_list, counts, scale):
    """Megatron-Bridge's order of work: each expert's block through its own A then B, scaled last; a
    factor shared by all experts is one matmul over every token (as its shared adapter runs it)."""
    if isinstance(a_list, list):
        hidden = torch.cat([torch.matmul(x_e, a_list[e].t()) for e, x_e in enumerate(torch.split(x, counts))])
    else:
        hidden = torch.matmul(x, a_list.t())
    if isinstance(b_list, list):
        out = torch.cat([torch.matmul(h_e, b_list[e].t()) for e, h_e in enumerate(torch.split(hidden, counts))])
    else:
        out = torch.matmul(hidden, b_list.t())
    return out * scale


def _case(counts, in_f, out_f, rank, dtype, seed, shared_a=False, shared_b=False):
    g = torch.Generator().manual_seed(seed)
    experts = len(counts)
    x = torch.randn(sum(counts), in_f, generator=g).to(dtype)
    a = [(torch.randn(rank, in_f, generator=g) * 0.1).to(dtype) for _ in range(1 if shared_a else experts)]
    b = [(torch.randn(out_f, rank, generator=g) * 0.1).to(dtype) for _ in range(1 if shared_b else experts)]
    grad_out = torch.randn(sum(counts), out_f, generator=g).to(dtype)
    return x, a, b, grad_out


def _run(fn, x0, a0, b0, grad_out):
    """Output and the gradients of x and of every factor, after one backward of ``grad_out``."""
    x = x0.clone().requires_grad_()
    a = [t.clone().requires_grad_() for t in a0]
    b = [t.clone().requires_grad_() for t in b0]
    y = fn(x, a, b)
    y.backward(grad_out)
    return [y.detach(), x.grad, *[t.grad for t in a], *[t.grad for t in b]]


def _grouped(backend, counts, scale, shared=(False, False)):
    def fn(x, a, b):
        fa = a[0] if shared[0] else torch.stack(a)
        fb = b[0] if shared[1] else torch.stack(b)
        return grouped_lora_delta(x, fa, fb, counts, scale, backend=backend)

    return fn


def _reference(counts, scale, shared=(False, False)):
    def fn(x, a, b):
        return _upstream_per_expert(x, a[0] if shared[0] else a, b[0] if shared[1] else b, counts, scale)

    return fn


COUNTS = [7, 0, 33, 1, 64, 20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [(False, False), (True, False), (False, True)], ids=["per-expert", "shared-A", "shared-B"])
def test_grouped_mm_on_the_cpu_is_bitwise_the_per_expert_loop_forward_and_backward(dtype, shared):
    x, a, b, gy = _case(COUNTS, 96, 48, 16, dtype, seed=1, shared_a=shared[0], shared_b=shared[1])
    want = _run(_reference(COUNTS, 2.0, shared), x, a, b, gy)
    got = _run(_grouped("grouped_mm", COUNTS, 2.0, shared), x, a, b, gy)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"tensor {i} differs by {(g.float() - w.float()).abs().max()}"


def test_an_expert_with_no_tokens_gets_zero_gradients():
    counts = [5, 0, 3]
    x, a, b, gy = _case(counts, 32, 16, 8, torch.float32, seed=2)
    got = _run(_grouped("auto", counts, 0.5), x, a, b, gy)
    grad_a1, grad_b1 = got[2 + 1], got[2 + 3 + 1]
    assert torch.count_nonzero(grad_a1) == 0 and torch.count_nonzero(grad_b1) == 0
    assert torch.count_nonzero(got[2]) > 0


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1.6e-2, 2e-2)], ids=["fp32", "bf16"])
def test_padded_batched_fallback_matches_within_float_rounding(dtype, rtol, atol):
    x, a, b, gy = _case(COUNTS, 96, 48, 16, dtype, seed=3)
    want = _run(_reference(COUNTS, 2.0), x, a, b, gy)
    got = _run(_grouped("padded", COUNTS, 2.0), x, a, b, gy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol)


def test_padded_fallback_with_shared_factors_matches():
    x, a, b, gy = _case(COUNTS, 64, 32, 8, torch.float32, seed=4, shared_a=True)
    want = _run(_reference(COUNTS, 1.0, (True, False)), x, a, b, gy)
    got = _run(_grouped("padded", COUNTS, 1.0, (True, False)), x, a, b, gy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=9).filter(lambda c: sum(c) > 0),
    rank=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 10_000),
)
def test_any_split_of_tokens_gives_the_loop_result(counts, rank, seed):
    x, a, b, gy = _case(counts, 24, 40, rank, torch.float32, seed=seed)
    want = _run(_reference(counts, 0.25), x, a, b, gy)
    got = _run(_grouped("auto", counts, 0.25), x, a, b, gy)
    assert resolve_backend("auto", x, torch.stack(a), torch.stack(b)) in ("grouped_mm", "loop")
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # on the CPU, auto is bitwise the loop whichever backend it picks


def test_auto_uses_grouped_mm_on_the_cpu_when_torch_has_it():
    x = torch.zeros(4, 8)
    a, b = torch.zeros(2, 4, 8), torch.zeros(2, 8, 4)
    expected = "grouped_mm" if hasattr(torch, "_grouped_mm") else "padded"
    assert resolve_backend("auto", x, a, b) == expected
    assert grouped_mm_supported(x, a, b) is hasattr(torch, "_grouped_mm")


def test_rows_that_are_not_16_byte_multiples_run_per_expert_on_the_cpu():
    x = torch.zeros(4, 8)
    assert resolve_backend("auto", x, torch.zeros(2, 2, 8), torch.zeros(2, 8, 2)) == "loop"


def test_mixed_dtypes_are_not_sent_to_grouped_mm():
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert not grouped_mm_supported(x, torch.zeros(2, 2, 8), torch.zeros(2, 8, 2))


def test_token_counts_that_do_not_cover_x_are_refused_with_both_numbers():
    with pytest.raises(GroupedLoraShapeError, match="sums to 5 but x has 6 rows"):
        grouped_lora_delta(torch.zeros(6, 8), torch.zeros(2, 2, 8), torch.zeros(2, 4, 2), [2, 3], 1.0)


def test_factor_with_the_wrong_number_of_experts_is_refused():
    with pytest.raises(GroupedLoraShapeError, match="lora_a has 3 experts, tokens_per_expert names 2"):
        grouped_lora_delta(torch.zeros(5, 8), torch.zeros(3, 2, 8), torch.zeros(2, 4, 2), [2, 3], 1.0)


def test_rank_mismatch_between_a_and_b_is_refused():
    with pytest.raises(GroupedLoraShapeError, match="rank must be 2"):
        grouped_lora_delta(torch.zeros(5, 8), torch.zeros(2, 2, 8), torch.zeros(2, 4, 3), [2, 3], 1.0)


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_lora_delta(torch.zeros(5, 8), torch.zeros(2, 2, 8), torch.zeros(2, 4, 2), [2, 3], 1.0, backend="fast")


def test_tokens_per_expert_may_be_a_tensor():
    x, a, b, _ = _case([3, 2], 16, 8, 4, torch.float32, seed=5)
    want = grouped_lora_delta(x, torch.stack(a), torch.stack(b), [3, 2], 1.0)
    got = grouped_lora_delta(x, torch.stack(a), torch.stack(b), torch.tensor([3, 2]), 1.0)
    assert torch.equal(got, want)

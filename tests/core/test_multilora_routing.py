"""Per-sample LoRA routing: each sample's delta through its own adapter; gradients never cross adapters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lora_plugins.multilora.routing import (
    AdapterRouting,
    LoraFactors,
    RoutingError,
    adapter_routing,
    current_routing,
    lora_delta,
    routed_lora_delta,
)

IN, OUT = 6, 5


def factors(slot: int, rank: int) -> LoraFactors:
    g = torch.Generator().manual_seed(100 + slot)
    a = torch.randn(rank, IN, generator=g, requires_grad=True)
    b = torch.randn(OUT, rank, generator=g, requires_grad=True)
    return LoraFactors(a, b, scale=2.0 / rank)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=7), st.integers(1, 4))
def test_each_sample_gets_exactly_its_own_adapters_delta(slots, seq):
    adapters = {s: factors(s, rank=s + 1) for s in (0, 1, 2)}  # slot 3 has no adapter on this target
    x = torch.randn(seq, len(slots), IN, generator=torch.Generator().manual_seed(len(slots)))
    out = routed_lora_delta(x, adapters, AdapterRouting(torch.tensor(slots)), OUT, sample_dim=1)
    if not set(slots) & set(adapters):
        assert out is None
        return
    for i, s in enumerate(slots):
        expected = lora_delta(x[:, i], adapters[s]) if s in adapters else torch.zeros(seq, OUT)
        torch.testing.assert_close(out[:, i], expected, rtol=1e-6, atol=1e-6)


def test_a_gradient_of_one_adapters_samples_never_reaches_another_adapter():
    adapters = {0: factors(0, 2), 1: factors(1, 3)}
    x = torch.randn(3, 4, IN)
    out = routed_lora_delta(x, adapters, AdapterRouting(torch.tensor([0, 1, 1, 0])), OUT, sample_dim=1)
    out[:, [0, 3]].sum().backward()  # only slot 0's samples in the loss
    assert adapters[0].a.grad is not None and adapters[0].a.grad.abs().sum() > 0
    assert adapters[1].a.grad is None or torch.count_nonzero(adapters[1].a.grad) == 0
    assert adapters[1].b.grad is None or torch.count_nonzero(adapters[1].b.grad) == 0


def test_the_mixed_gradient_equals_each_adapter_alone_on_its_rows():
    x = torch.randn(3, 4, IN)
    slots = torch.tensor([1, 0, 1, 0])
    weight = torch.randn(3, 4, OUT)
    mixed = {0: factors(0, 2), 1: factors(1, 3)}
    (routed_lora_delta(x, mixed, AdapterRouting(slots), OUT, sample_dim=1) * weight).sum().backward()
    for s in (0, 1):
        alone = factors(s, 2 if s == 0 else 3)
        rows = torch.nonzero(slots == s).flatten()
        (lora_delta(x[:, rows], alone) * weight[:, rows]).sum().backward()
        torch.testing.assert_close(mixed[s].a.grad, alone.a.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mixed[s].b.grad, alone.b.grad, rtol=1e-6, atol=1e-7)


def test_token_rows_need_a_uniform_routing():
    adapters = {0: factors(0, 2), 1: factors(1, 2)}
    x = torch.randn(9, IN)
    uniform = routed_lora_delta(x, adapters, AdapterRouting(torch.tensor([1, 1])), OUT, sample_dim=None)
    torch.testing.assert_close(uniform, lora_delta(x, adapters[1]))
    with pytest.raises(RoutingError, match=r"mixes slots \[0, 1\]"):
        routed_lora_delta(x, adapters, AdapterRouting(torch.tensor([0, 1])), OUT, sample_dim=None, where="expert fc1")


def test_a_routing_with_the_wrong_sample_count_is_refused():
    with pytest.raises(RoutingError, match="3 samples on dim 1, the routing names 2"):
        routed_lora_delta(torch.randn(2, 3, IN), {0: factors(0, 2)}, AdapterRouting(torch.tensor([0, 0])), OUT,
                          sample_dim=1)


def test_routing_context_nests_and_restores():
    assert current_routing() is None
    with adapter_routing([0, 1]) as outer:
        with adapter_routing([2]) as inner:
            assert current_routing() is inner
        assert current_routing() is outer
    assert current_routing() is None


@pytest.mark.parametrize("bad", [[], [[0, 1]], [-1, 0]])
def test_malformed_routings_are_refused(bad):
    with pytest.raises(RoutingError):
        AdapterRouting(torch.tensor(bad, dtype=torch.int64))

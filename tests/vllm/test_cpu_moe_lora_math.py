"""The CPU MoE-LoRA expert computation against a token-by-token reference, on vLLM's buffer layout.

Covers what the engine tests do not reach on one CPU: experts of another EP rank (local id -1),
tokens without an adapter (slot -1), a disabled slot, and shared factors stored with expert-dim 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lora_plugins.patches.vllm.cpu_moe_lora import _LoRABuffers, expert_forward_with_lora

pytestmark = pytest.mark.vllm

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K, SLOTS, RANK = 7, 16, 8, 4, 2, 3, 4


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:]


def reference(x, w1, w2, ids, weights, slots, buffers: _LoRABuffers) -> torch.Tensor:
    out = torch.zeros(TOKENS, HIDDEN, dtype=torch.float64)
    for t in range(TOKENS):
        for k in range(TOP_K):
            e = int(ids[t, k])
            if e < 0:
                continue
            s = int(slots[t])
            w1_e, w2_e = w1[e].double(), w2[e].double()
            if buffers.slot_active(s):
                deltas = [buffers.expert(b, s, e).double() @ buffers.expert(a, s, e).double()
                          for a, b in zip(buffers.w13_a, buffers.w13_b, strict=True)]
                w1_e = w1_e + torch.cat(deltas)
                w2_e = w2_e + buffers.expert(buffers.w2_b, s, e).double() @ buffers.expert(buffers.w2_a, s, e).double()
            hidden = silu_and_mul((x[t].double() @ w1_e.t()).unsqueeze(0))[0]
            out[t] += weights[t, k].double() * (hidden @ w2_e.t())
    return out


@pytest.mark.parametrize("shared", [False, True], ids=["per-expert", "shared-factors"])
def test_expert_forward_with_lora_matches_the_token_by_token_reference(shared):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    w1, w2 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g), torch.randn(EXPERTS, HIDDEN, INTER, generator=g)
    ids = torch.randint(0, EXPERTS, (TOKENS, TOP_K), generator=g)
    ids[0, 1] = -1  # an expert that lives on another EP rank
    weights = torch.rand(TOKENS, TOP_K, generator=g)
    slots = torch.tensor([0, 1, -1, 2, 0, -1, 1])
    shared_dim = 1 if shared else EXPERTS
    buffers = _LoRABuffers(
        (torch.randn(SLOTS, shared_dim, RANK, HIDDEN, generator=g), torch.randn(SLOTS, shared_dim, RANK, HIDDEN, generator=g)),
        (torch.randn(SLOTS, EXPERTS, INTER, RANK, generator=g), torch.randn(SLOTS, EXPERTS, INTER, RANK, generator=g)),
        torch.randn(SLOTS, EXPERTS, RANK, INTER, generator=g),
        torch.randn(SLOTS, shared_dim, HIDDEN, RANK, generator=g),
        torch.tensor([1, 1, 0, 0]),  # slot 2 holds no adapter
    )
    got = expert_forward_with_lora(x, w1, w2, ids, weights, silu_and_mul, apply_router_weight_on_input=False,
                                   token_slots=slots, lora=buffers)
    torch.testing.assert_close(got.double(), reference(x, w1, w2, ids, weights, slots, buffers), rtol=1e-5, atol=1e-4)


def test_without_lora_context_it_is_the_plain_moe():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    w1, w2 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g), torch.randn(EXPERTS, HIDDEN, INTER, generator=g)
    ids = torch.randint(0, EXPERTS, (TOKENS, TOP_K), generator=g)
    weights = torch.rand(TOKENS, TOP_K, generator=g)
    empty = _LoRABuffers((torch.zeros(1, 1, 1, HIDDEN),) * 2, (torch.zeros(1, EXPERTS, INTER, 1),) * 2,
                         torch.zeros(1, EXPERTS, 1, INTER), torch.zeros(1, 1, HIDDEN, 1), torch.tensor([0, 0]))
    got = expert_forward_with_lora(x, w1, w2, ids, weights, silu_and_mul, apply_router_weight_on_input=False,
                                   token_slots=None, lora=None)
    torch.testing.assert_close(got.double(), reference(x, w1, w2, ids, weights, torch.full((TOKENS,), -1), empty),
                               rtol=1e-5, atol=1e-4)

"""The multi-LoRA wrapper on a Megatron-shaped toy model (plain torch modules with Megatron's names and
``(output, bias)`` returns): the ``multi_lora`` plugin wraps and freezes, adapters get their own targets
and global names, each sample goes through its own adapter, experts need one adapter per forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_lora_plugins.hooks.manager import new_plugin_manager
from moe_lora_plugins.multilora.controller import AdapterSpec
from moe_lora_plugins.multilora.megatron import (
    MultiLoraLinear,
    MultiLoraSetup,
    MultiLoraSetupError,
    adapter_parameters,
    add_adapter,
    remove_adapter,
    slots_present,
)
from moe_lora_plugins.multilora.routing import RoutingError, adapter_routing

H = 8


class Linear(nn.Module):
    """A Megatron-style linear: returns ``(output, bias)``."""

    def __init__(self, n_in: int, n_out: int, seed: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed)) * 0.3)

    def forward(self, x):
        return x @ self.weight.t(), None


class Layer(nn.Module):
    def __init__(self, number: int) -> None:
        super().__init__()
        self.layer_number = number
        self.self_attention = nn.Module()
        self.self_attention.linear_qkv = Linear(H, 3 * H, number)
        self.self_attention.linear_proj = Linear(3 * H, H, 10 + number)
        self.mlp = nn.Module()
        self.mlp.local_expert_indices = [2, 3]  # this rank holds global experts 2 and 3
        self.mlp.experts = nn.Module()
        self.mlp.experts.local_experts = nn.ModuleList()
        for e in range(2):
            expert = nn.Module()
            expert.linear_fc1 = Linear(H, 2 * H, 20 + e)
            expert.linear_fc2 = Linear(2 * H, H, 30 + e)
            self.mlp.experts.local_experts.append(expert)


class Chunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([Layer(3), Layer(4)])  # layers 2 and 3 of the whole model

    def attention(self, x):
        """``[s, b, h]`` through every layer's attention projections."""
        for layer in self.decoder.layers:
            x = layer.self_attention.linear_proj(layer.self_attention.linear_qkv(x)[0])[0]
        return x

    def expert(self, tokens, e=0):
        """``[tokens, h]`` through one expert of the first layer."""
        expert = self.decoder.layers[0].mlp.experts.local_experts[e]
        return expert.linear_fc2(torch.relu(expert.linear_fc1(tokens)[0]))[0]


A = AdapterSpec("a", rank=2, alpha=4.0, seed=1)
B = AdapterSpec("b", rank=4, alpha=2.0, targets=("linear_qkv", "linear_fc1"), experts=False, seed=2)


def built(role: str = "actor", config=None) -> Chunk:
    chunk = Chunk()
    new_plugin_manager(autoload=False).hook.on_build_model(model_chunks=[chunk], provider=None, role=role,
                                                           config=config if config is not None else MultiLoraSetup())
    return chunk


def train_b(chunk: Chunk, slot: int) -> None:
    with torch.no_grad():  # make B non-zero so the deltas show
        for name, p in adapter_parameters([chunk], slot).items():
            if ".linear_out." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)


def test_the_plugin_wraps_every_target_and_freezes_the_base_for_the_actor_only():
    chunk = built()
    wrapped = [n for n, m in chunk.named_modules() if isinstance(m, MultiLoraLinear)]
    assert len(wrapped) == 2 * (2 + 2 * 2)
    assert not any(p.requires_grad for p in chunk.parameters())
    for role, config in (("critic", MultiLoraSetup()), ("actor", object())):
        other = built(role, config)
        assert not any(isinstance(m, MultiLoraLinear) for m in other.modules())
        assert all(p.requires_grad for p in other.parameters())


def test_each_adapter_gets_its_own_targets_ranks_and_global_names():
    chunk = built()
    add_adapter([chunk], 0, A)
    add_adapter([chunk], 3, B)
    a, b = adapter_parameters([chunk], 0), adapter_parameters([chunk], 3)
    assert "decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.adapter.linear_out.weight" in a
    assert "decoder.layers.3.self_attention.linear_proj.adapter.linear_in.weight" in a
    assert sorted({n.split(".adapter.")[0].rsplit(".", 1)[-1] for n in b}) == ["linear_qkv"]  # no dense fc1 here
    assert all(p.shape[0] == 2 for n, p in a.items() if ".linear_in." in n)
    assert all(p.shape[1] == 4 for n, p in b.items() if ".linear_out." in n)
    assert all(p.requires_grad for p in [*a.values(), *b.values()])
    assert all(not p.any() for n, p in a.items() if ".linear_out." in n)  # LoRA B starts at zero
    assert slots_present([chunk]) == [0, 3]
    with pytest.raises(MultiLoraSetupError, match="slot 0 already holds an adapter"):
        add_adapter([chunk], 0, B)
    assert remove_adapter([chunk], 3) == 2 and slots_present([chunk]) == [0]


def test_a_reinitialised_adapter_is_the_same_in_any_slot():
    chunk = built()
    add_adapter([chunk], 0, A)
    add_adapter([chunk], 5, A)
    left, right = adapter_parameters([chunk], 0), adapter_parameters([chunk], 5)
    assert all(torch.equal(left[n], right[n]) for n in left)


def test_each_sample_goes_through_its_own_adapter_and_gradients_stay_with_their_adapter():
    chunk = built()
    add_adapter([chunk], 0, A)
    add_adapter([chunk], 1, B)
    train_b(chunk, 0)
    train_b(chunk, 1)
    x = torch.randn(5, 4, H, generator=torch.Generator().manual_seed(0))
    slots = [1, 0, 0, 1]
    with adapter_routing(slots):
        mixed = chunk.attention(x)
    for i, slot in enumerate(slots):
        with adapter_routing([slot]):
            alone = chunk.attention(x[:, i : i + 1])
        torch.testing.assert_close(mixed[:, i : i + 1], alone, rtol=1e-6, atol=1e-6)
    with adapter_routing(slots):
        chunk.attention(x)[:, [1, 2]].sum().backward()  # samples of slot 0 only
    assert all(p.grad is None or not p.grad.any() for p in adapter_parameters([chunk], 1).values())
    assert any(p.grad is not None and p.grad.any() for p in adapter_parameters([chunk], 0).values())


def test_experts_take_one_adapter_per_forward_and_an_unrouted_forward_is_refused():
    chunk = built()
    add_adapter([chunk], 0, A)
    add_adapter([chunk], 1, B)
    train_b(chunk, 0)
    tokens = torch.randn(7, H)
    with adapter_routing([0, 0]):
        with_a = chunk.expert(tokens)
    with adapter_routing([1, 1]):
        with_b = chunk.expert(tokens)  # B has no expert adapters: the base expert
    base = chunk.decoder.layers[0].mlp.experts.local_experts[0]
    plain = base.linear_fc2.to_wrap(torch.relu(base.linear_fc1.to_wrap(tokens)[0]))[0]
    torch.testing.assert_close(with_b, plain)
    assert not torch.allclose(with_a, plain)
    with adapter_routing([0, 1]), pytest.raises(RoutingError, match="one adapter per forward"):
        chunk.expert(tokens)
    with pytest.raises(RoutingError, match="adapter_routing"):
        chunk.expert(tokens)


def test_grouped_gemm_experts_are_refused_not_left_without_adapters():
    chunk = Chunk()
    grouped = nn.Module()  # GroupedMLP-like: every local expert in weight1 / weight2, no linear_fc1 modules
    grouped.weight1 = nn.Parameter(torch.zeros(2, H, 2 * H))
    chunk.decoder.layers[0].mlp.experts = grouped
    with pytest.raises(MultiLoraSetupError, match="grouped-GEMM experts .*moe_grouped_gemm=False"):
        new_plugin_manager(autoload=False).hook.on_build_model(model_chunks=[chunk], provider=None, role="actor",
                                                               config=MultiLoraSetup())

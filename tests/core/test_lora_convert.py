"""Megatron LoRA tensors -> PEFT names and tensors (and back), checked against hand-built Megatron layouts.

The reference here is written independently of the converter: the HF-side adapter is drawn at random
and the Megatron-side tensors are assembled from it with explicit loops over query groups, TP shards
and experts, the way Megatron lays them out.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lora_plugins.lora.convert import (
    AdapterShapeError,
    UnknownLoraNameError,
    megatron_to_peft,
    peft_to_megatron,
)
from moe_lora_plugins.lora.families import ModelDims, UnknownModelFamilyError, get_family
from moe_lora_plugins.lora.shards import split_gate_up_lora_b, split_qkv_lora_b

P = "base_model.model.model.layers"


def megatron_qkv_b(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: ModelDims) -> torch.Tensor:
    """Megatron's fused q/k/v row order: for each query group, its query heads, then k, then v."""
    d, hpg = dims.head_dim, dims.heads_per_group
    rows = []
    for g in range(dims.num_query_groups):
        for h in range(hpg):
            rows.append(q[(g * hpg + h) * d : (g * hpg + h + 1) * d])
        rows.append(k[g * d : (g + 1) * d])
        rows.append(v[g * d : (g + 1) * d])
    return torch.cat(rows)


def megatron_fc1_b(gate: torch.Tensor, up: torch.Tensor, shards: int) -> torch.Tensor:
    """fc1 LoRA B as gathered from ``shards`` TP ranks: rank i holds [gate_i; up_i]."""
    n = gate.shape[-2] // shards
    pieces = []
    for i in range(shards):
        pieces.append(gate[..., i * n : (i + 1) * n, :])
        pieces.append(up[..., i * n : (i + 1) * n, :])
    return torch.cat(pieces, dim=-2)


class TinyMoe:
    """A random HF-side Qwen3-MoE-shaped adapter and its Megatron-side tensors, built by hand."""

    def __init__(
        self,
        *,
        layers=2,
        experts=4,
        hidden=16,
        inter=8,
        moe_inter=6,
        rank=4,
        groups=2,
        hpg=2,
        head=4,
        tp=1,
        expert_tp=1,
        seed=0,
    ):
        g = torch.Generator().manual_seed(seed)
        self.dims = ModelDims(groups * hpg, groups, head, experts)
        self.rank, self.tp, self.expert_tp = rank, tp, expert_tp
        r = rank

        def rnd(*shape):
            return torch.randn(*shape, generator=g)

        self.hf: dict[str, torch.Tensor] = {}
        self.megatron: dict[str, torch.Tensor] = {}
        q_out, kv_out = groups * hpg * head, groups * head
        for layer in range(layers):
            hp, mp = f"{P}.{layer}", f"decoder.layers.{layer}"
            a_qkv, bq, bk, bv = rnd(r, hidden), rnd(q_out, r), rnd(kv_out, r), rnd(kv_out, r)
            for proj, b in (("q_proj", bq), ("k_proj", bk), ("v_proj", bv)):
                self.hf[f"{hp}.self_attn.{proj}.lora_A.weight"] = a_qkv
                self.hf[f"{hp}.self_attn.{proj}.lora_B.weight"] = b
            self.megatron[f"{mp}.self_attention.linear_qkv.adapter.linear_in.weight"] = a_qkv
            self.megatron[f"{mp}.self_attention.linear_qkv.adapter.linear_out.weight"] = megatron_qkv_b(
                bq, bk, bv, self.dims
            )
            a_o, b_o = rnd(r, q_out), rnd(hidden, r)
            self.hf[f"{hp}.self_attn.o_proj.lora_A.weight"] = a_o
            self.hf[f"{hp}.self_attn.o_proj.lora_B.weight"] = b_o
            self.megatron[f"{mp}.self_attention.linear_proj.adapter.linear_in.weight"] = a_o
            self.megatron[f"{mp}.self_attention.linear_proj.adapter.linear_out.weight"] = b_o
            for e in range(experts):
                a1, bg, bu, a2, bd = (
                    rnd(r, hidden),
                    rnd(moe_inter, r),
                    rnd(moe_inter, r),
                    rnd(r, moe_inter),
                    rnd(hidden, r),
                )
                ep = f"{hp}.mlp.experts.{e}"
                for proj, a, b in (("gate_proj", a1, bg), ("up_proj", a1, bu), ("down_proj", a2, bd)):
                    self.hf[f"{ep}.{proj}.lora_A.weight"] = a
                    self.hf[f"{ep}.{proj}.lora_B.weight"] = b
                mep = f"{mp}.mlp.experts.local_experts.{e}"
                self.megatron[f"{mep}.linear_fc1.adapter.linear_in.weight"] = a1
                self.megatron[f"{mep}.linear_fc1.adapter.linear_out.weight"] = megatron_fc1_b(
                    bg, bu, expert_tp
                )
                self.megatron[f"{mep}.linear_fc2.adapter.linear_in.weight"] = a2
                self.megatron[f"{mep}.linear_fc2.adapter.linear_out.weight"] = bd
        del inter

    def convert(self):
        return megatron_to_peft(
            self.megatron, "qwen3_moe", self.dims, alpha=8, tp=self.tp, expert_tp=self.expert_tp
        )


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


# --- fused splits ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 4), hpg=st.integers(1, 4), head=st.integers(1, 5), rank=st.integers(1, 4))
def test_qkv_split_undoes_megatron_group_interleaving(groups, hpg, head, rank):
    dims = ModelDims(groups * hpg, groups, head)
    q, k, v = (
        torch.randn(groups * hpg * head, rank),
        torch.randn(groups * head, rank),
        torch.randn(groups * head, rank),
    )
    got = split_qkv_lora_b(megatron_qkv_b(q, k, v, dims), dims)
    assert all(torch.equal(a, b) for a, b in zip(got, (q, k, v), strict=False))


@settings(max_examples=40, deadline=None)
@given(
    shards=st.sampled_from([1, 2, 4]),
    rows=st.integers(1, 4),
    rank=st.integers(1, 4),
    experts=st.integers(0, 3),
)
def test_gate_up_split_is_per_shard(shards, rows, rank, experts):
    lead = (experts,) if experts else ()
    gate, up = torch.randn(*lead, shards * rows, rank), torch.randn(*lead, shards * rows, rank)
    got_gate, got_up = split_gate_up_lora_b(megatron_fc1_b(gate, up, shards), shards)
    assert torch.equal(got_gate, gate) and torch.equal(got_up, up)


def test_one_global_chunk_is_wrong_under_tp2():
    """The AReaL converter's split: one chunk(2) of the gathered tensor mixes gate and up rows at TP=2."""
    gate, up = torch.randn(4, 2), torch.randn(4, 2)
    naive_gate, _ = megatron_fc1_b(gate, up, 2).chunk(2)
    assert not torch.equal(naive_gate, gate)


# --- Megatron -> PEFT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("tp", "expert_tp"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_sequential_experts_convert_to_hf_truth(tp, expert_tp):
    tiny = TinyMoe(tp=tp, expert_tp=expert_tp)
    adapter = tiny.convert()
    assert_same_tensors(adapter.tensors, tiny.hf)
    assert adapter.alpha == 8 and adapter.rank == tiny.rank


def test_tp2_gathered_shards_give_the_world_size_1_adapter():
    one, two = TinyMoe(tp=1, expert_tp=1), TinyMoe(tp=1, expert_tp=2)
    assert_same_tensors(two.convert().tensors, one.convert().tensors)


def test_fused_lora_a_is_one_tensor_under_every_projection():
    adapter = TinyMoe().convert()
    t = adapter.tensors
    assert t[f"{P}.0.self_attn.q_proj.lora_A.weight"] is t[f"{P}.0.self_attn.v_proj.lora_A.weight"]
    assert (
        t[f"{P}.0.mlp.experts.1.gate_proj.lora_A.weight"] is t[f"{P}.0.mlp.experts.1.up_proj.lora_A.weight"]
    )


def _grouped(tiny: TinyMoe, shared_in: bool, shared_out: bool) -> dict:
    """Replace the SequentialMLP expert names by grouped names (3-D per expert, or 2-D shared)."""
    out = {k: v for k, v in tiny.megatron.items() if ".local_experts." not in k}
    for layer in range(2):
        for fc in ("linear_fc1", "linear_fc2"):
            for side, shared in (("linear_in", shared_in), ("linear_out", shared_out)):
                per = [
                    tiny.megatron[
                        f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{fc}.adapter.{side}.weight"
                    ]
                    for e in range(tiny.dims.num_experts)
                ]
                out[f"decoder.layers.{layer}.mlp.experts.{fc}.adapter.{side}.weight"] = (
                    per[0] if shared else torch.stack(per)
                )
    return out


def test_grouped_3d_per_expert_adapters_equal_the_sequential_ones():
    tiny = TinyMoe()
    got = megatron_to_peft(_grouped(tiny, False, False), "qwen3_moe", tiny.dims, alpha=8)
    assert_same_tensors(got.tensors, tiny.hf)


def test_grouped_2d_shared_adapter_is_one_tensor_for_all_experts():
    tiny = TinyMoe()
    got = megatron_to_peft(_grouped(tiny, True, True), "qwen3_moe", tiny.dims, alpha=8).tensors
    names = [f"{P}.1.mlp.experts.{e}.down_proj.lora_B.weight" for e in range(4)]
    assert all(got[n] is got[names[0]] for n in names)
    assert torch.equal(got[names[0]], tiny.hf[f"{P}.1.mlp.experts.0.down_proj.lora_B.weight"])


def test_shared_outer_mix_keeps_the_2d_side_shared_and_the_3d_side_per_expert():
    tiny = TinyMoe()
    got = megatron_to_peft(_grouped(tiny, True, False), "qwen3_moe", tiny.dims, alpha=8).tensors
    a = [got[f"{P}.0.mlp.experts.{e}.gate_proj.lora_A.weight"] for e in range(4)]
    assert all(t is a[0] for t in a)
    for e in range(4):
        name = f"{P}.0.mlp.experts.{e}.up_proj.lora_B.weight"
        assert torch.equal(got[name], tiny.hf[name])


def test_3d_tensor_with_only_local_experts_is_refused():
    tiny = TinyMoe()
    grouped = _grouped(tiny, False, False)
    name = "decoder.layers.0.mlp.experts.linear_fc1.adapter.linear_in.weight"
    grouped[name] = grouped[name][:2]
    with pytest.raises(AdapterShapeError, match="has 2 experts, the model has 4"):
        megatron_to_peft(grouped, "qwen3_moe", tiny.dims, alpha=8)


def test_shared_experts_and_router_are_converted_not_dropped():
    dims = ModelDims(4, 2, 4, 2)
    a, b = torch.randn(2, 16), torch.randn(12, 2)
    tensors = {
        "decoder.layers.0.mlp.shared_experts.linear_fc1.adapter.linear_in.weight": a,
        "decoder.layers.0.mlp.shared_experts.linear_fc1.adapter.linear_out.weight": b,
        "decoder.layers.0.mlp.router.adapter.linear_in.weight": a,
        "decoder.layers.0.mlp.router.adapter.linear_out.weight": torch.randn(2, 2),
    }
    got = megatron_to_peft(tensors, "glm4_moe", dims, alpha=4).tensors
    assert torch.equal(got[f"{P}.0.mlp.shared_experts.up_proj.lora_B.weight"], b[6:])
    assert f"{P}.0.mlp.gate.lora_A.weight" in got
    qwen2 = megatron_to_peft(tensors, "qwen2_moe", dims, alpha=4).tensors
    assert f"{P}.0.mlp.shared_expert.gate_proj.lora_B.weight" in qwen2


def test_unknown_module_raises_and_names_it():
    tiny = TinyMoe()
    tensors = dict(tiny.megatron)
    tensors["decoder.layers.0.mlp.shared_experts.linear_fc1.adapter.linear_in.weight"] = torch.zeros(4, 16)
    tensors["decoder.layers.0.mlp.shared_experts.linear_fc1.adapter.linear_out.weight"] = torch.zeros(12, 4)
    with pytest.raises(UnknownLoraNameError, match=r"'mlp\.shared_experts\.linear_fc1'.*'qwen3_moe'"):
        megatron_to_peft(tensors, "qwen3_moe", tiny.dims, alpha=8)


def test_half_a_pair_raises():
    tiny = TinyMoe()
    tensors = dict(tiny.megatron)
    del tensors["decoder.layers.1.self_attention.linear_proj.adapter.linear_out.weight"]
    with pytest.raises(AdapterShapeError, match="layer 1 self_attention.linear_proj"):
        megatron_to_peft(tensors, "qwen3_moe", tiny.dims, alpha=8)


def test_unknown_family_is_not_guessed_by_substring():
    with pytest.raises(UnknownModelFamilyError, match="qwen3_moe_custom"):
        get_family("qwen3_moe_custom")


# --- PEFT -> Megatron and round trips -------------------------------------------------------------


@pytest.mark.parametrize("expert_tp", [1, 2])
def test_peft_to_megatron_rebuilds_the_megatron_tensors(expert_tp):
    tiny = TinyMoe(expert_tp=expert_tp)
    got = peft_to_megatron(tiny.hf, "qwen3_moe", tiny.dims, expert_tp=expert_tp)
    assert_same_tensors(got, tiny.megatron)


@pytest.mark.parametrize("layout", ["sequential", "grouped"])
def test_peft_megatron_peft_round_trip_is_bitwise_identity(layout):
    tiny = TinyMoe(seed=3)
    megatron = peft_to_megatron(tiny.hf, "qwen3_moe", tiny.dims, experts_layout=layout)
    back = megatron_to_peft(megatron, "qwen3_moe", tiny.dims, alpha=8).tensors
    assert sorted(back) == sorted(tiny.hf)
    for name, t in tiny.hf.items():
        assert back[name].dtype == t.dtype and torch.equal(
            back[name].view(torch.int32), t.view(torch.int32)
        ), name


def test_peft_with_different_gate_and_up_lora_a_is_refused():
    tiny = TinyMoe()
    hf = dict(tiny.hf)
    hf[f"{P}.0.mlp.experts.2.up_proj.lora_A.weight"] = torch.zeros(4, 16)
    with pytest.raises(AdapterShapeError, match="different LoRA A"):
        peft_to_megatron(hf, "qwen3_moe", tiny.dims)


def test_peft_module_outside_the_table_raises():
    tiny = TinyMoe()
    hf = dict(tiny.hf)
    hf[f"{P}.0.mlp.experts.0.w9.lora_A.weight"] = torch.zeros(4, 16)
    hf[f"{P}.0.mlp.experts.0.w9.lora_B.weight"] = torch.zeros(4, 4)
    with pytest.raises(UnknownLoraNameError, match=r"mlp\.experts\.0\.w9"):
        peft_to_megatron(hf, "qwen3_moe", tiny.dims)

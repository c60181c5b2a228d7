"""The expert-parallel gather plan and the byte packing behind a one-shot gather."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.topology.ep_gather import (
    EPGatherError,
    flat_layout,
    pack_flat,
    pack_tensors,
    packed_nbytes,
    plan_ep_gather,
    tensor_meta,
    unpack_flat,
    unpack_tensors,
)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 4))
def test_each_rank_owns_its_experts_and_dense_names_are_replicated(ep, per_rank, dense):
    dense_names = [f"model.norm{d}.weight" for d in range(dense)]
    names = [
        dense_names + [f"model.layers.0.mlp.experts.{r * per_rank + e}.up_proj.weight" for e in range(per_rank)]
        for r in range(ep)
    ]
    plan = plan_ep_gather(names)
    assert plan.replicated == (frozenset(dense_names) if ep > 1 else frozenset())
    for rank in range(ep):
        owned = set(plan.owned[rank])
        assert owned == set(names[rank]) - plan.replicated
        assert all(plan.owner(name) == rank for name in owned)


def test_a_name_held_by_some_but_not_all_ranks_is_refused():
    with pytest.raises(EPGatherError, match="some but not all of the 3 EP ranks, .*: x"):
        plan_ep_gather([["x", "a"], ["x", "b"], ["c"]])


def test_a_name_emitted_twice_by_one_rank_is_refused():
    with pytest.raises(EPGatherError, match="EP rank 1 emits these names more than once: b"):
        plan_ep_gather([["a"], ["b", "b"]])


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]


@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), min_size=0, max_size=3)), max_size=6))
def test_packing_round_trips_bit_for_bit(specs):
    tensors = [
        (torch.randn(shape) * 100).to(dtype) if dtype.is_floating_point else torch.randint(0, 100, shape, dtype=dtype)
        for dtype, shape in specs
    ]
    metas = [tensor_meta(f"t{i}", t) for i, t in enumerate(tensors)]
    flat = pack_tensors(tensors)
    assert flat.numel() == packed_nbytes(metas)
    for (_, got), want in zip(unpack_tensors(flat, metas), tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8))


def _gather_on_rank(three_tuples: bool) -> list:
    import torch.distributed as dist

    from moe_lora_plugins.patches.megatron_bridge._export_common import gather_expert_items

    rank = dist.get_rank()
    items = [("model.norm.weight", torch.ones(2))]
    for local in range(2):
        expert = rank * 2 + local
        items.append((f"model.layers.0.mlp.experts.{expert}.down_proj.lora_A.weight", torch.full((2, 3), float(expert))))
    if three_tuples:
        items = [(name, tensor, f"megatron:{name}") for name, tensor in items]
    return gather_expert_items(items, dist.group.WORLD)


@pytest.mark.parametrize("three_tuples", [False, True], ids=["2-tuples", "3-tuples"])
def test_gloo_gather_gives_every_rank_every_expert_once_and_keeps_the_tuple_shape(three_tuples):
    results = run_distributed(_gather_on_rank, 2, (three_tuples,), timeout_s=120)
    for items in results:
        names = [item[0] for item in items]
        assert sorted(names) == sorted(
            ["model.norm.weight"] + [f"model.layers.0.mlp.experts.{e}.down_proj.lora_A.weight" for e in range(4)]
        )
        for item in items:
            assert len(item) == (3 if three_tuples else 2)
            if ".experts." in item[0]:
                expert = int(item[0].split(".experts.")[1].split(".")[0])
                assert torch.equal(item[1], torch.full((2, 3), float(expert)))
                if three_tuples:
                    assert item[2] == f"megatron:{item[0]}"


@given(st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=6))
def test_a_flat_buffer_gives_back_every_tensor_bitwise_as_a_view(shapes):
    tensors = [torch.randn(shape, dtype=torch.float64).to(torch.bfloat16) for shape in shapes]
    layout = flat_layout(tensors)
    flat = pack_flat(tensors)
    assert flat.numel() == layout.numel == sum(t.numel() for t in tensors)
    back = unpack_flat(flat, layout)
    for original, restored in zip(tensors, back, strict=True):
        assert restored.shape == original.shape and restored.dtype == original.dtype
        assert torch.equal(restored.view(torch.int16), original.view(torch.int16))
        assert restored.data_ptr() >= flat.data_ptr()  # a view of the buffer, not a copy


def test_a_flat_layout_refuses_mixed_dtypes_and_a_buffer_of_the_wrong_size():
    with pytest.raises(EPGatherError, match=r"one dtype, got \['torch.bfloat16', 'torch.float32'\]"):
        flat_layout([torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)])
    layout = flat_layout([torch.zeros(2, 3)])
    with pytest.raises(EPGatherError, match="holds 5 elements, the layout needs 6"):
        unpack_flat(torch.zeros(5), layout)

"""Tensor-parallel shard layouts of Megatron LoRA tensors, and the fused q/k/v and gate/up splits.

Megatron keeps one LoRA pair per fused module: LoRA A (``linear_in``) is shared by every projection,
LoRA B (``linear_out``) stacks them. Under tensor parallelism (expert-TP for experts) each rank holds
a slice, and concatenating the slices in rank order gives the "gathered" tensor the functions here
take. For fc1 that gathered B is ``[g0; u0; g1; u1; ...]`` (each rank's gate rows, then its up rows),
so gate/up must be split per shard, never by one global ``chunk(2)``. q/k/v are interleaved per query
group and the groups are contiguous per rank, so their split does not depend on the TP size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from moe_lora_plugins.lora.families import ModelDims, ModuleRule

Side = Literal["lora_A", "lora_B"]


def split_qkv_lora_b(
    lora_b: torch.Tensor, dims: ModelDims
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut a fused ``linear_qkv`` LoRA B ``(G * (H/G + 2) * d, r)`` into q, k and v LoRA B.

    Megatron orders the rows per query group: ``H/G`` query heads, then one key head, then one value
    head, each ``d`` rows.
    """
    groups, per_group, head_dim = dims.num_query_groups, dims.heads_per_group, dims.head_dim
    expected = groups * (per_group + 2) * head_dim
    if lora_b.shape[-2] != expected:
        raise ValueError(
            f"fused qkv LoRA B has {lora_b.shape[-2]} rows; {groups} query groups x ({per_group} + 2) heads x "
            f"head_dim {head_dim} = {expected}. Check ModelDims (num_attention_heads, num_query_groups, head_dim)."
        )
    rank = lora_b.shape[-1]
    lead = lora_b.shape[:-2]
    grouped = lora_b.reshape(*lead, groups, per_group + 2, head_dim, rank)
    q = grouped[..., :per_group, :, :].reshape(*lead, groups * per_group * head_dim, rank)
    k = grouped[..., per_group, :, :].reshape(*lead, groups * head_dim, rank)
    v = grouped[..., per_group + 1, :, :].reshape(*lead, groups * head_dim, rank)
    return q, k, v


def fuse_qkv_lora_b(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: ModelDims) -> torch.Tensor:
    """Inverse of :func:`split_qkv_lora_b`."""
    groups, per_group, head_dim = dims.num_query_groups, dims.heads_per_group, dims.head_dim
    rank = q.shape[-1]
    lead = q.shape[:-2]
    parts = (
        q.reshape(*lead, groups, per_group, head_dim, rank),
        k.reshape(*lead, groups, 1, head_dim, rank),
        v.reshape(*lead, groups, 1, head_dim, rank),
    )
    return torch.cat(parts, dim=-3).reshape(*lead, groups * (per_group + 2) * head_dim, rank)


def split_gate_up_lora_b(lora_b: torch.Tensor, shards: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a gathered fc1 LoRA B ``(..., 2 * I, r)`` made of ``shards`` rank slices into gate and up.

    ``shards`` is the tensor-parallel size the tensor was gathered from (expert-TP size for experts);
    each slice is ``[gate_i; up_i]``.
    """
    rows, rank = lora_b.shape[-2], lora_b.shape[-1]
    if rows % (2 * shards):
        raise ValueError(f"fc1 LoRA B has {rows} rows, not divisible by 2 x {shards} shards")
    lead = lora_b.shape[:-2]
    per_shard = lora_b.reshape(*lead, shards, 2, rows // (2 * shards), rank)
    gate = per_shard[..., 0, :, :].reshape(*lead, rows // 2, rank)
    up = per_shard[..., 1, :, :].reshape(*lead, rows // 2, rank)
    return gate, up


def fuse_gate_up_lora_b(gate: torch.Tensor, up: torch.Tensor, shards: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_gate_up_lora_b`: the gathered fc1 LoRA B of ``shards`` rank slices."""
    if gate.shape != up.shape:
        raise ValueError(f"gate LoRA B {tuple(gate.shape)} and up LoRA B {tuple(up.shape)} differ in shape")
    rows, rank = gate.shape[-2], gate.shape[-1]
    if rows % shards:
        raise ValueError(f"gate LoRA B has {rows} rows, not divisible by {shards} shards")
    lead = gate.shape[:-2]
    pieces = torch.stack(
        (gate.reshape(*lead, shards, rows // shards, rank), up.reshape(*lead, shards, rows // shards, rank)),
        dim=-3,
    )
    return pieces.reshape(*lead, 2 * rows, rank)


def megatron_shard_axis(rule: ModuleRule, side: Side, ndim: int) -> int:
    """The axis along which Megatron splits this LoRA tensor across (expert-)TP ranks.

    Column-parallel bases (q/k/v, fc1) split LoRA A on the rank and LoRA B on the output;
    row-parallel bases (attention output, fc2) split LoRA A on the input and LoRA B on the output.
    A 3-D grouped-expert tensor has the expert axis first. The router's adapter is column-style.
    """
    row_parallel = rule.megatron.endswith(("linear_proj", "linear_fc2"))
    axis = 1 if (side == "lora_A" and row_parallel) else 0
    return axis + (ndim - 2)


def shard_like_megatron(
    tensor: torch.Tensor, rule: ModuleRule, side: Side, shards: int
) -> list[torch.Tensor]:
    """Cut a full (HF-order) LoRA tensor into the slices ranks ``0..shards-1`` hold in Megatron.

    For fc1 LoRA B the full tensor is ``[gate; up]`` and each slice is ``[gate_i; up_i]``.
    """
    axis = megatron_shard_axis(rule, side, tensor.ndim)
    if tensor.shape[axis] % shards:
        raise ValueError(
            f"{rule.megatron} {side}: axis {axis} of {tuple(tensor.shape)} not divisible by {shards}"
        )
    if side == "lora_B" and rule.split == "gate_up":
        gate, up = tensor.chunk(2, dim=axis)
        return [
            torch.cat(pair, dim=axis)
            for pair in zip(gate.chunk(shards, axis), up.chunk(shards, axis), strict=False)
        ]
    return list(tensor.chunk(shards, dim=axis))


def gather_shards(shards: Sequence[torch.Tensor], rule: ModuleRule, side: Side) -> torch.Tensor:
    """Concatenate rank slices in rank order along the Megatron shard axis (the gathered layout)."""
    return torch.cat(list(shards), dim=megatron_shard_axis(rule, side, shards[0].ndim))

"""How fused projections sit in tensor-parallel shards, and how to take them apart.

Megatron fuses gate and up of a gated MLP in one ``linear_fc1`` tensor. Under (expert-)TP each of
the ``tp`` shards holds ``[gate_i; up_i]``, so the tensor gathered over TP ranks reads
``[gate_0; up_0; gate_1; up_1; ...]`` and a plain ``chunk(2)`` mixes gate and up rows. The same holds
for LoRA B (``linear_out``) of a fused fc1.
"""

from __future__ import annotations

from typing import Any


def split_fused_gate_up(fused: Any, tp_size: int, dim: int = 0) -> tuple[Any, Any]:
    """``(gate, up)`` from a TP-gathered fused fc1 tensor laid out ``[g0; u0; g1; u1; ...]``."""
    import torch

    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    rows = fused.shape[dim]
    if rows % (2 * tp_size) != 0:
        raise ValueError(
            f"a fused gate/up tensor of {rows} rows along dim {dim} cannot be split into gate and up "
            f"over {tp_size} tensor-parallel shards (needs a multiple of {2 * tp_size})"
        )
    if tp_size == 1:
        gate, up = torch.chunk(fused, 2, dim=dim)
        return gate, up
    shards = torch.chunk(fused, tp_size, dim=dim)
    halves = [torch.chunk(shard, 2, dim=dim) for shard in shards]
    gate = torch.cat([h[0] for h in halves], dim=dim)
    up = torch.cat([h[1] for h in halves], dim=dim)
    return gate, up


def merge_fused_gate_up_shards(gate: Any, up: Any, tp_size: int, dim: int = 0) -> Any:
    """Inverse of :func:`split_fused_gate_up`: the TP-gathered fused tensor ``[g0; u0; g1; u1; ...]``."""
    import torch

    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.shape[dim] % tp_size != 0:
        raise ValueError(f"{gate.shape[dim]} gate rows cannot be split over {tp_size} shards")
    parts = []
    for g, u in zip(torch.chunk(gate, tp_size, dim=dim), torch.chunk(up, tp_size, dim=dim), strict=True):
        parts.extend((g, u))
    return torch.cat(parts, dim=dim)

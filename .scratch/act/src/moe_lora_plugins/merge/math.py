"""The merged weight ``W + scale * B @ A`` for one tensor, computed in float32 with one working buffer.

Dense weights are 2-D ``(out, in)`` with ``A (r, in)`` and ``B (out, r)``. Packed expert weights are
3-D ``(E, out, in)`` with per-expert ``A (E, r, in)`` / ``B (E, out, r)`` or a shared 2-D adapter,
and shared-outer adapters mix the two (one side 2-D, the other 3-D). The arithmetic is the one
Megatron-Bridge 0.6.2 uses in ``_merge_single_adapter_weight`` (float32 operands, ``scale * (B @ A)``
added to the float32 base, cast to the export dtype), so results are bitwise equal to it; what differs
is memory: one float32 buffer of the weight's size instead of four, and nothing is written to
``base``, ``lora_a`` or ``lora_b``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_lora_plugins.errors import MoeLoraError


class MergeShapeError(MoeLoraError, ValueError):
    """A base weight and its LoRA factors do not fit together."""


def lora_scale(alpha: float, rank: int) -> float:
    """``alpha / rank``, the factor PEFT and Megatron-Bridge apply to ``B @ A``."""
    if rank <= 0:
        raise MergeShapeError(f"LoRA rank must be positive to compute alpha / rank, got rank={rank}")
    return alpha / rank


def _check_shapes(name: str, base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    if base.ndim not in (2, 3):
        raise MergeShapeError(f"{name}: base weight must be 2-D (out, in) or 3-D (experts, out, in), got {tuple(base.shape)}")
    if lora_a.ndim not in (2, 3) or lora_b.ndim not in (2, 3):
        raise MergeShapeError(
            f"{name}: LoRA factors must be 2-D or 3-D, got A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)}"
        )
    out_features, in_features = base.shape[-2:]
    rank_a, a_in = lora_a.shape[-2:]
    b_out, rank_b = lora_b.shape[-2:]
    problems = []
    if a_in != in_features:
        problems.append(f"A has {a_in} input features, the weight {in_features}")
    if b_out != out_features:
        problems.append(f"B has {b_out} output features, the weight {out_features}")
    if rank_a != rank_b:
        problems.append(f"A has rank {rank_a}, B rank {rank_b}")
    experts = {t.shape[0] for t in (base, lora_a, lora_b) if t.ndim == 3}
    if len(experts) > 1:
        problems.append(f"the expert dimensions differ ({sorted(experts)})")
    if base.ndim == 2 and (lora_a.ndim == 3 or lora_b.ndim == 3):
        problems.append("a 2-D weight cannot take a 3-D (per-expert) adapter: select the expert first")
    if problems:
        raise MergeShapeError(
            f"{name}: weight {tuple(base.shape)}, A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit: "
            + "; ".join(problems)
            + ". Check that the adapter was exported for this weight (same layer, expert and projection)."
        )


@torch.no_grad()
def merged_weight(
    base: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    name: str = "weight",
) -> torch.Tensor:
    """``base + scale * (lora_b @ lora_a)`` computed in float32 and cast to ``out_dtype``.

    ``out_dtype`` defaults to ``base.dtype``. Inputs are never modified and the result carries no
    autograd history (it is a weight to ship, not part of the training graph). The product lands in one
    float32 buffer that is scaled and accumulated in place (the base promoted block by block); for a
    float32 ``out_dtype`` that buffer is the result, otherwise it is cast once and freed. Peak extra
    memory: one float32 copy of the weight plus the result.
    """
    _check_shapes(name, base, lora_a, lora_b)
    out_dtype = base.dtype if out_dtype is None else out_dtype
    work = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    if base.ndim == 2:
        _product_into(work, lora_b, lora_a)
    else:
        # expert by expert, so a packed weight merges bitwise like the same experts exported one by one
        for expert in range(base.shape[0]):
            _product_into(work[expert], expert_factor(lora_b, expert), expert_factor(lora_a, expert))
    work.mul_(scale)
    _add_in_blocks(work, base)
    if out_dtype == torch.float32:
        return work
    return work.to(out_dtype)


ADD_BLOCK_ELEMENTS = 1 << 20


def _add_in_blocks(work: torch.Tensor, base: torch.Tensor) -> None:
    """``work += base`` (float32). A narrower ``base`` is promoted block by block, so the promotion's
    temporary is at most 4 MiB instead of a float32 copy of the whole weight. The promotion is exact
    and IEEE addition is commutative, so this is bitwise ``base.float() + work``."""
    if base.dtype == torch.float32:
        work.add_(base)
        return
    columns = base.shape[-1]
    rows = max(1, ADD_BLOCK_ELEMENTS // max(columns, 1))
    flat_work = work.view(-1, columns)
    flat_base = base.reshape(-1, columns)
    for start in range(0, flat_work.shape[0], rows):
        flat_work[start : start + rows].add_(flat_base[start : start + rows])


def _product_into(out: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor) -> None:
    """``out = B @ A`` with float32 operands (copies only where the factors are not float32 already)."""
    b32 = lora_b.to(device=out.device, dtype=torch.float32)
    a32 = lora_a.to(device=out.device, dtype=torch.float32)
    torch.mm(b32, a32, out=out)


def expert_factor(factor: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s slice of a per-expert 3-D LoRA factor; a shared 2-D factor is returned as is."""
    if factor.ndim == 2:
        return factor
    if not 0 <= expert < factor.shape[0]:
        raise MergeShapeError(f"expert {expert} is outside the adapter's {factor.shape[0]} experts")
    return factor[expert]


def fused_row_blocks(lora_b: torch.Tensor, block_sizes: Sequence[int], shards: int = 1) -> list[torch.Tensor]:
    """Split the rows of a fused ``B`` (gate/up of ``linear_fc1``) into its projections.

    A fused weight gathered from ``shards`` tensor-parallel (or expert-TP) ranks is laid out per shard:
    ``[gate_0; up_0; gate_1; up_1; ...]``. ``block_sizes`` are the *global* row counts of the
    projections in fused order (``[ffn, ffn]`` for gate/up). Returns one tensor per projection with
    its rows in global order, so ``fused_row_blocks(B, [f, f], tp)[0] @ A`` is the delta of the HF
    ``gate_proj``.
    """
    total = sum(block_sizes)
    if lora_b.shape[-2] != total:
        raise MergeShapeError(
            f"fused B has {lora_b.shape[-2]} rows but the projections {list(block_sizes)} add up to {total}"
        )
    if shards < 1 or any(size % shards for size in block_sizes):
        raise MergeShapeError(f"projection rows {list(block_sizes)} do not divide into {shards} shards")
    per_shard = [size // shards for size in block_sizes]
    pieces: list[list[torch.Tensor]] = [[] for _ in block_sizes]
    for shard_rows in lora_b.split(total // shards, dim=-2):
        for index, block in enumerate(shard_rows.split(per_shard, dim=-2)):
            pieces[index].append(block)
    return [torch.cat(blocks, dim=-2) for blocks in pieces]

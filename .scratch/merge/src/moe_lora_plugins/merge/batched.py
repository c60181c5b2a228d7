"""LoRA deltas of a block of experts in one batched matmul, and one expert's merge from its slice.

Megatron-Bridge 0.6.2 merges each expert tensor on its own (``_merge_single_adapter_weight`` and
``LoRAMerge.merge``): A and B are cast to float32 on the base weight's device, the delta is
``(alpha / dim) * (B @ A)`` (one ``mm``, then a multiply by the Python float), the base is upcast to
float32, the two are added and the sum is cast back to the base's dtype: about seven kernels and a
few tens of microseconds of Python per tensor, 192 tensors per MoE layer of 64 experts.

Here the same arithmetic is split in two:

- :func:`batched_deltas`: the float32 deltas of a block of experts of one projection as one
  ``torch.bmm`` of the stacked float32 factors, scaled in place by the same Python float;
- :func:`merge_expert`: one expert's merged weight, ``torch.add(base, delta, out=<base dtype>)``
  (one kernel: the base is promoted to float32 exactly, added in float32 and rounded once to the
  base's dtype, the operations of ``(base.float() + delta).to(base.dtype)``).

The elementwise steps are the same IEEE operations as upstream's. The product equals upstream's
per-expert ``mm`` only if the matmul library reduces each batch entry over the rank in the same
order as the single ``mm``: true of torch's CPU kernels, to be checked for each device. So
:func:`deltas_match_per_expert` recomputes a block expert by expert (upstream's formula) and says
whether the batched result is bitwise the same; the export patch runs it on the first block of each
shape and device and falls back to upstream's per-tensor merge where it is not.
``benchmarks/merge_bitwise_gpu.py`` checks the same on a GPU against Megatron-Bridge's own merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_lora_plugins.merge.math import MergeShapeError

__all__ = [
    "batched_deltas",
    "deltas_match_per_expert",
    "experts_per_block",
    "merge_expert",
    "per_expert_delta",
]


def _check_block(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> None:
    if not lora_a or len(lora_a) != len(lora_b):
        raise MergeShapeError(
            f"a batched LoRA delta needs one A and one B per expert, got {len(lora_a)} A and {len(lora_b)} B"
        )
    shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in zip(lora_a, lora_b, strict=True)}
    if len(shapes) != 1:
        raise MergeShapeError(
            f"the experts of one batched LoRA delta must have the same factor shapes, got {sorted(shapes)}; "
            "merge experts of different shapes in separate blocks"
        )
    (a_shape, b_shape), = shapes
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise MergeShapeError(
            f"each expert needs A (rank, in) and B (out, rank) of the same rank, got A {a_shape} and B {b_shape}"
        )


@torch.no_grad()
def batched_deltas(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scale: float,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``scale * (B[e] @ A[e])`` in float32 for every expert ``e`` of the block, as one ``(E, out, in)`` tensor.

    ``lora_a[e]`` is ``(rank, in)`` and ``lora_b[e]`` ``(out, rank)``, any float dtype, on any device;
    the result lands on ``device`` (default: the factors' device). One ``bmm`` and one in-place multiply
    by the Python float ``scale``, the multiply upstream applies to each expert's ``mm``.
    """
    _check_block(lora_a, lora_b)
    target = lora_a[0].device if device is None else torch.device(device)
    a32 = torch.stack(list(lora_a)).to(device=target, dtype=torch.float32)
    b32 = torch.stack(list(lora_b)).to(device=target, dtype=torch.float32)
    deltas = torch.bmm(b32, a32)
    deltas.mul_(scale)
    return deltas


@torch.no_grad()
def per_expert_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, device: torch.device) -> torch.Tensor:
    """One expert's float32 delta the way Megatron-Bridge 0.6.2 computes it: float32 factors on
    ``device``, ``scale * (B @ A)``."""
    b32 = lora_b.to(device=device, dtype=torch.float32)
    a32 = lora_a.to(device=device, dtype=torch.float32)
    return scale * (b32 @ a32)


@torch.no_grad()
def deltas_match_per_expert(
    deltas: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scale: float
) -> bool:
    """Whether every ``deltas[e]`` is bitwise the per-expert delta of :func:`per_expert_delta`."""
    if deltas.shape[0] != len(lora_a) or len(lora_a) != len(lora_b):
        raise MergeShapeError(
            f"{deltas.shape[0]} deltas cannot be checked against {len(lora_a)} A and {len(lora_b)} B factors"
        )
    return all(
        torch.equal(deltas[e], per_expert_delta(a, b, scale, deltas.device))
        for e, (a, b) in enumerate(zip(lora_a, lora_b, strict=True))
    )


@torch.no_grad()
def merge_expert(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``(base.float() + delta).to(base.dtype)`` as one kernel into a new tensor; ``base`` is not written.

    ``delta`` is float32 with ``base``'s shape, on its device.
    """
    if delta.dtype != torch.float32 or delta.shape != base.shape or delta.device != base.device:
        raise MergeShapeError(
            f"a merge needs a float32 delta of the weight's shape on its device: weight {tuple(base.shape)} "
            f"{base.dtype} on {base.device}, delta {tuple(delta.shape)} {delta.dtype} on {delta.device}"
        )
    if base.dtype == torch.float32:
        return base + delta
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    torch.add(base, delta, out=out)
    return out


def experts_per_block(out_features: int, in_features: int, outputs_per_expert: int, budget_bytes: int) -> int:
    """How many experts' float32 deltas (``outputs_per_expert`` tensors of ``out x in`` each) fit in
    ``budget_bytes``; at least one."""
    if out_features <= 0 or in_features <= 0 or outputs_per_expert <= 0:
        raise MergeShapeError(
            f"a delta block needs positive sizes, got out={out_features}, in={in_features}, "
            f"outputs per expert={outputs_per_expert}"
        )
    per_expert = out_features * in_features * 4 * outputs_per_expert
    return max(1, budget_bytes // per_expert)

"""LoRA of every expert of a MoE layer in one grouped matmul per factor, forward and backward.

The tokens a MoE layer hands its experts arrive sorted by expert: rows ``offs[e-1]:offs[e]`` of ``x``
belong to local expert ``e`` (``tokens_per_expert`` gives the block sizes, zero allowed). Upstream
Megatron-Bridge runs each expert's adapter on its block as two small matmuls, one expert after the
other; :func:`grouped_lora_delta` computes the same thing for all experts at once::

    delta[rows of e] = ((x_e @ A_e^T) @ B_e^T) * scale

in the same order of operations (``A`` first, ``B`` second, the scale multiplied last, in the
tensors' dtype), so each row is the number upstream computes for it. ``A`` is ``[E, r, in]`` (one
per expert) or ``[r, in]`` (shared by all experts); ``B`` is ``[E, out, r]`` or ``[out, r]``. Gradients
reach ``x``, ``A`` and ``B`` through autograd.

Backends (``backend=``):

- ``"grouped_mm"``: ``torch._grouped_mm`` (one kernel per factor on Hopper-class GPUs in bf16; on
  the CPU and elsewhere torch runs it as one mm per group, which is what makes it bitwise equal to
  the per-expert loop there, forward and backward: the core tests check this);
- ``"padded"``: each expert's rows scattered into a zero-padded ``[E, max_rows, in]`` batch and
  one ``bmm`` per factor, for a torch without ``_grouped_mm`` (equal within float rounding:
  ``bmm`` may sum in another order than ``mm``);
- ``"loop"``: one matmul pair per expert, upstream's order of work (the reference);
- ``"auto"``: ``grouped_mm`` where :func:`grouped_mm_supported` says torch runs it for this device,
  dtype and shape; else ``padded`` on a GPU (one kernel per factor) and ``loop`` on the CPU (bitwise
  upstream's there, where launches cost nothing).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import torch

GroupedBackend = Literal["auto", "grouped_mm", "padded", "loop"]
BACKENDS: tuple[str, ...] = ("auto", "grouped_mm", "padded", "loop")


class GroupedLoraShapeError(ValueError):
    """The tokens, the expert blocks and the LoRA factors do not fit together."""


def _counts_list(tokens_per_expert: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(tokens_per_expert, torch.Tensor):
        return [int(n) for n in tokens_per_expert.tolist()]
    return [int(n) for n in tokens_per_expert]


def _check(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, counts: list[int]) -> int:
    if x.dim() != 2:
        raise GroupedLoraShapeError(f"x must be [tokens, in_features], got shape {tuple(x.shape)}")
    if any(n < 0 for n in counts):
        raise GroupedLoraShapeError(f"tokens_per_expert must be >= 0, got {counts}")
    if sum(counts) != x.shape[0]:
        raise GroupedLoraShapeError(
            f"tokens_per_expert sums to {sum(counts)} but x has {x.shape[0]} rows; pass the block sizes "
            "of the expert-sorted tokens"
        )
    experts = len(counts)
    for name, factor in (("lora_a", lora_a), ("lora_b", lora_b)):
        if factor.dim() == 3 and factor.shape[0] != experts:
            raise GroupedLoraShapeError(
                f"{name} has {factor.shape[0]} experts, tokens_per_expert names {experts}"
            )
        if factor.dim() not in (2, 3):
            raise GroupedLoraShapeError(f"{name} must be [E, rows, cols] or [rows, cols], got {tuple(factor.shape)}")
    rank, in_features = lora_a.shape[-2:]
    if in_features != x.shape[1]:
        raise GroupedLoraShapeError(f"lora_a is [.., {rank}, {in_features}] but x has {x.shape[1]} features")
    if lora_b.shape[-1] != rank:
        raise GroupedLoraShapeError(f"lora_b is [.., {lora_b.shape[-2]}, {lora_b.shape[-1]}], rank must be {rank}")
    return experts


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device, non_blocking=True)


@functools.cache
def _grouped_mm_runs(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """Whether this torch runs ``_grouped_mm`` (forward and backward) for the device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        x = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        out = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        out.backward(torch.ones_like(out))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def grouped_mm_supported(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs for these tensors: same dtype everywhere, 16-byte row
    strides (every matrix dimension a multiple of 8 in bf16, of 4 in float32: torch refuses others
    on the CPU too), and a torch that has the op for this device and dtype (probed once each)."""
    if not (x.dtype == lora_a.dtype == lora_b.dtype):
        return False
    per_16_bytes = max(1, 16 // x.element_size())
    dims = (x.shape[1], *lora_a.shape[-2:], *lora_b.shape[-2:])
    if any(d % per_16_bytes for d in dims):
        return False
    return _grouped_mm_runs(x.device.type, x.device.index, x.dtype)


def _project_grouped_mm(h: torch.Tensor, factor: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if factor.dim() == 2:
        return torch.matmul(h, factor.t())
    return torch._grouped_mm(h, factor.transpose(1, 2), offs=offs)


def _delta_grouped_mm(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    offs = _offsets(counts, x.device)
    hidden = _project_grouped_mm(x.contiguous(), a, offs)
    return _project_grouped_mm(hidden, b, offs)


def _delta_loop(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs = []
    for e, x_e in enumerate(torch.split(x, counts)):
        hidden = torch.matmul(x_e, (a[e] if a.dim() == 3 else a).t())
        outs.append(torch.matmul(hidden, (b[e] if b.dim() == 3 else b).t()))
    return torch.cat(outs, dim=0)


def _delta_padded(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    experts, longest = len(counts), max(counts, default=0)
    if longest == 0:
        return x.new_zeros(x.shape[0], b.shape[-2]) + (a.sum() + b.sum()) * 0
    counts_t = torch.tensor(counts, device=x.device)
    expert_of_row = torch.repeat_interleave(torch.arange(experts, device=x.device), counts_t)
    starts = torch.cumsum(counts_t, 0) - counts_t
    slot_of_row = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
    flat_index = expert_of_row * longest + slot_of_row
    padded = x.new_zeros(experts * longest, x.shape[1]).index_copy(0, flat_index, x)
    padded = padded.view(experts, longest, x.shape[1])
    a3 = a if a.dim() == 3 else a.expand(experts, *a.shape)
    b3 = b if b.dim() == 3 else b.expand(experts, *b.shape)
    hidden = torch.bmm(padded, a3.transpose(1, 2))
    out = torch.bmm(hidden, b3.transpose(1, 2))
    return out.reshape(experts * longest, -1).index_select(0, flat_index)


def resolve_backend(backend: GroupedBackend, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> str:
    """The backend ``backend="auto"`` picks for these tensors (other values are returned as given)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if grouped_mm_supported(x, lora_a, lora_b):
        return "grouped_mm"
    return "loop" if x.device.type == "cpu" else "padded"


def grouped_lora_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    tokens_per_expert: Sequence[int] | torch.Tensor,
    scale: float,
    *,
    backend: GroupedBackend = "auto",
) -> torch.Tensor:
    """The LoRA output ``((x_e A_e^T) B_e^T) * scale`` of every expert's block of rows, as one ``[T, out]``.

    ``x`` is ``[T, in]`` sorted by expert, ``tokens_per_expert`` the ``E`` block sizes (a list or a
    tensor). ``lora_a`` ``[E, r, in]`` or shared ``[r, in]``; ``lora_b`` ``[E, out, r]`` or shared
    ``[out, r]``. Differentiable in ``x``, ``lora_a`` and ``lora_b``.
    """
    counts = _counts_list(tokens_per_expert)
    _check(x, lora_a, lora_b, counts)
    chosen = resolve_backend(backend, x, lora_a, lora_b)
    if chosen == "grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError(
                f"backend='grouped_mm' needs torch._grouped_mm, which torch {torch.__version__} lacks; "
                "use backend='auto' or 'padded'"
            )
        out = _delta_grouped_mm(x, lora_a, lora_b, counts)
    elif chosen == "padded":
        out = _delta_padded(x, lora_a, lora_b, counts)
    else:
        out = _delta_loop(x, lora_a, lora_b, counts)
    return out * scale


def stack_expert_factors(weights: Sequence[Any]) -> torch.Tensor:
    """``[E, rows, cols]`` of per-expert ``[rows, cols]`` weights (differentiable: grads reach each one)."""
    if not weights:
        raise GroupedLoraShapeError("no expert weights to stack")
    return torch.stack(list(weights), dim=0)

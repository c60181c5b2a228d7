"""Many merged weights ``(W.float() + scale * (B.float() @ A.float())).to(W.dtype)`` in one kernel launch.

Megatron-Bridge 0.6.2 merges one LoRA-wrapped weight at a time (``_merge_single_adapter_weight`` through
``LoRAMerge.merge``): A and B cast to float32, their product rounded to float32, multiplied by
``alpha / dim`` (rounded again), added to the float32 base (rounded again) and cast back to the base's dtype.
:func:`merge_many` does the same operations in the same order for a list of same-shape weights, each output
element computed from its own row of B and column of A, in one Triton launch that reads every member's
``W``, ``A`` and ``B`` where they lie (a table of their addresses) and writes one fresh stacked tensor.

What it replaces, per block of experts: a ``cat`` of the parameters, a ``bmm`` into a float32 scratch buffer,
a multiply and an add (four launches, a float32 pass over the deltas each, and their host time), plus the
stacking of the group's factors in float32.

The product is summed over the rank by ``tl.dot`` in IEEE float32 where the rank is a power of two >= 16,
otherwise ``k = 0 .. r - 1``, one fused multiply-add each, from zero (the order a GEMM with the whole rank in
one tile sums in). Whether either is the order of the BLAS the caller's ``@`` uses is not assumed here: the caller compares the result with upstream's merge bit for bit before it
uses it (``patches/megatron_bridge/merged_stream.py``). Nothing else is contracted: the kernel is compiled
with floating-point fusion off, so the scale's multiply and the add round on their own, as upstream's do.

Needs Triton and a CUDA device; :func:`available` says whether both are there (``MOELORA_FUSED_MERGE=off``
turns it off). On the CPU, Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported) runs
the same kernel, which is how the CPU tests check its indexing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from moe_lora_plugins.errors import MoeLoraError

# one program's tile of one member's output; the rank is a compile-time constant (the sum is unrolled)
_BLOCK_ROWS = 32
_BLOCK_COLS = 256
_WARPS = 8
# how the rank is summed: "dot" (``tl.dot`` in IEEE float32, where the rank is a power of two >= 16; faster on
# the H200) or "fma" (one fused multiply-add per rank step, any rank); None picks (benchmarks set it)
_SUM: str | None = None


class FusedMergeError(MoeLoraError, ValueError):
    """The weights and factors handed to :func:`merge_many` do not fit the kernel."""


def switched_off() -> bool:
    """``MOELORA_FUSED_MERGE=off`` (a value other than on / off is a ``SettingsError`` naming it)."""
    from moe_lora_plugins.envs import parse_bool

    return not parse_bool("MOELORA_FUSED_MERGE", os.environ.get("MOELORA_FUSED_MERGE"), default=True)


def available(device: Any) -> bool:
    """Whether :func:`merge_many` can run on ``device``: a CUDA device (or Triton's interpreter), Triton
    importable, and not switched off by ``MOELORA_FUSED_MERGE=off``."""
    if switched_off():
        return False
    if getattr(device, "type", None) != "cuda" and not _interpreted():
        return False
    return _kernel() is not None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def _kernel() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit(do_not_specialize=["first"])  # one compiled kernel for every block of a group
    def merge_kernel(out, weights, lora_a, lora_b, first, scale, rows, cols, FACTOR: tl.constexpr,
                     RANK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                     USE_DOT: tl.constexpr):
        member = tl.program_id(2)
        slot = first + member
        weight = tl.load(weights + slot).to(tl.pointer_type(out.dtype.element_ty))
        a_base = tl.load(lora_a + slot).to(tl.pointer_type(FACTOR))
        b_base = tl.load(lora_b + slot).to(tl.pointer_type(FACTOR))
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        row_in = row < rows
        col_in = col < cols
        acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        if USE_DOT:
            k = tl.arange(0, RANK)
            b = tl.load(b_base + row[:, None] * RANK + k[None, :], mask=row_in[:, None], other=0.0).to(tl.float32)
            a = tl.load(a_base + k[:, None] * cols + col[None, :], mask=col_in[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(b, a, acc, input_precision="ieee")
        else:
            for k in tl.static_range(RANK):
                b_k = tl.load(b_base + row * RANK + k, mask=row_in, other=0.0).to(tl.float32)
                a_k = tl.load(a_base + k * cols + col, mask=col_in, other=0.0).to(tl.float32)
                acc = tl.fma(b_k[:, None], a_k[None, :], acc)
        acc = acc * scale
        offsets = row[:, None] * cols + col[None, :]
        inside = row_in[:, None] & col_in[None, :]
        base = tl.load(weight + offsets, mask=inside, other=0.0).to(tl.float32)
        merged = (base + acc).to(out.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(out + member.to(tl.int64) * rows * cols + offsets, merged, mask=inside)

    return merge_kernel


def _sums_by_dot(rank: int) -> bool:
    if _SUM is not None:
        return _SUM == "dot"
    return rank >= 16 and rank & (rank - 1) == 0


def _triton_dtype(dtype: Any) -> Any:
    import torch
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class AddressTable:
    """The addresses of a list of same-shape weights and their A and B, on their device, for
    :func:`merge_many`; :meth:`current` says whether some of them still lie there (a parameter whose ``.data``
    was replaced, say by an offload and reload, needs a new table)."""

    __slots__ = ("a", "b", "factor_dtype", "pointers", "weights")

    def __init__(self, weights: Sequence[Any], lora_a: Sequence[Any], lora_b: Sequence[Any]) -> None:
        import torch

        check_members(weights, lora_a, lora_b)
        self.pointers = [_addresses(tensors) for tensors in (weights, lora_a, lora_b)]
        flat = self.pointers[0] + self.pointers[1] + self.pointers[2]
        table = torch.tensor(flat, dtype=torch.int64).view(3, len(weights)).to(weights[0].device)
        self.weights, self.a, self.b = table[0], table[1], table[2]
        self.factor_dtype = lora_a[0].dtype

    def current(self, weights: Sequence[Any], lora_a: Sequence[Any], lora_b: Sequence[Any], start: int = 0,
                stop: int | None = None) -> bool:
        """Whether members ``start .. stop - 1`` (all by default) still lie where the table says."""
        stop = len(self.pointers[0]) if stop is None else stop
        return all(_addresses(tensors[start:stop]) == known[start:stop]
                   for tensors, known in zip((weights, lora_a, lora_b), self.pointers, strict=True))


def _addresses(tensors: Sequence[Any]) -> list[int]:
    import torch

    return list(map(torch.Tensor.data_ptr, tensors))


def check_members(weights: Sequence[Any], lora_a: Sequence[Any], lora_b: Sequence[Any]) -> None:
    """Raise :class:`FusedMergeError` unless the members fit the kernel: same-length lists of contiguous 2-D
    tensors on one device, every ``W (out, in)``, ``A (r, in)`` and ``B (out, r)`` of one shape and dtype."""
    import torch

    if not weights or len(weights) != len(lora_a) or len(weights) != len(lora_b):
        raise FusedMergeError(
            f"merge_many needs one A and one B per weight, got {len(weights)} weights, {len(lora_a)} A and "
            f"{len(lora_b)} B")
    w0, a0, b0 = weights[0], lora_a[0], lora_b[0]
    if w0.dim() != 2 or a0.dim() != 2 or b0.dim() != 2 or a0.shape[1] != w0.shape[1] \
            or b0.shape != (w0.shape[0], a0.shape[0]):
        raise FusedMergeError(
            f"merge_many needs W (out, in), A (r, in), B (out, r): got W {tuple(w0.shape)}, A {tuple(a0.shape)}, "
            f"B {tuple(b0.shape)}")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if w0.dtype not in floats or a0.dtype not in floats or b0.dtype != a0.dtype:
        raise FusedMergeError(
            f"merge_many handles float32, bfloat16 and float16 weights and A, B of one of those dtypes: got W "
            f"{w0.dtype}, A {a0.dtype}, B {b0.dtype}")
    for name, tensors, first in (("W", weights, w0), ("A", lora_a, a0), ("B", lora_b, b0)):
        for index, tensor in enumerate(tensors):
            if tensor.shape != first.shape or tensor.dtype != first.dtype or tensor.device != w0.device \
                    or not tensor.is_contiguous():
                raise FusedMergeError(
                    f"merge_many's {name} #{index} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} "
                    f"(contiguous: {tensor.is_contiguous()}); every {name} must be contiguous, "
                    f"{tuple(first.shape)} {first.dtype} on {w0.device}")


def merge_many(table: AddressTable, start: int, stop: int, shape: tuple[int, int], rank: int, dtype: Any,
               device: Any, scale: float) -> Any:
    """Members ``start .. stop - 1`` of ``table`` merged: a fresh ``(stop - start, out, in)`` tensor of
    ``dtype`` whose slice ``i`` is ``(W.float() + scale * (B.float() @ A.float())).to(dtype)`` of member
    ``start + i``, each with the values its tensors hold when the kernel runs (in stream order). ``start`` is
    not specialized on, so one compiled kernel serves every block of a group."""
    import torch
    import triton

    kernel = _kernel()
    if kernel is None:
        raise FusedMergeError("merge_many needs Triton; install it or set MOELORA_FUSED_MERGE=off")
    rows, cols = shape
    count = stop - start
    out = torch.empty((count, rows, cols), dtype=dtype, device=device)
    if count == 0:
        return out
    grid = (triton.cdiv(rows, _BLOCK_ROWS), triton.cdiv(cols, _BLOCK_COLS), count)
    kernel[grid](out, table.weights, table.a, table.b, start, scale, rows, cols,
                 FACTOR=_triton_dtype(table.factor_dtype), RANK=rank, BLOCK_ROWS=_BLOCK_ROWS,
                 BLOCK_COLS=_BLOCK_COLS, USE_DOT=_sums_by_dot(rank), num_warps=_WARPS, enable_fp_fusion=False)
    return out

"""The expert-parallel gather plan for an export stream, and byte packing for one-shot transfers.

Each EP rank emits some names that every EP rank emits too (dense tensors, or experts the upstream
code already gathered) and some that only it holds (its own experts). :func:`plan_ep_gather` tells
the two apart from every rank's list of names and refuses anything else (a name emitted by some but
not all ranks, or twice by one rank), so an export can never silently lose or double an expert.
:func:`pack_tensors` / :func:`unpack_tensors` turn a rank's own tensors into one flat byte buffer and
back, bit for bit, so the whole gather is a single ``all_gather``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moe_lora_plugins.errors import MoeLoraError


class EPGatherError(MoeLoraError, ValueError):
    """Expert-parallel ranks disagree about what they export, so no correct gather exists."""


@dataclass(frozen=True)
class EPGatherPlan:
    """``replicated``: names every EP rank emits; ``owned[r]``: names only EP rank ``r`` emits, in its order."""

    replicated: frozenset[str]
    owned: tuple[tuple[str, ...], ...]

    @property
    def ep_size(self) -> int:
        return len(self.owned)

    def owner(self, name: str) -> int | None:
        for rank, names in enumerate(self.owned):
            if name in names:
                return rank
        return None


def _shown(names: Sequence[str], limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def plan_ep_gather(names_by_rank: Sequence[Sequence[str]]) -> EPGatherPlan:
    """Split every EP rank's emitted names into replicated ones and rank-owned ones."""
    if not names_by_rank:
        raise EPGatherError("an expert-parallel gather needs the names of at least one rank")
    for rank, names in enumerate(names_by_rank):
        doubled = [name for name, count in Counter(names).items() if count > 1]
        if doubled:
            raise EPGatherError(f"EP rank {rank} emits these names more than once: {_shown(doubled)}")
    size = len(names_by_rank)
    holders = Counter(name for names in names_by_rank for name in set(names))
    partial = [name for name, count in holders.items() if 1 < count < size]
    if partial:
        raise EPGatherError(
            f"these names are emitted by some but not all of the {size} EP ranks, so they are neither "
            f"replicated nor owned by one rank: {_shown(partial)}"
        )
    replicated = frozenset(name for name, count in holders.items() if count == size) if size > 1 else frozenset()
    owned = tuple(tuple(name for name in names if name not in replicated) for names in names_by_rank)
    if size == 1:
        owned = (tuple(names_by_rank[0]),)
    return EPGatherPlan(replicated=replicated, owned=owned)


TensorMeta = tuple[str, tuple[int, ...], str]  # (name, shape, dtype name)

_ALIGN = 16  # bytes: every tensor starts aligned, so its slice can be viewed as its dtype without a copy


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


_ITEMSIZE: dict[str, int] = {}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None:
        import torch

        itemsize = _ITEMSIZE[dtype] = getattr(torch, dtype).itemsize
    numel = 1
    for size in shape:
        numel *= size
    return numel * itemsize


def tensor_meta(name: str, tensor: Any) -> TensorMeta:
    return name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")


def pack_tensors(tensors: Sequence[Any], device: Any = None) -> Any:
    """One flat ``uint8`` tensor holding the bytes of ``tensors`` back to back, each start 16-byte aligned."""
    import torch

    if not tensors:
        return torch.empty(0, dtype=torch.uint8, device=device)
    parts = []
    for tensor in tensors:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        raw = raw.to(device) if device is not None else raw
        parts.append(raw)
        pad = _padded(raw.numel()) - raw.numel()
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=raw.device))
    return torch.cat(parts)


def packed_nbytes(metas: Sequence[TensorMeta]) -> int:
    """Size of :func:`pack_tensors` output for tensors described by ``metas`` (alignment included)."""
    return sum(_padded(_nbytes(shape, dtype)) for _, shape, dtype in metas)


def unpack_tensors(flat: Any, metas: Sequence[TensorMeta]) -> list[tuple[str, Any]]:
    """Inverse of :func:`pack_tensors`: ``[(name, tensor)]`` viewing slices of ``flat``."""
    import torch

    out: list[tuple[str, Any]] = []
    offset = 0
    for name, shape, dtype in metas:
        nbytes = _nbytes(shape, dtype)
        chunk = flat[offset : offset + nbytes]
        out.append((name, chunk.view(getattr(torch, dtype)).reshape(shape)))
        offset += _padded(nbytes)
    if offset > flat.numel():
        raise EPGatherError(f"packed buffer holds {flat.numel()} bytes, the metadata needs {offset}")
    return out


@dataclass(frozen=True)
class FlatLayout:
    """Where each of a list of same-dtype tensors lies in one flat buffer of that dtype (no padding)."""

    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.numels)


def flat_layout(tensors: Sequence[Any]) -> FlatLayout:
    """The :class:`FlatLayout` of ``tensors``; they must share one dtype (say which do not)."""
    dtypes = {tensor.dtype for tensor in tensors}
    if len(dtypes) > 1:
        raise EPGatherError(
            f"a flat layout needs one dtype, got {sorted(map(str, dtypes))}: group the tensors by dtype first"
        )
    return FlatLayout(tuple(tuple(t.shape) for t in tensors), tuple(t.numel() for t in tensors))


def pack_flat(tensors: Sequence[Any]) -> Any:
    """The elements of same-dtype ``tensors`` back to back in one 1-D tensor (one copy kernel)."""
    import torch

    return torch.cat([tensor.detach().reshape(-1) for tensor in tensors])


def unpack_flat(flat: Any, layout: FlatLayout) -> list[Any]:
    """Inverse of :func:`pack_flat`: views of ``flat`` shaped as ``layout`` says (no copies)."""
    if flat.numel() != layout.numel:
        raise EPGatherError(f"flat buffer holds {flat.numel()} elements, the layout needs {layout.numel}")
    return [part.view(shape) for part, shape in zip(flat.split(layout.numels), layout.shapes, strict=True)]

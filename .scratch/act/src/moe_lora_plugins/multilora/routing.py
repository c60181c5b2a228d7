"""Which adapter each row of a forward pass goes through, and the LoRA delta computed that way.

A forward of the multi-LoRA model runs inside :func:`adapter_routing`: it names, per sample, the slot
of the adapter that sample belongs to. Each LoRA target computes every adapter's delta only on that
adapter's rows (``scale_k * (x_k A_k^T) B_k^T`` on the rows ``x_k`` of adapter ``k``) and nothing for
rows of other adapters, so adapter ``a``'s parameters get gradient only from ``a``'s samples.

Rows are samples for inputs laid out ``[sequence, batch, hidden]`` (dim 1 is the sample). Expert
layers see tokens after the MoE dispatcher has permuted them, so a sample's rows cannot be found
there; they need a routing where every sample of the forward has the same adapter
(:attr:`AdapterRouting.uniform_slot`), which is how the multi-LoRA trainer builds microbatches.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from moe_lora_plugins.errors import MoeLoraError


class RoutingError(MoeLoraError, RuntimeError):
    """A multi-LoRA forward without a routing, or with one that this layer cannot follow."""


@dataclass(frozen=True)
class AdapterRouting:
    """Per-sample adapter slots of the forward being run (a CPU int64 tensor of shape ``(batch,)``)."""

    sample_slots: torch.Tensor

    def __post_init__(self) -> None:
        slots = torch.as_tensor(self.sample_slots, dtype=torch.int64)
        if slots.ndim != 1 or slots.numel() == 0:
            raise RoutingError(f"sample_slots must be a non-empty 1-D tensor, got shape {tuple(slots.shape)}")
        if bool((slots < 0).any()):
            raise RoutingError(f"sample_slots must be slot numbers >= 0, got {slots.tolist()}")
        object.__setattr__(self, "sample_slots", slots)

    @property
    def uniform_slot(self) -> int | None:
        """The slot when every sample has the same adapter, else ``None``."""
        first = int(self.sample_slots[0])
        return first if bool((self.sample_slots == first).all()) else None

    def slots(self) -> list[int]:
        return sorted({int(s) for s in self.sample_slots.tolist()})

    def rows(self, slot: int) -> torch.Tensor:
        return torch.nonzero(self.sample_slots == slot, as_tuple=False).flatten()


_state = threading.local()


@contextlib.contextmanager
def adapter_routing(sample_slots: Sequence[int] | torch.Tensor) -> Iterator[AdapterRouting]:
    """Run the forwards inside with these per-sample adapter slots (nests; restores the outer one)."""
    routing = AdapterRouting(torch.as_tensor(sample_slots, dtype=torch.int64))
    previous = getattr(_state, "routing", None)
    _state.routing = routing
    try:
        yield routing
    finally:
        _state.routing = previous


def current_routing() -> AdapterRouting | None:
    return getattr(_state, "routing", None)


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's LoRA on one linear: ``A`` (rank, in), ``B`` (out, rank) and ``scale`` = alpha / rank."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def lora_delta(x: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
    """``scale * (x A^T) B^T`` on the last dim of ``x``."""
    return (x @ factors.a.t()) @ factors.b.t() * factors.scale


def routed_lora_delta(x: torch.Tensor, adapters: Mapping[int, LoraFactors], routing: AdapterRouting,
                      out_features: int, *, sample_dim: int | None, where: str = "a LoRA target") -> torch.Tensor | None:
    """Each sample's delta through its own adapter; ``None`` when no adapter of the routing is on this target.

    ``sample_dim`` is the dim of ``x`` that indexes samples, or ``None`` when the rows are not samples (expert
    tokens): then the routing must be uniform. Samples of a slot that has no adapter here get no delta.
    """
    present = [s for s in routing.slots() if s in adapters]
    if not present:
        return None
    if sample_dim is None:
        slot = routing.uniform_slot
        if slot is None:
            raise RoutingError(
                f"{where}: its rows are permuted tokens, not samples, so it needs one adapter per forward; the "
                f"routing mixes slots {routing.slots()} (give each microbatch one adapter)"
            )
        return lora_delta(x, adapters[slot])
    if x.shape[sample_dim] != routing.sample_slots.numel():
        raise RoutingError(
            f"{where}: input has {x.shape[sample_dim]} samples on dim {sample_dim}, the routing names "
            f"{routing.sample_slots.numel()}"
        )
    if len(routing.slots()) == 1:
        return lora_delta(x, adapters[present[0]])
    out = x.new_zeros(*x.shape[:-1], out_features)
    for slot in present:
        rows = routing.rows(slot)
        delta = lora_delta(x.index_select(sample_dim, rows), adapters[slot])
        out = out.index_add(sample_dim, rows, delta)
    return out

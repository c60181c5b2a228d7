"""Merge-on-export: LoRA deltas folded into each weight as it streams out, without touching the model.

The trainer exports its adapters (``...q_proj.lora_A.weight`` / ``lora_B.weight``, small) and then its
base weights one tensor at a time (``...q_proj.base_layer.weight`` for LoRA-wrapped layers). Each
base weight that has an adapter leaves as ``W + scale * B @ A`` (float32 arithmetic, cast to the
export dtype) under the plain HF name; everything else passes through untouched. No parameter is
mutated and no copy of the model is kept: the only memory held across the stream is the adapter
table, which shrinks as its entries are used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from moe_lora_plugins.errors import MoeLoraError
from moe_lora_plugins.merge.math import merged_weight

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
BASE_LAYER_TOKEN = ".base_layer"


class MergeStreamError(MoeLoraError, ValueError):
    """The adapter stream and the base-weight stream do not describe the same model."""


@dataclass
class AdapterFactors:
    """LoRA ``A`` (rank x in) and ``B`` (out x rank) of one HF weight (3-D for packed experts)."""

    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None


def module_key(hf_name: str) -> str:
    """The HF module path a weight or LoRA factor belongs to: ``...q_proj`` for all of
    ``...q_proj.weight``, ``...q_proj.base_layer.weight``, ``...q_proj.lora_A.weight``; packed names
    without ``.weight`` (``...experts.gate_up_proj``) are their own key."""
    for suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX):
        if hf_name.endswith(suffix):
            return hf_name[: -len(suffix)]
    name = hf_name.replace(BASE_LAYER_TOKEN, "")
    return name[: -len(".weight")] if name.endswith(".weight") else name


def plain_name(hf_name: str) -> str:
    """The weight's name as the engine knows it (the ``.base_layer`` token of PEFT wrapping removed)."""
    return hf_name.replace(BASE_LAYER_TOKEN, "")


class AdapterTable:
    """LoRA factors keyed by :func:`module_key`, filled from an adapter export stream."""

    def __init__(self) -> None:
        self._factors: dict[str, AdapterFactors] = {}

    @classmethod
    def from_stream(cls, adapter_weights: Iterable[tuple[Any, ...]]) -> AdapterTable:
        """Collect ``(hf_name, tensor[, ...])`` items of a PEFT-named adapter export."""
        table = cls()
        for item in adapter_weights:
            table.add(item[0], item[1])
        return table

    def add(self, hf_name: str, tensor: torch.Tensor) -> None:
        if hf_name.endswith(LORA_A_SUFFIX):
            side = "lora_a"
        elif hf_name.endswith(LORA_B_SUFFIX):
            side = "lora_b"
        else:
            raise MergeStreamError(
                f"adapter stream item {hf_name!r} is neither a {LORA_A_SUFFIX} nor a {LORA_B_SUFFIX}; "
                "pass the output of export_adapter_weights (PEFT names)."
            )
        factors = self._factors.setdefault(module_key(hf_name), AdapterFactors())
        previous = getattr(factors, side)
        if previous is not None and not torch.equal(previous, tensor):
            raise MergeStreamError(
                f"{hf_name} arrived twice with different values. Two ranks exported different adapters "
                "under one name (the Megatron-Bridge EP naming bug: local expert indices not renumbered to "
                "global ones); activate moe-lora-plugins' export patches before exporting."
            )
        setattr(factors, side, tensor.detach())

    def pop(self, key: str) -> AdapterFactors | None:
        factors = self._factors.pop(key, None)
        if factors is not None and (factors.lora_a is None or factors.lora_b is None):
            missing = LORA_A_SUFFIX if factors.lora_a is None else LORA_B_SUFFIX
            raise MergeStreamError(f"adapter of {key} has no {missing}; the adapter export was incomplete")
        return factors

    def keys(self) -> list[str]:
        return sorted(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for f in self._factors.values()
            for t in (f.lora_a, f.lora_b)
            if t is not None
        )


def merge_weight_stream(
    base_weights: Iterable[tuple[Any, ...]],
    adapters: AdapterTable,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Yield each base-weight item with its adapter merged in, keeping the item's arity.

    Items are ``(hf_name, tensor)`` (upstream Megatron-Bridge) or ``(hf_name, tensor, megatron_name)``
    (the slime / miles fork); the name leaves without ``.base_layer``. A LoRA-wrapped weight without an
    adapter, or an adapter whose weight never streams by, raises :class:`MergeStreamError` at the point
    it is detected, because serving a silently unmerged weight is worse than failing the sync.
    """
    for item in base_weights:
        hf_name, tensor = item[0], item[1]
        key = module_key(hf_name)
        factors = adapters.pop(key)
        if factors is None:
            if BASE_LAYER_TOKEN in hf_name:
                raise MergeStreamError(
                    f"{hf_name} is a LoRA-wrapped weight but the adapter export has no factors for {key}; "
                    "export adapters and base weights from the same model in the same step."
                )
            out = tensor if out_dtype is None or tensor.dtype == out_dtype else tensor.to(out_dtype)
        else:
            out = merged_weight(tensor, factors.lora_a, factors.lora_b, scale, out_dtype, name=hf_name)
            del factors
        yield (plain_name(hf_name), out, *item[2:])
    if len(adapters):
        raise MergeStreamError(
            f"{len(adapters)} adapters were exported for weights that never streamed: {adapters.keys()[:8]}. "
            "The adapter names and the base-weight names disagree (an export naming bug or a filtered export)."
        )

"""Merged-weight export from a Megatron-Bridge model: adapters first, then base weights merged as they stream.

Duck-typed over the bridge (``AutoBridge`` or a model bridge with ``export_adapter_weights`` and
``export_hf_weights``), so this module imports no Megatron. Every trainer rank must call it together:
both exports are collective.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from moe_lora_plugins.merge.stream import AdapterTable, merge_weight_stream


def stream_merged_hf_weights(
    bridge: Any,
    model: Sequence[Any],
    scale: float,
    out_dtype: torch.dtype | None = None,
    cpu: bool = True,
) -> Iterator[tuple[Any, ...]]:
    """Yield ``(hf_name, W + scale * B @ A)`` for every weight of ``model`` (unwrapped weights pass through).

    ``scale`` is ``lora_alpha / lora_rank``. Nothing in the model is modified and no copy of it is kept:
    the adapters are collected once (their own size), then each base tensor is merged while it streams.
    """
    adapters = AdapterTable.from_stream(bridge.export_adapter_weights(list(model), cpu=cpu, show_progress=False))
    base = bridge.export_hf_weights(list(model), cpu=cpu, show_progress=False, merge_adapter_weights=False)
    yield from merge_weight_stream(base, adapters, scale, out_dtype)

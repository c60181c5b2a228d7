"""Merged-weight export from a Megatron-Bridge model: adapters first, then base weights merged as they stream.

Duck-typed over the bridge (``AutoBridge`` or a model bridge with ``export_adapter_weights`` and
``export_hf_weights``), so this module imports no Megatron. Every trainer rank must call it together:
both exports are collective.

The merged stream is what leaves the trainer, so it (and not the two exports it reads) goes through
the plugins' ``on_export_weights`` chain, kind ``merged``: the one call of this core module into the
hook layer, imported when the stream starts.
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
    from moe_lora_plugins.hooks.streams import export_stream

    return export_stream(_merged(bridge, list(model), scale, out_dtype, cpu), "merged", model=list(model), bridge=bridge)


def _merged(bridge: Any, model: list[Any], scale: float, out_dtype: torch.dtype | None, cpu: bool) -> Iterator[tuple[Any, ...]]:
    from moe_lora_plugins.hooks.streams import inner_exports

    with inner_exports(model):
        adapters = AdapterTable.from_stream(bridge.export_adapter_weights(model, cpu=cpu, show_progress=False))
        base = bridge.export_hf_weights(model, cpu=cpu, show_progress=False, merge_adapter_weights=False)
        yield from merge_weight_stream(base, adapters, scale, out_dtype)

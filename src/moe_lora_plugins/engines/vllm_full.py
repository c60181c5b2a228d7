"""Merged (full) weights into a running vLLM engine, chunk by chunk, through ``collective_rpc``.

vLLM's own in-place reload (``vllm.model_executor.model_loader.reload``) is split over RPCs: the first
call starts a layerwise reload session in every worker, each chunk of at most ``max_bytes`` goes to the
model's own ``load_weights`` (vLLM's loader: it fuses q/k/v and gate/up, shards for TP, places experts,
and repacks each layer for its kernels once the layer is complete), and the last call finalizes the
session. Names are the HF names a merge-on-export stream yields. Duck-typed over ``vllm.LLM``; the
worker-side functions import vLLM inside the worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from moe_lora_plugins.engines.payloads import DEFAULT_CHUNK_BYTES, chunk_by_bytes


def begin_reload_in_worker(worker: Any) -> None:
    """Runs inside a vLLM worker: start a layerwise in-place reload session of its model."""
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    initialize_layerwise_reload(worker.model_runner.get_model())


def load_chunk_into_worker(worker: Any, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside a vLLM worker: load one chunk with the model's own loader; returns how many it took."""
    loaded = worker.model_runner.get_model().load_weights(iter(named_tensors))
    return len(loaded) if loaded is not None else len(named_tensors)


def finish_reload_in_worker(worker: Any) -> None:
    """Runs inside a vLLM worker: finish the reload session and drop state derived from old weights."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    runner = worker.model_runner
    finalize_layerwise_reload(runner.get_model(), runner.vllm_config.model_config)
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        if hasattr(runner, reset):
            getattr(runner, reset)()


def sync_full_weights(llm: Any, weights: Iterable[tuple[Any, ...]], max_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, int]:
    """Send a full-weight stream to every worker of ``llm`` in byte-bounded chunks.

    The reload session is finished also when a chunk fails (the error is re-raised), so the workers are
    never left inside a half-open session; the prefix cache is dropped after a successful sync because
    its KV was computed with the old weights. Returns chunk, tensor and byte counts.
    """
    chunks = tensors = nbytes = 0
    llm.collective_rpc(begin_reload_in_worker)
    try:
        for chunk in chunk_by_bytes(weights, max_bytes):
            llm.collective_rpc(load_chunk_into_worker, args=(chunk,))
            chunks += 1
            tensors += len(chunk)
            nbytes += sum(t.numel() * t.element_size() for _, t in chunk)
    finally:
        llm.collective_rpc(finish_reload_in_worker)
    llm.reset_prefix_cache()
    return {"chunks": chunks, "tensors": tensors, "bytes": nbytes}

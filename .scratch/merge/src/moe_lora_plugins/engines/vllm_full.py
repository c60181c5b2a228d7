"""Merged (full) weights into a running vLLM engine, chunk by chunk, through ``collective_rpc``.

A sync is stage, verify, commit. The trainer's stream is consumed completely first, chunk by chunk of
at most ``max_bytes``, and every chunk is staged on the CPU of every worker, the model untouched; an
export audit that fails at the end of the stream (or any chunk that fails to stage) drops what was
staged and leaves the engine as it was. Then each worker commits: it keeps what it serves from (a CPU
copy of every tensor, and the modules' own attributes such as the CPU backend's packed-weight
closures), runs vLLM's own in-place reload (``vllm.model_executor.model_loader.reload``: a layerwise
reload session, the model's own ``load_weights`` for every staged chunk, which fuses q/k/v and gate/up,
shards for TP, places experts and repacks each layer for its kernels, then the finalize step), and if
any chunk fails there it puts the kept state back, so the engine serves exactly the previous
weights. The prefix cache is dropped only after a successful commit (its KV was computed with the old
weights; after a rollback it still matches them). Memory: the staged weights and the kept copy live on
each worker's CPU for the duration of the sync. Names are the HF names a merge-on-export stream yields.
Duck-typed over ``vllm.LLM``; the worker-side functions import vLLM inside the worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from moe_lora_plugins.engines.payloads import DEFAULT_CHUNK_BYTES, chunk_by_bytes

_STAGE = "_moelora_full_weight_stage"
_KEPT = "_moelora_full_weight_kept"


def stage_chunk_in_worker(worker: Any, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside a vLLM worker: keep one chunk on the CPU for the commit; the model is not touched."""
    stage = getattr(worker, _STAGE, None)
    if stage is None:
        stage = {"chunks": [], "names": set()}
        setattr(worker, _STAGE, stage)
    repeated = [name for name, _ in named_tensors if name in stage["names"]]
    if repeated:
        raise ValueError(f"full-weight sync: {repeated[:4]} arrived twice; every tensor must be sent once")
    stage["names"].update(name for name, _ in named_tensors)
    stage["chunks"].append([(name, tensor.detach().to("cpu")) for name, tensor in named_tensors])
    return len(named_tensors)


def discard_stage_in_worker(worker: Any) -> None:
    """Runs inside a vLLM worker: drop what a failed sync staged."""
    if hasattr(worker, _STAGE):
        delattr(worker, _STAGE)


class _ServedState:
    """What a worker's model serves from, kept so a failed or abandoned commit can be undone exactly.

    Per module: which parameter / buffer objects it holds and its plain attributes (the CPU backend,
    for one, serves linear layers from packed weights captured in a ``cpu_linear`` closure that its
    weight processing replaces), plus a CPU copy of every tensor's values (GPU kernels are processed
    in place into the same storage).
    """

    _STRUCTURE = ("_parameters", "_buffers", "_modules")

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = [
            (module, {k: v for k, v in vars(module).items() if k not in self._STRUCTURE},
             dict(module._parameters), dict(module._buffers))
            for module in model.modules()
        ]
        seen: set[int] = set()
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _, _, params, buffers in self.modules:
            for tensor in [*params.values(), *buffers.values()]:
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    self.tensors.append((tensor, tensor.detach().to("cpu", copy=True)))

    def restore(self) -> None:
        for module, attributes, params, buffers in self.modules:
            for name in [k for k in vars(module) if k not in self._STRUCTURE and k not in attributes]:
                delattr(module, name)
            vars(module).update(attributes)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
        with torch.no_grad():
            for tensor, previous in self.tensors:
                tensor.copy_(previous)


def _finish_session(runner: Any) -> None:
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    finalize_layerwise_reload(runner.get_model(), runner.vllm_config.model_config)
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        if hasattr(runner, reset):  # optional per runner kind (encoder / multimodal state)
            getattr(runner, reset)()


def commit_stage_in_worker(worker: Any) -> int:
    """Runs inside a vLLM worker: load every staged chunk through vLLM's in-place reload, all or nothing.

    Returns how many tensors the model's loader took. If a chunk fails, the tensors the model served
    before are copied back (exactly) and the error is raised. On success the copy is kept until
    :func:`release_kept_in_worker` (every worker committed) or :func:`rollback_in_worker` (one did not).
    """
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    stage = getattr(worker, _STAGE, None)
    if stage is None:
        raise RuntimeError("full-weight sync: nothing staged in this worker; stage chunks before committing")
    delattr(worker, _STAGE)
    runner = worker.model_runner
    model = runner.get_model()
    kept = _ServedState(model)
    loaded = 0
    initialize_layerwise_reload(model)
    try:
        for chunk in stage["chunks"]:
            taken = model.load_weights(iter(chunk))
            loaded += len(taken) if taken is not None else len(chunk)
    except BaseException:
        _finish_session(runner)
        kept.restore()
        raise
    _finish_session(runner)
    setattr(worker, _KEPT, kept)
    return loaded


def rollback_in_worker(worker: Any) -> bool:
    """Runs inside a vLLM worker: serve the weights from before the commit again (another worker failed)."""
    kept = getattr(worker, _KEPT, None)
    if kept is None:
        return False
    delattr(worker, _KEPT)
    kept.restore()
    return True


def release_kept_in_worker(worker: Any) -> None:
    """Runs inside a vLLM worker: every worker committed; drop the copy of the previous weights."""
    if hasattr(worker, _KEPT):
        delattr(worker, _KEPT)


def sync_full_weights(llm: Any, weights: Iterable[tuple[Any, ...]], max_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, int]:
    """Send a full-weight stream to every worker of ``llm``: stage it all, then commit it, all or nothing.

    A stream that raises (its export audit at the end, say) or a chunk that fails to stage leaves the
    engine untouched; a chunk the model's loader refuses at commit leaves it serving exactly the previous
    weights. Either way the error is re-raised and the prefix cache stays as it was (it matches the
    weights served). After a successful commit the prefix cache is dropped. Returns chunk, tensor and
    byte counts.
    """
    chunks = tensors = nbytes = 0
    try:
        for chunk in chunk_by_bytes(weights, max_bytes):
            llm.collective_rpc(stage_chunk_in_worker, args=(chunk,))
            chunks += 1
            tensors += len(chunk)
            nbytes += sum(t.numel() * t.element_size() for _, t in chunk)
    except BaseException:
        llm.collective_rpc(discard_stage_in_worker)
        raise
    try:
        llm.collective_rpc(commit_stage_in_worker)
    except BaseException:
        llm.collective_rpc(rollback_in_worker)  # workers that did commit go back too: all or nothing
        raise
    llm.collective_rpc(release_kept_in_worker)
    llm.reset_prefix_cache()
    return {"chunks": chunks, "tensors": tensors, "bytes": nbytes}

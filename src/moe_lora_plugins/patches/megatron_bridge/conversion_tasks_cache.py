"""Patch: an export of the same model reuses its conversion tasks instead of rebuilding them every call.

Wraps ``MegatronModelBridge.build_conversion_tasks``. Every ``export_hf_weights`` call rebuilds the
list of conversion tasks upstream: a walk of every parameter and persistent buffer of every model
chunk, a mapping lookup, a module lookup and a task object per parameter. A host that syncs weights
every step pays it every step (on the CPU test model it is more than half of a plain export; the
parameter names it needs are already cached by upstream after the first call, so it runs no
collective). The tasks only hold references to the model's modules and parameters and the mapping
objects, so for the same bridge, HF metadata, model chunks and export dtype they are the same list.

The wrapper keeps the last list per (bridge, HF metadata, model chunks, dtype) and returns a copy of
it while every parameter and buffer of the chunks is still the same object and the name and mapping
functions in force are the ones it was built with (so applying or reverting another patch rebuilds);
otherwise it builds again through upstream. The cache drops an entry when its model chunks are
garbage-collected. The export stream reads the parameters' current values, so new weights after an
optimizer step are exported as upstream exports them.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.conversion_tasks_cache",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.model_bridge",
        attribute="MegatronModelBridge.build_conversion_tasks",
        kind="wrap",
        implementation="moe_lora_plugins.patches.megatron_bridge.conversion_tasks_cache:build_conversion_tasks",
        fingerprint="(self, hf_pretrained, megatron_model, weight_dtype=)",
        why=(
            "Every export rebuilds its conversion tasks (a walk and a lookup per parameter), though they only "
            "reference the model's modules and parameters: more than half of a plain export's time on the CPU "
            "test model, paid at every weight sync of an RL host."
        ),
        upstream="Megatron-Bridge 0.6.2 model_bridge.MegatronModelBridge.build_conversion_tasks (called by "
        "stream_weights_megatron_to_hf on every export)",
        remove_when="Megatron-Bridge caches conversion tasks per model",
        verified="megatron-bridge 0.6.2: CPU, repeated plain and merged exports bitwise equal to upstream's, a "
        "replaced parameter rebuilds the tasks, an optimizer step's new values are exported; 1xH200 export "
        "benchmark (benchmarks/RESULTS-export.md).",
    ),
)


class _Entry:
    __slots__ = ("fingerprint", "tasks")

    def __init__(self, fingerprint: tuple[Any, ...], tasks: list[Any]) -> None:
        self.fingerprint = fingerprint
        self.tasks = tasks


_cache: dict[tuple[Any, ...], _Entry] = {}


def _chunks(megatron_model: Any) -> list[Any]:
    return list(megatron_model) if isinstance(megatron_model, (list, tuple)) else [megatron_model]


def _fingerprint(instance: Any, chunks: list[Any]) -> tuple[Any, ...]:
    import megatron.bridge.models.conversion.model_bridge as model_bridge

    tensors = tuple(id(t) for chunk in chunks for t in itertools.chain(chunk.parameters(), chunk.buffers()))
    functions = (
        getattr(type(instance), "mapping_registry", None),
        getattr(model_bridge, "_megatron_local_name_to_global", None),
    )
    return tensors + functions


def _forget(key: tuple[Any, ...]) -> None:
    _cache.pop(key, None)


def build_conversion_tasks(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Upstream's tasks, built once per model and reused while the model's tensors are the same objects."""
    from moe_lora_plugins.patches.megatron_bridge._export_common import bind_call

    call = bind_call(wrapped, args, kwargs)
    hf_pretrained, megatron_model = call["hf_pretrained"], call["megatron_model"]
    chunks = _chunks(megatron_model)
    key = (id(instance), id(hf_pretrained), tuple(id(c) for c in chunks), call.get("weight_dtype"))
    fingerprint = _fingerprint(instance, chunks)
    entry = _cache.get(key)
    if entry is not None and entry.fingerprint == fingerprint:
        # upstream records the HF metadata on the bridge while building; so does a reuse
        instance.hf_pretrained = hf_pretrained
        instance.hf_config = hf_pretrained.config if hasattr(hf_pretrained, "config") else hf_pretrained
        return list(entry.tasks)
    tasks = wrapped(*args, **kwargs)
    if entry is None:
        for chunk in chunks:
            weakref.finalize(chunk, _forget, key)
    _cache[key] = _Entry(fingerprint, list(tasks))
    return tasks

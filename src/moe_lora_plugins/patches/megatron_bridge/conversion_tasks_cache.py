"""Patch: an export of the same model reuses its conversion tasks instead of rebuilding them every call.

Wraps ``MegatronModelBridge.build_conversion_tasks``. ``AutoBridge.export_hf_weights`` makes a new
``MegatronModelBridge`` on every call (its ``_model_bridge`` is a property that builds one), so
upstream's own cache of the global parameter names never survives a call: every export walks every
parameter and persistent buffer of every chunk twice, gathers the names over the pipeline group
(``all_gather_object``), and builds a mapping lookup, a module lookup and a task object per parameter.
A host that syncs weights every step pays it every step: more than half of a plain export on the CPU
test model. The tasks only hold references to the model's modules and parameters and the mapping
objects, so for the same bridge class, HF metadata, model chunks and export dtype they are the same
list.

The wrapper keeps the last list per (bridge class, HF metadata, model chunks, dtype) and returns a
copy while every module of the chunks still holds the same parameter, buffer and submodule objects
under the same names (a :class:`~moe_lora_plugins.topology.module_tree.ModuleTreeSnapshot`: slot dicts
compared by identity at C speed, no ``named_modules`` walk per call) and the name and mapping functions
in force are the ones it was built with (so applying or reverting another patch rebuilds). Under pipeline parallelism the ranks of the pipeline group agree first (one all-reduce of
a flag): they reuse only if every rank can, otherwise every rank builds again, so upstream's gather
inside the build is always entered by all of them. The cache drops an entry when its model chunks
are garbage-collected. The export stream reads the parameters' current values, so new weights after
an optimizer step are exported as upstream exports them.

A merged export (``merge_adapter_weights=True``, upstream's default) also rebuilds its adapter merge
tasks every call (``MegatronPeftBridge.build_adapter_conversion_tasks``: a walk of every parameter
with a module lookup per adapter, an ``all_gather_object`` of the adapter list over the pipeline
group, two mapping and task objects per adapter); they too only reference the adapter modules and
parameters, so the second spec keeps them the same way (keyed also by the excluded prefixes). The
adapters' ``alpha`` and ``dim`` are read into the tasks when they are built; Megatron-Bridge fixes
them when it wraps a module, and a model whose adapters are replaced has new parameters, so rebuilds.

Inside the per-layer merged stream (``merged_stream``), whose export checks the conversion tasks and then,
with no other code in between, has upstream build its adapter tasks, the adapter entry is not checked
again when it was last checked (or built) together with that very conversion-task entry: the module tree
equals that entry's snapshot now and did then, so it equals the adapter entry's. Any other adapter entry
is checked as always, and then paired with the conversion-task entry of the call. The adapters that
stream merges itself are left out of the returned dict.
"""

from __future__ import annotations

import collections
import inspect
import threading
import weakref
from typing import Any

from moe_lora_plugins.registry import PatchSpec
from moe_lora_plugins.topology.module_tree import ModuleTreeSnapshot

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
            "Every export_hf_weights call makes a new model bridge and rebuilds its conversion tasks (two walks "
            "of every parameter, a gather of the names over the pipeline group, a lookup per parameter), though "
            "they only reference the model's modules and parameters: more than half of a plain export's time on "
            "the CPU test model, paid at every weight sync of an RL host."
        ),
        upstream="Megatron-Bridge 0.6.2 model_bridge.MegatronModelBridge.build_conversion_tasks (called by "
        "stream_weights_megatron_to_hf on every export)",
        remove_when="Megatron-Bridge caches conversion tasks per model (and keeps one model bridge per AutoBridge)",
        verified="megatron-bridge 0.6.2: CPU gloo world size 1, EP=2 and PP=2, repeated plain and merged exports "
        "bitwise equal to rebuilt tasks', a replaced parameter rebuilds the tasks, an optimizer step's new values "
        "are exported; the validity check sees every replaced, added, removed or renamed parameter, buffer or "
        "submodule (tests/core/test_topology_module_tree.py); 1xH200 export benchmark "
        "(benchmarks/RESULTS-export.md).",
        requires=("megatron.bridge.models.conversion.model_bridge:_get_pp_group",),
    ),
    PatchSpec(
        id="megatron_bridge.adapter_conversion_tasks_cache",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.peft_bridge",
        attribute="MegatronPeftBridge.build_adapter_conversion_tasks",
        kind="wrap",
        implementation="moe_lora_plugins.patches.megatron_bridge.conversion_tasks_cache:build_adapter_conversion_tasks",
        fingerprint="(self, megatron_model, exclude_adapter_base_prefixes=)",
        why=(
            "Every merged export (export_hf_weights' default) rebuilds the adapter merge tasks on a new model "
            "bridge: a walk of every parameter, a module lookup per adapter and an all_gather_object over the "
            "pipeline group, though the tasks only reference the adapter modules and parameters. On the CPU test "
            "model it is most of what a merged export costs beyond a plain one."
        ),
        upstream="Megatron-Bridge 0.6.2 peft_bridge.MegatronPeftBridge.build_adapter_conversion_tasks (called by "
        "stream_weights_megatron_to_hf when merge_adapter_weights=True)",
        remove_when="Megatron-Bridge caches adapter conversion tasks per model (and keeps one model bridge per "
        "AutoBridge)",
        verified="megatron-bridge 0.6.2: CPU gloo world size 1, EP=2 and PP=2: repeated merged exports bitwise "
        "equal to upstream's, a replaced adapter parameter rebuilds the tasks, an optimizer step's new adapter "
        "values are merged.",
        requires=("megatron.bridge.models.conversion.model_bridge:_get_pp_group",),
    ),
)


class _Entry:
    __slots__ = ("functions", "model", "paired", "tasks")
    # paired (adapter entries): the conversion-task entry that was valid for the same model tree when this
    # one was last built or checked, within one merged export (see ``last_checked_entry``)

    def __init__(self, functions: tuple[Any, ...], model: Any, tasks: Any) -> None:
        self.functions = functions
        self.model = model
        self.tasks = tasks
        self.paired: Any = None

    def still_valid(self, functions: tuple[Any, ...], chunks: list[Any]) -> bool:
        return self.functions == functions and self.model.unchanged(chunks)


_cache: dict[tuple[Any, ...], _Entry] = {}
_checked = threading.local()  # .entry: the conversion-task entry this thread's last build call returned


def last_checked_entry() -> Any:
    """The conversion-task cache entry that this thread's last ``build_conversion_tasks`` call built or found
    valid (``None`` if it went to upstream uncached): a merged export that calls it and, with no other code in
    between, builds its adapter tasks may let the adapter cache trust an adapter entry checked together with
    this entry before (:func:`build_adapter_conversion_tasks`), instead of walking the module tree again."""
    return getattr(_checked, "entry", None)


def _chunks(megatron_model: Any) -> list[Any]:
    return list(megatron_model) if isinstance(megatron_model, (list, tuple)) else [megatron_model]


def _cacheable(chunks: list[Any]) -> bool:
    """Only real modules are cached: anything else (a test's stand-in, a wrapper we do not know) goes to
    upstream on every call, unchanged."""
    import torch

    return bool(chunks) and all(isinstance(chunk, torch.nn.Module) for chunk in chunks)


def _functions(instance: Any) -> tuple[Any, ...]:
    """The name and mapping functions in force for ``instance``: the bridge class's mapping registry, the
    module-level name globalization, and functions set on the bridge object itself (a host's or a test's
    override of a method)."""
    import megatron.bridge.models.conversion.model_bridge as model_bridge

    functions = (
        getattr(type(instance), "mapping_registry", None),
        getattr(model_bridge, "_megatron_local_name_to_global", None),
    )
    overrides = tuple(
        sorted((name, id(value)) for name, value in vars(instance).items()
               if inspect.isfunction(value) or inspect.ismethod(value))
    ) if hasattr(instance, "__dict__") else ()
    return functions + overrides


def _forget(key: tuple[Any, ...]) -> None:
    _cache.pop(key, None)


def _remember(key: tuple[Any, ...], chunks: list[Any], entry: _Entry) -> None:
    """Keep ``entry`` for ``key`` (dropped when one of the chunks is garbage-collected)."""
    if key not in _cache:
        for chunk in chunks:
            weakref.finalize(chunk, _forget, key)
    _cache[key] = entry


def _every_pipeline_rank_agrees(megatron_model: Any, reusable: bool) -> bool:
    """``reusable`` on every rank of the pipeline group (one all-reduce when the group has > 1 rank)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return reusable
    from megatron.bridge.models.conversion.model_bridge import _get_pp_group

    group = _get_pp_group(megatron_model)
    if group is None or dist.get_world_size(group) <= 1:
        return reusable
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([1 if reusable else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _reuse_or_build(wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any], instance: Any,
                    megatron_model: Any, key: tuple[Any, ...], checked_with: Any = None) -> tuple[Any, bool]:
    """The cached value for ``key`` (and True) while the model's tensors are the same objects on every pipeline
    rank, else upstream's freshly built one (and False), which is remembered.

    ``checked_with``: a conversion-task entry found valid for this model tree moments ago, in this call (a
    merged export). An entry last checked together with that same entry is valid without walking the tree
    again (the tree equals that entry's snapshot now and did then, so it equals this entry's); an entry
    checked or built now is paired with it."""
    chunks = _chunks(megatron_model)
    if not _cacheable(chunks):
        return wrapped(*args, **kwargs), False
    functions = _functions(instance)
    entry = _cache.get(key)
    reusable = entry is not None and entry.functions == functions and (
        (checked_with is not None and entry.paired is checked_with) or entry.model.unchanged(chunks)
    )
    if _every_pipeline_rank_agrees(megatron_model, reusable):
        entry.paired = checked_with
        return entry.tasks, True
    built = wrapped(*args, **kwargs)
    entry = _Entry(functions, ModuleTreeSnapshot(chunks), built)
    entry.paired = checked_with
    _remember(key, chunks, entry)
    return built, False


def build_adapter_conversion_tasks(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Upstream's adapter merge tasks, built once per model and reused while the model's tensors are the same
    objects (a fresh dict of fresh lists each call: callers may change it)."""
    from moe_lora_plugins.patches.megatron_bridge._export_common import bind_call

    call = bind_call(wrapped, args, kwargs)
    megatron_model = call["megatron_model"]
    from moe_lora_plugins.patches.megatron_bridge.merged_stream import claim_exclusion

    exclusion = claim_exclusion()  # inside a per-layer merged stream: the adapters it merges itself
    excluded = tuple(call.get("exclude_adapter_base_prefixes") or ())
    key = ("adapter", type(instance), tuple(id(c) for c in _chunks(megatron_model)), excluded)
    tasks, _ = _reuse_or_build(wrapped, args, kwargs, instance, megatron_model, key,
                               checked_with=exclusion.conversion_entry if exclusion is not None else None)
    if not isinstance(tasks, dict):
        return tasks  # not what 0.6 returns: handed on as it is
    merged_elsewhere = exclusion.prefixes if exclusion is not None else frozenset()
    out: collections.defaultdict[str, list[Any]] = collections.defaultdict(list)
    out.update((base, list(items)) for base, items in tasks.items() if base not in merged_elsewhere)
    return out


def build_conversion_tasks(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Upstream's tasks, built once per model and reused while the model's tensors are the same objects."""
    from moe_lora_plugins.patches.megatron_bridge._export_common import bind_call

    call = bind_call(wrapped, args, kwargs)
    hf_pretrained, megatron_model = call["hf_pretrained"], call["megatron_model"]
    chunks = _chunks(megatron_model)
    _checked.entry = None
    if not _cacheable(chunks):
        return wrapped(*args, **kwargs)
    key = (type(instance), id(hf_pretrained), tuple(id(c) for c in chunks), call.get("weight_dtype"))
    functions = _functions(instance)
    entry = _cache.get(key)
    reusable = entry is not None and entry.still_valid(functions, chunks)
    if _every_pipeline_rank_agrees(megatron_model, reusable):
        # upstream records the HF metadata on the bridge while building; so does a reuse
        instance.hf_pretrained = hf_pretrained
        instance.hf_config = hf_pretrained.config if hasattr(hf_pretrained, "config") else hf_pretrained
        _checked.entry = entry
        return list(entry.tasks)
    tasks = wrapped(*args, **kwargs)
    entry = _Entry(functions, ModuleTreeSnapshot(chunks), list(tasks))
    _remember(key, chunks, entry)
    _checked.entry = entry
    return tasks

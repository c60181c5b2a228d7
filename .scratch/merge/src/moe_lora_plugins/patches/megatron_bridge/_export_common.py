"""Glue shared by the Megatron-Bridge export patches: binding arguments, process groups, caches,
the expert-parallel gather of a buffered stream, and the audit switch."""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

logger = logging.getLogger("moe_lora_plugins.patches.megatron_bridge")

_NAME_CACHES = ("_cached_param_names", "_cached_param_objects_adapter")
_cleared: weakref.WeakSet[Any] = weakref.WeakSet()


def bind_call(wrapped: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in (binding by signature, never by position)."""
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def model_list(model: Any) -> list[Any]:
    return model if isinstance(model, list) else [model]


def clear_name_caches(bridge: Any) -> None:
    """Drop name caches a bridge filled before our patches were in place (once per bridge)."""
    if bridge in _cleared:
        return
    for attr in _NAME_CACHES:
        if attr in getattr(bridge, "__dict__", {}):
            delattr(bridge, attr)
            logger.debug("moe-lora-plugins: cleared %s on %s", attr, type(bridge).__name__)
    _cleared.add(bridge)


def pg_collection(models: Any) -> Any:
    """The model's ``ProcessGroupCollection`` when it carries one, else ``None``."""
    for chunk in model_list(models):
        module = chunk
        for _ in range(4):
            pg = getattr(module, "pg_collection", None)
            if pg is not None:
                return pg
            module = getattr(module, "module", None)
            if module is None:
                break
    return None


def ep_group(models: Any) -> Any:
    """The expert-parallel group: the model's ``pg_collection.ep`` if present, else parallel_state's."""
    pg = pg_collection(models)
    if pg is not None:
        return getattr(pg, "ep", None)
    from megatron.core import parallel_state

    try:
        return parallel_state.get_expert_model_parallel_group()
    except (AssertionError, RuntimeError):
        return None


_ep_by_model: weakref.WeakKeyDictionary[Any, tuple[Any, int]] = weakref.WeakKeyDictionary()


def ep_group_and_size(models: Any) -> tuple[Any, int]:
    """``(EP group, EP size)`` of a model, looked up once per model (its layout never changes)."""
    first = model_list(models)[0]
    try:
        found = _ep_by_model.get(first)
    except TypeError:
        found = None
    if found is None:
        group = ep_group(models)
        found = (group, group_size_rank(group)[0])
        with contextlib.suppress(TypeError):  # not weak-referenceable: look it up next time again
            _ep_by_model[first] = found
    return found


def group_size_rank(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def model_config(models: Any) -> Any:
    chunk = model_list(models)[0]
    while not hasattr(chunk, "config") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk.config


def rebuild_item(template: Any, name: str, tensor: Any, rest: tuple[Any, ...] | None = None) -> Any:
    """An item of the same kind as ``template`` (2-tuple, 3-tuple, NamedTuple) with a new name/tensor."""
    rest = tuple(template[2:]) if rest is None else rest
    values = (name, tensor, *rest)
    if hasattr(template, "_fields"):
        return type(template)(*values)
    return tuple(values)


def audit_enabled() -> bool:
    from moe_lora_plugins.envs import load_settings

    return load_settings().export_audit


def maybe_audited(items: Iterable[Any], kind: str, models: Any, label: str = "") -> Iterator[Any]:
    """``items`` through an :class:`~moe_lora_plugins.audit.ExportAudit` unless the audit is off."""
    if not audit_enabled():
        return iter(items)
    from moe_lora_plugins.audit import ExportAudit, audited

    try:
        config = model_config(models)
    except Exception as exc:  # a model the audit does not understand: check the stream without ranges
        config, missing = None, f"layer and expert ranges not checked: no model config ({type(exc).__name__}: {exc})"
    else:
        missing = None
    num_experts = getattr(config, "num_moe_experts", None)
    audit = ExportAudit(
        kind,
        num_layers=getattr(config, "num_layers", None),
        num_experts=None if num_experts == 0 else num_experts,  # 0 / None: a dense model
        label=label,
    )
    if missing:
        audit.skip(missing)
    return audited(items, audit)


def export_layout() -> dict[str, int]:
    """This rank's parallel sizes and ranks (``pp``, ``vpp``, ``ep``, ``etp``, ``tp``, ``*_rank``) for the
    export hook's context; empty when Megatron's parallel state is not initialised."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    return {
        "tp": ps.get_tensor_model_parallel_world_size(), "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp": ps.get_pipeline_model_parallel_world_size(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        "ep": ps.get_expert_model_parallel_world_size(), "ep_rank": ps.get_expert_model_parallel_rank(),
        "etp": ps.get_expert_tensor_parallel_world_size(), "etp_rank": ps.get_expert_tensor_parallel_rank(),
    }


def hooked(items: Iterable[Any], kind: str, models: Any, bridge: Any) -> Iterator[Any]:
    """``items`` through the plugins' ``on_export_weights`` chain (see ``hooks.streams``)."""
    from moe_lora_plugins.hooks.streams import export_stream

    return export_stream(items, kind, model=model_list(models), bridge=bridge, layout=export_layout())  # type: ignore[arg-type]


def _group_device(group: Any) -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_expert_items(items: list[Any], group: Any) -> list[Any]:
    """Every EP rank's items: replicated names once, rank-owned names from their owner, in rank order.

    One ``all_gather_object`` of names, shapes and dtypes, then one ``all_gather`` of a flat byte
    buffer: the tensors arrive bit for bit. Gathered tensors land on the device the local ones use.
    """
    import torch
    import torch.distributed as dist

    from moe_lora_plugins.topology.ep_gather import (
        pack_tensors,
        packed_nbytes,
        plan_ep_gather,
        tensor_meta,
        unpack_tensors,
    )

    size, rank = group_size_rank(group)
    if size == 1:
        return items
    local = [(tensor_meta(item[0], item[1]), tuple(item[2:])) for item in items]
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, local, group=group)
    plan = plan_ep_gather([[meta[0] for meta, _ in rank_items] for rank_items in everyone])
    owned_meta = [
        [(meta, rest) for meta, rest in rank_items if meta[0] not in plan.replicated] for rank_items in everyone
    ]
    sizes = [packed_nbytes([meta for meta, _ in metas]) for metas in owned_meta]
    device = _group_device(group)
    mine = [item[1] for item in items if item[0] not in plan.replicated]
    buffer = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    packed = pack_tensors(mine, device=device)
    buffer[: packed.numel()] = packed
    received = [torch.empty_like(buffer) for _ in range(size)]
    dist.all_gather(received, buffer, group=group)
    local_device = items[0][1].device if items else device
    template = items[0] if items else ("", None)
    out = [item for item in items if item[0] in plan.replicated]
    for owner, metas in enumerate(owned_meta):
        tensors = unpack_tensors(received[owner][: sizes[owner]], [meta for meta, _ in metas])
        for (name, tensor), (_, rest) in zip(tensors, metas, strict=True):
            out.append(rebuild_item(template, name, tensor.clone().to(local_device), rest))
    return out


# Expert adapters of every EP rank, gathered once per merged export (see prefetch_expert_adapters).
_prefetched: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], list[Any]]] = weakref.WeakKeyDictionary()
# Per model: the SequentialMLP expert adapter parameters, as ((vp_stage, local name), parameter) pairs.
_expert_adapter_params: weakref.WeakKeyDictionary[Any, list[tuple[tuple[int, str], Any]]] = (
    weakref.WeakKeyDictionary()
)


def _local_name(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _expert_adapters(chunks: list[Any]) -> list[tuple[tuple[int, str], Any]]:
    """The model's expert adapter parameters, found once per model (a walk of every parameter)."""
    found = _expert_adapter_params.get(chunks[0])
    if found is None:
        found = [
            ((vp_stage, _local_name(name)), param)
            for vp_stage, chunk in enumerate(chunks)
            for name, param in chunk.named_parameters()
            if ".local_experts." in name and ".adapter." in name
        ]
        _expert_adapter_params[chunks[0]] = found
    return found


def expert_adapter_params(chunks: list[Any]) -> list[tuple[tuple[int, str], Any]]:
    """The model's SequentialMLP expert adapter parameters as ((vp_stage, local name), parameter) pairs,
    found once per model."""
    return _expert_adapters(chunks)


def all_gather_flat(tensors: list[Any], group: Any) -> list[list[Any]]:
    """Every EP rank's ``tensors`` (one dtype, the same shapes on every rank), in rank order, through one
    ``all_gather_into_tensor`` of a flat buffer. This rank's entry is ``tensors`` itself (the gather
    would return the same bits); the others are views of the received buffer."""
    import torch
    import torch.distributed as dist

    from moe_lora_plugins.topology.ep_gather import flat_layout, pack_flat, unpack_flat

    size, rank = group_size_rank(group)
    layout = flat_layout(tensors)
    flat = pack_flat(tensors)
    gathered = torch.empty(size * flat.numel(), dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(gathered, flat, group=group)
    return [list(tensors) if owner == rank else unpack_flat(buffer, layout)
            for owner, buffer in enumerate(gathered.chunk(size))]


def prefetch_expert_adapters(models: Any) -> bool:
    """Gather every SequentialMLP expert adapter of every EP rank in one ``all_gather``, for the merge.

    Only where the merge's adapters are the plain local parameters: EP > 1, PP = 1 (every task is
    local, so local names identify them) and expert-TP = 1 (no shards). Returns whether it did; the
    merge falls back to one small gather per expert otherwise. :func:`drop_prefetched` frees it.
    The tensors travel as one flat buffer per dtype (:func:`all_gather_flat`).
    """
    from megatron.core import parallel_state

    chunks = model_list(models)
    group, size = ep_group_and_size(models)
    if size == 1 or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        return False
    if parallel_state.get_expert_tensor_parallel_world_size() != 1:
        return False
    params = _expert_adapters(chunks)
    if not params:
        return False
    table: dict[tuple[int, str], list[Any]] = {}
    by_dtype: dict[Any, list[tuple[tuple[int, str], Any]]] = {}
    for key, param in params:
        by_dtype.setdefault(param.dtype, []).append((key, param))
    for same_dtype in by_dtype.values():
        per_rank = all_gather_flat([param.detach() for _, param in same_dtype], group)
        for index, (key, _) in enumerate(same_dtype):
            table[key] = [tensors[index] for tensors in per_rank]
    _prefetched[chunks[0]] = table
    return True


def prefetched_expert_adapter(models: Any, vp_stage: int, local_name: str) -> list[Any] | None:
    """Every EP rank's tensor for this local adapter parameter, if a prefetch holds it."""
    table = _prefetched.get(model_list(models)[0])
    return None if table is None else table.get((vp_stage or 0, local_name))


def drop_prefetched(models: Any) -> None:
    _prefetched.pop(model_list(models)[0], None)

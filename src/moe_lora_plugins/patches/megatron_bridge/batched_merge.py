"""Patch: a merged export merges SequentialMLP experts from batched deltas, a block of experts at a time.

Two parts. **First** (world size 1 layouts: one pipeline stage, EP 1, unsharded adapters): the per-layer
merged stream of :mod:`moe_lora_plugins.patches.megatron_bridge.merged_stream`, started by the export
wrapper (``weight_export``) while this patch and the adapter-task cache are applied: expert and attention
tasks reach upstream's task loop with their weights already merged a block at a time, and upstream merges
none of them itself. **Second**, everywhere that stream does not apply (an export dtype, a shape whose block
is not bitwise upstream's, the adapter-task cache disabled), the wrapper below.

Wraps ``MegatronPeftBridge.materialize_adapter_weights``. Upstream's merged export
(``export_hf_weights(merge_adapter_weights=True)``, its default) materializes each expert's adapter
on its own (two mapping calls) and merges each expert tensor on its own: float32 copies of A and B,
the float32 base, one small ``mm``, a scale, an add and a cast, about seven kernels and tens of
microseconds of Python per tensor, for every expert's gate, up and down.

Where the adapters are this rank's own, unsharded parameters (upstream's column / row mappings with
one pipeline stage and one tensor-parallel shard in their own groups, plain tensors, one
non-canonical adapter per SequentialMLP expert), the mappings return the parameter itself, so the wrapper builds the same ``AdapterWeight``
without them, and tags it (a subclass of upstream's dataclass, nothing else differs). The per-owner
merge wrapper (``merge_adapter``) merges a tagged expert adapter through :func:`merge_tagged`: the
float32 deltas of a block of experts of the same layer and projection are one ``bmm``
(:func:`moe_lora_plugins.merge.batched.batched_deltas`, gate and up split with upstream's own
``_split_fused_fc1_linear_out_weight``), computed at the block's first expert, and each expert's
merge is one add of its slice, cast as upstream casts. The first block of each shape, dtype and
device is also recomputed with upstream's per-expert formula and the first merge compared with
upstream's ``_merge_single_adapter_weight``: where either differs by a bit, that shape goes to
upstream's per-tensor merge for the rest of the process (logged once). An expert whose alpha, dim
or factor values changed since its block was computed (tensor ``_version``) or whose base does not
fit is merged by upstream. A block serves one export only: an expert asked for again means a new
export (one abandoned midway leaves its blocks behind), and its block is computed afresh. Not noticed:
an adapter changed through ``.data`` (no version bump) while one export is streaming, between its
block's first expert and its own. Everything else (other layouts, dense and grouped adapters, canonical
LoRA) is upstream's unchanged; reverting this patch gives upstream's per-tensor merge.

Memory: at most two blocks live (the current gate/up block and down block), each at most
``BLOCK_BUDGET_BYTES`` of float32 deltas on an accelerator (128 MiB: 10 experts of gate+up and 21 of
down at the anchor shapes; ``CPU_BLOCK_BUDGET_BYTES``, 4 MiB, on the CPU); a block is freed when its
last expert is merged, and dropped with its model.
"""

from __future__ import annotations

import collections
import logging
import re
import weakref
from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.batched_expert_merge",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.peft_bridge",
        attribute="MegatronPeftBridge.materialize_adapter_weights",
        kind="wrap",
        implementation="moe_lora_plugins.patches.megatron_bridge.batched_merge:materialize_adapter_weights",
        fingerprint="(self, adapter_tasks)",
        why=(
            "A merged export (export_hf_weights' default) materializes and merges every expert tensor on its "
            "own: two mapping calls per expert adapter, then float32 copies, one small matmul, a scale, an add "
            "and a cast per tensor (1,536 tensors on the 8-layer, 64-expert anchor model): 3.95x the plain "
            "export on one H200. The per-layer merged stream (merged_stream.py) hands upstream's loop the "
            "expert and attention weights merged a block at a time (one fused Triton launch per block on a CUDA "
            "device), each run of them as one task: 1.10x-1.17x the plain export on one H200 over three machine "
            "starts with the fused kernel, 1.26x-1.46x without it (4.56x with the per-expert batched merge alone)."
        ),
        upstream="Megatron-Bridge 0.6.2 peft_bridge.MegatronPeftBridge.materialize_adapter_weights and "
        "_merge_lora_adapter_weights / _merge_single_adapter_weight (per expert, per tensor)",
        remove_when="Megatron-Bridge merges the experts of a layer in batched operations",
        verified="megatron-bridge 0.6.2: CPU gloo world size 1 in bf16 and fp32, merged exports bitwise equal "
        "to upstream's (tiny Qwen3-MoE, 4 and 32 experts), EP=2 / PP=2 untouched (upstream's path); "
        "1xH200 (torch 2.11): benchmarks/merge_bitwise_gpu.py bitwise in all 24 cases (anchor shapes, bf16 and "
        "fp32, blocks of 64/21/10/1); the 2.75 B anchor model's merged export bitwise upstream's, 0.161 s "
        "against upstream's 0.648 s (benchmarks/RESULTS-export.md, run 5). Per-layer merged stream: CPU gloo "
        "world size 1, bf16 and fp32, merged exports bitwise upstream's with one block per group and several, "
        "a LoRA scale that is not a power of two (13 / 10), a weight changed mid-stream, a new adapter "
        "parameter, the split-rows and upstream fallbacks (tests/megatron/test_merged_stream.py); 1xH200: the "
        "anchor model's merged export bitwise upstream's, 0.041-0.051 s against upstream's 0.54-0.70 s, "
        "1.26x-1.46x the plain export over six machine starts; runs of tasks as one task and A scaled once by "
        "a power-of-two scale (a tiny value falls back to the multiply, bitwise), a bridge overriding "
        "maybe_modify_converted_hf_weight handed one task per tensor (tests/megatron/test_merged_stream.py) "
        "(benchmarks/RESULTS-export.md). Fused merge kernel (merge/fused.py, Triton 3.6 on torch 2.11, 1xH200): "
        "bitwise upstream's _merge_single_adapter_weight in 14 cases (anchor shapes, ranks 8-64, scales 0.5 / "
        "1.3 / 2, bf16 / fp16 / fp32, benchmarks/fused_merge_probe.py); the anchor model's merged export bitwise "
        "upstream's with all 4 groups fused, 1.10x-1.17x the plain export; Triton's interpreter on the CPU: "
        "exact values bitwise through the fused path, a moved parameter, the switch, a failing kernel and "
        "the interpreter's own bf16 rounding sent to the bmm blocks (tests/megatron/test_merged_stream.py).",
        requires=tuple(
            f"megatron.bridge.models.conversion.peft_bridge:{name}"
            for name in ("AdapterWeight", "RowParallelMapping", "ColumnParallelMapping",
                         "MegatronPeftBridge._is_fused_fc1_gate_up", "MegatronPeftBridge._is_fused_fc1_gate_proj",
                         "MegatronPeftBridge._is_fused_fc1_up_proj", "MegatronPeftBridge._is_gdn_in_proj_split",
                         "MegatronPeftBridge._split_fused_fc1_linear_out_weight",
                         "MegatronPeftBridge._merge_single_adapter_weight",
                         "MegatronPeftBridge._merge_lora_adapter_weights",
                         "MegatronPeftBridge.build_adapter_conversion_tasks")
        ) + tuple(
            f"megatron.bridge.models.conversion.model_bridge:{name}"
            for name in ("MegatronWeightTuple", "WeightConversionTask", "MegatronModelBridge.build_conversion_tasks",
                         "MegatronModelBridge.stream_weights_megatron_to_hf",
                         "MegatronModelBridge.maybe_modify_converted_hf_weight",
                         "MegatronModelBridge._cast_export_weight_dtype", "_get_pp_group")
        ),
    ),
)

log = logging.getLogger(__name__)

BLOCK_BUDGET_BYTES = 128 << 20  # float32 deltas per block on an accelerator; at most two blocks are alive
# on the CPU a block stays small: large fresh buffers cost page faults there (no caching allocator) and the
# matmul itself, not the launches, is the cost
CPU_BLOCK_BUDGET_BYTES = 4 << 20
MAX_LIVE_BLOCKS = 2

_EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.local_experts\.)(?P<expert>\d+)(?P<rest>\..+)$")
_tagged_class: list[type] = []


def _tagged_adapter_weight_class() -> type:
    """Upstream's ``AdapterWeight`` under another name: the mark of an adapter this patch materialized."""
    if not _tagged_class:
        from megatron.bridge.models.conversion.peft_bridge import AdapterWeight

        _tagged_class.append(type("BatchedMergeAdapterWeight", (AdapterWeight,), {"__slots__": ()}))
    return _tagged_class[0]


def _plain_local_param(task: Any, mapping_types: tuple[type, ...]) -> bool:
    """Upstream's column / row mapping of an adapter parameter returns the parameter itself: one pipeline
    stage and one (expert-)tensor-parallel shard in the mapping's own groups, a plain tensor."""
    import torch

    weight = task.param_weight
    return (
        type(task.mapping) in mapping_types
        and task.mapping.is_adapter
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
        and task.mapping.pp_size == 1
        and task.mapping.tp_size == 1
    )


def materialize_adapter_weights(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Upstream's materialized adapter, built without the mappings (which return the parameter itself here)
    and tagged for the batched merge; anything else goes to upstream."""
    tasks = args[0] if args else kwargs.get("adapter_tasks")
    if not isinstance(tasks, list) or len(tasks) != 1:
        return wrapped(*args, **kwargs)
    task = tasks[0]
    if (
        task.adapter_key is not None
        or task.requires_expert_splits
        or ".local_experts." not in task.global_base_prefix
    ):
        return wrapped(*args, **kwargs)
    from megatron.bridge.models.conversion.model_bridge import MegatronWeightTuple
    from megatron.bridge.models.conversion.peft_bridge import ColumnParallelMapping, RowParallelMapping

    mapping_types = (ColumnParallelMapping, RowParallelMapping)
    linear_in, linear_out = task.linear_in_task, task.linear_out_task
    if not (_plain_local_param(linear_in, mapping_types) and _plain_local_param(linear_out, mapping_types)):
        return wrapped(*args, **kwargs)
    tagged = _tagged_adapter_weight_class()
    return [
        tagged(
            global_base_prefix=task.global_base_prefix,
            adapter_key=None,
            alpha=task.alpha,
            dim=task.dim,
            linear_in_weight=MegatronWeightTuple(linear_in.param_name, linear_in.param_weight, linear_in.vp_stage),
            linear_out_weight=MegatronWeightTuple(linear_out.param_name, linear_out.param_weight, linear_out.vp_stage),
        )
    ]


class _Block:
    """The float32 deltas of experts ``start .. start + count - 1`` of one layer's projection."""

    __slots__ = ("alpha", "count", "deltas", "dim", "merged", "signature", "start", "versions")
    # merged: the offsets (expert - start) merged from this block; an offset asked for again means a new
    # export (a stream abandoned midway leaves its blocks behind), whose block is computed afresh

    def __init__(self, start: int, count: int, alpha: Any, dim: Any, deltas: dict[str, Any],
                 versions: list[tuple[int, int]], signature: tuple[Any, ...]) -> None:
        self.start, self.count, self.alpha, self.dim = start, count, alpha, dim
        self.deltas, self.versions, self.signature = deltas, versions, signature
        self.merged: set[int] = set()


class _ModelState:
    """Per model: its expert adapter parameters by (vp stage, prefix, rest) and expert, and the live blocks."""

    def __init__(self, chunks: list[Any]) -> None:
        from moe_lora_plugins.patches.megatron_bridge._export_common import expert_adapter_params

        self.siblings: dict[tuple[int, str, str], dict[int, Any]] = {}
        for (vp_stage, name), param in expert_adapter_params(chunks):
            match = _EXPERT_NAME.match(name)
            if match:
                key = (vp_stage, match["prefix"], match["rest"])
                self.siblings.setdefault(key, {})[int(match["expert"])] = param
        self.resolved: dict[tuple[int, str, str], tuple[dict[int, Any], dict[int, Any], int] | None] = {}
        self.blocks: collections.OrderedDict[tuple[Any, ...], _Block] = collections.OrderedDict()


_states: weakref.WeakKeyDictionary[Any, _ModelState] = weakref.WeakKeyDictionary()
# (device, A dtype, B dtype, base dtype, experts per block, out, rank, in) -> whether batched equals upstream
_verified: dict[tuple[Any, ...], bool] = {}


def _state(models: Any) -> _ModelState:
    from moe_lora_plugins.patches.megatron_bridge._export_common import model_list

    chunks = model_list(models)
    state = _states.get(chunks[0])
    if state is None:
        state = _states[chunks[0]] = _ModelState(chunks)
    return state


def _resolve(state: _ModelState, adapter: Any) -> tuple[dict[int, Any], dict[int, Any], int] | None:
    """All experts' A and B parameters of the same layer and projection as ``adapter`` and its expert number
    (resolved once per parameter name pair), if its tensors are those very parameters."""
    linear_in, linear_out = adapter.linear_in_weight, adapter.linear_out_weight
    key = (linear_in.vp_stage or 0, linear_in.param_name, linear_out.param_name)
    if key not in state.resolved:
        state.resolved[key] = _resolve_names(state, *key)
    found = state.resolved[key]
    if found is None or found[0].get(found[2]) is not linear_in.weight or found[1].get(found[2]) is not linear_out.weight:
        return None
    return found


def _resolve_names(state: _ModelState, vp_stage: int, in_name: str, out_name: str
                   ) -> tuple[dict[int, Any], dict[int, Any], int] | None:
    match_in, match_out = _EXPERT_NAME.match(in_name), _EXPERT_NAME.match(out_name)
    if match_in is None or match_out is None or match_in["expert"] != match_out["expert"]:
        return None
    lora_a = state.siblings.get((vp_stage, match_in["prefix"], match_in["rest"]))
    lora_b = state.siblings.get((vp_stage, match_out["prefix"], match_out["rest"]))
    if lora_a is None or lora_b is None or sorted(lora_a) != list(range(len(lora_a))) or sorted(lora_b) != sorted(lora_a):
        return None
    return lora_a, lora_b, int(match_in["expert"])


def merge_tagged(instance: Any, models: Any, converted: dict[str, Any], adapter: Any) -> dict[str, Any] | None:
    """Merge one SequentialMLP expert's tensors from its block's batched deltas, in ``converted`` (returned),
    as upstream's per-tensor merge would; ``None`` where this adapter or base is not one it handles
    (the caller then runs upstream's merge)."""
    if type(adapter) is not _tagged_adapter_weight_class() or not converted:
        return None
    names = list(converted)
    if instance._is_gdn_in_proj_split(names):
        return None
    state = _state(models)
    found = _resolve(state, adapter)
    if found is None:
        return None
    lora_a, lora_b, expert = found
    base0 = converted[names[0]]
    fused = instance._is_fused_fc1_gate_up(names, lora_b[expert], base0.shape)
    if fused:
        kinds = {name: ("gate" if instance._is_fused_fc1_gate_proj(name) else
                        "up" if instance._is_fused_fc1_up_proj(name) else None) for name in names}
        if None in kinds.values():
            return None
    else:
        kinds = dict.fromkeys(names, "whole")
    if any(converted[name].shape != base0.shape or converted[name].dtype != base0.dtype for name in names):
        return None
    block = _block(instance, state, adapter, lora_a, lora_b, expert, fused, base0)
    if block is None:
        return None
    offset = expert - block.start
    a_param, b_param = lora_a[expert], lora_b[expert]
    if (block.alpha, block.dim) != (adapter.alpha, adapter.dim) or block.versions[offset] != (
        a_param._version, b_param._version
    ):
        return None  # changed since the block was computed: upstream merges this one
    from moe_lora_plugins.merge.batched import merge_expert

    merged = {name: merge_expert(converted[name], block.deltas[kinds[name]][offset]) for name in names}
    if not _check_first_merge(instance, block, adapter, converted, merged, kinds, offset, a_param, b_param):
        return None
    converted.update(merged)
    block.merged.add(offset)
    if len(block.merged) >= block.count:  # every expert of the block merged: free it
        for key, live in list(state.blocks.items()):
            if live is block:
                del state.blocks[key]
    return converted


def _split_out(instance: Any, lora_b: Any, fused: bool) -> dict[str, Any]:
    if not fused:
        return {"whole": lora_b}
    gate, up = instance._split_fused_fc1_linear_out_weight(lora_b, is_expert=True)
    return {"gate": gate, "up": up}


def _block(instance: Any, state: _ModelState, adapter: Any, lora_a: dict[int, Any], lora_b: dict[int, Any],
           expert: int, fused: bool, base: Any) -> _Block | None:
    """The live block holding ``expert``'s deltas, computed (and checked, the first time for its shape)
    when missing; ``None`` where the batched deltas are not upstream's on this device."""
    from moe_lora_plugins.merge.batched import batched_deltas, deltas_match_per_expert, experts_per_block

    out_features, in_features = base.shape
    budget = CPU_BLOCK_BUDGET_BYTES if base.device.type == "cpu" else BLOCK_BUDGET_BYTES
    per_block = experts_per_block(out_features, in_features, 2 if fused else 1, budget)
    start = expert - expert % per_block
    count = min(per_block, len(lora_a) - start)
    key = (id(lora_a), fused, start, base.device, base.dtype)
    block = state.blocks.get(key)
    if block is not None:
        if _verified.get(block.signature) is False:
            return None
        if expert - block.start not in block.merged:
            return block
        # this expert was merged from the block already: a new export after one abandoned midway. Its
        # adapters may have changed without a version bump (an in-place copy through ``.data``), so the
        # block is computed afresh rather than trusted
        del state.blocks[key]
    a_list = [lora_a[e] for e in range(start, start + count)]
    b_split = [_split_out(instance, lora_b[e], fused) for e in range(start, start + count)]
    if any(b.shape != (out_features, a_list[0].shape[0]) for split in b_split for b in split.values()):
        return None
    if a_list[0].shape[1] != in_features:
        return None
    signature = (base.device, a_list[0].dtype, b_split[0][next(iter(b_split[0]))].dtype, base.dtype, count,
                 out_features, a_list[0].shape[0], in_features)
    if _verified.get(signature) is False:
        return None
    scale = adapter.alpha / adapter.dim  # LoRAMerge.merge's alpha / dim
    deltas = {}
    for kind in b_split[0]:
        b_list = [split[kind] for split in b_split]
        deltas[kind] = batched_deltas(a_list, b_list, scale, device=base.device)
        if signature not in _verified and not deltas_match_per_expert(deltas[kind], a_list, b_list, scale):
            _verified[signature] = False
            log.warning(
                "batched expert LoRA deltas differ from Megatron-Bridge's per-expert matmul on %s for %s experts "
                "of %s x %s (rank %s): merging these with upstream's per-tensor merge", base.device, count,
                out_features, in_features, a_list[0].shape[0])
            return None
    block = _Block(start, count, adapter.alpha, adapter.dim, deltas,
                   [(lora_a[e]._version, lora_b[e]._version) for e in range(start, start + count)], signature)
    while len(state.blocks) >= MAX_LIVE_BLOCKS:
        state.blocks.popitem(last=False)
    state.blocks[key] = block
    return block


def _check_first_merge(instance: Any, block: _Block, adapter: Any, converted: dict[str, Any],
                       merged: dict[str, Any], kinds: dict[str, str], offset: int, a_param: Any, b_param: Any) -> bool:
    """The first merge of a shape is compared with upstream's ``_merge_single_adapter_weight``."""
    import torch

    signature = block.signature
    if _verified.get(signature):
        return True
    split = _split_out(instance, b_param, "gate" in block.deltas)
    equal = all(
        torch.equal(merged[name], instance._merge_single_adapter_weight(
            converted[name], adapter.alpha, adapter.dim, a_param, split[kinds[name]]))
        for name in merged
    )
    _verified[signature] = equal
    if not equal:
        log.warning("the batched expert merge differs from Megatron-Bridge's per-tensor merge on %s for %s: "
                    "merging these with upstream's per-tensor merge", signature[0], list(merged))
        block.deltas.clear()
    return equal

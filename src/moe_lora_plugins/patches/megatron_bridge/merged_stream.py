"""A merged export's LoRA-wrapped weights merged a block at a time, before upstream's task loop sees them.

Part of the ``megatron_bridge.batched_expert_merge`` patch (used only while it and
``megatron_bridge.adapter_conversion_tasks_cache`` are applied); started by the export wrapper
(``weight_export``) for ``export_hf_weights(merge_adapter_weights=True)`` without ``weight_dtype``.

Upstream's merged stream runs, for every LoRA-wrapped tensor, the plain export's per-task work plus an
adapter materialization and a merge call of its own: on one H200 about 80 us per expert tensor on top of
the plain export's 20, even with the merge arithmetic batched (``batched_merge``, run 5). Here those
tasks reach upstream's loop as plain tasks whose parameter is already merged:

- a *plan*, made once per model and remade when the conversion tasks are rebuilt, puts the wrapped
  tasks in groups: one per virtual stage and projection of every layer and expert (all experts' fc1 of
  all layers, all fc2, all qkv, all proj). A member qualifies where its adapter is one non-canonical
  adapter whose mappings return the parameters themselves (one pipeline stage, one (expert-)tensor-
  parallel shard, EP size 1) and all members are plain 2-D tensors of one shape, dtype and device;
- on a CUDA device with Triton (``MOELORA_FUSED_MERGE``, on by default), each block is merged by one launch of
  the fused kernel (``merge.fused``): it reads every member's parameter, A and B where they lie (a table of
  their addresses, made again where one moved) and computes upstream's operations in upstream's order per
  element (float32 factors, the product over the rank, times alpha / dim, plus the float32 base, rounded
  to the parameters' dtype) into one fresh stacked block, with no stacking, factors or float32 deltas; its
  blocks hold up to ``FUSED_BLOCK_BUDGET_BYTES`` of merged parameters. Where it cannot run, or its blocks
  are not upstream's (checked as below), the group takes the bmm blocks:
- while the stream runs, at a group's first member the group's A and B are stacked in float32 (upstream
  casts each to float32 before its product: exact; A also multiplied once by a power-of-two alpha / dim where
  the values make that exactly upstream's scaled product, ``_Group.factors``), and at the first member of each block the block's
  parameters are stacked (one ``cat``, one copy) and, per row range, ``scale * (B @ A)`` in float32 (one
  ``bmm`` into a scratch buffer the export reuses, then one multiply by alpha / dim: upstream's
  ``lora_scale * (linear_out @ linear_in)``, the product rounded, then scaled) is added and rounded once
  to the parameters' dtype (one add: upstream's ``(base.float() + delta).to(dtype)``, element for element).
  The row range is all of B's rows where that is bitwise upstream's merge; else the ranges upstream
  merges one by one (gate and up of a fused fc1, split as upstream's ``_split_fused_fc1_linear_out_weight``
  splits B);
- each run of consecutive planned tasks (a layer's attention projections, a layer's experts) reaches
  upstream's loop as one task whose mapping returns an object upstream only calls ``items()`` on: it walks
  the run's tasks in order and, as upstream asks for the next item, hands each task's slice of its
  stacked block to the task's own mapping, whose HF tensors (views of the block) upstream then finishes as
  a plain export does (export hook, device). That is upstream's stream item for item, with upstream's
  per-task loop body run once per run instead of once per task. Where the bridge post-processes each
  task's HF tensors (it overrides ``maybe_modify_converted_hf_weight``: DeepSeek-V3, GLM-4.7-Flash, ...)
  each planned task is handed over alone, as a copy whose ``param_weight`` is its slice of the block. A
  member whose parameter, A or B changed in place since its group's factors were read (its version counter
  moved) is merged alone by upstream's ``_merge_single_adapter_weight``, from its values of then, as
  upstream would;
- those adapters are left out of the merge tasks upstream builds for this stream (through the
  adapter-task cache); if upstream did not ask for them before its first item, the stream raises
  before yielding anything, since it could merge them a second time.

**Bitwise, checked in the process:** the first block of every shape (device, dtypes, members per block,
parameter and factor shapes, row ranges, mapping class) is compared, member by member, with upstream's
own ``_merge_lora_adapter_weights`` applied to upstream's own mapping output. Where all rows in one
product differ, the split ranges are tried; a group whose block still differs by a bit is left to
upstream's path (and the batched per-expert merge below it), with a warning.

Not noticed (as in ``batched_merge``): a value changed through ``.data`` (no version bump) while one
export is streaming (a tensor whose ``.data`` was replaced between exports is: the fused kernel's address
table is checked per block). Memory (an accelerator, the 8-layer anchor model): each group holds one block
of stacked merged parameters while its members stream (they are what the stream yields, so they live as
long as the caller holds one of its tensors; a group's last block is released before its next is made); a
block is sized so that one row range's float32 deltas stay under ``BLOCK_BUDGET_BYTES`` (the fused kernel:
its merged parameters under ``FUSED_BLOCK_BUDGET_BYTES``); a group's stacked factors (bmm blocks only) live
from its first member to its last. On one H200 the merged export's peak is 1,136 MiB with the fused kernel,
770 MiB with ``MOELORA_MERGE_BLOCK_MIB=256`` (``benchmarks/RESULTS-export.md``).
"""

from __future__ import annotations

import contextvars
import logging
import operator
import re
import weakref
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_WRAPPED = ".to_wrap.weight"
# float32 deltas of one row range of one block, at most (balanced blocks of at least one member)
BLOCK_BUDGET_BYTES = 256 << 20  # on an accelerator (MOELORA_MERGE_BLOCK_MIB): 21 experts' fc1 at the anchor shapes
CPU_BLOCK_BUDGET_BYTES = 4 << 20  # on the CPU large fresh buffers cost page faults and the matmul dominates
# merged parameters of one block, at most, where the fused kernel merges (it needs no float32 deltas): 85
# experts' fc1 at the anchor shapes, 11 launches for the anchor model's experts instead of 20 at 256 MiB (each
# launch costs about 0.1 ms of host time on the H200 hosts)
FUSED_BLOCK_BUDGET_BYTES = 512 << 20
_INDEX = re.compile(r"\.\d+\.")


class _Exclusion:
    __slots__ = ("conversion_entry", "prefixes", "used")

    def __init__(self, prefixes: frozenset[str], conversion_entry: Any) -> None:
        self.prefixes, self.conversion_entry, self.used = prefixes, conversion_entry, False


_EXCLUDED: contextvars.ContextVar[_Exclusion | None] = contextvars.ContextVar("moelora_merged_stream", default=None)


def claim_exclusion() -> _Exclusion | None:
    """Inside a per-layer merged stream's start: the adapter base prefixes it merges itself and the
    conversion-task cache entry checked for this call (marked as honoured); ``None`` elsewhere."""
    exclusion = _EXCLUDED.get()
    if exclusion is not None:
        exclusion.used = True
    return exclusion


class _Scratch:
    """One float32 buffer for the deltas of every block of one export: blocks are computed one after the other
    on one stream, so each may overwrite the last's (allocated once, at the largest size asked for)."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer: Any = None

    def take(self, shape: tuple[int, int, int], device: Any) -> Any:
        import torch

        count = shape[0] * shape[1] * shape[2]
        if self.buffer is None or self.buffer.numel() < count or self.buffer.device != device:
            self.buffer = None  # the old one freed before the larger one is allocated
            self.buffer = torch.empty(count, dtype=torch.float32, device=device)
        return self.buffer[:count].view(shape)


class _Group:
    """The members of one (virtual stage, projection of every layer / expert), in stream order."""

    __slots__ = ("alpha", "blocks", "dim", "fused", "key", "last", "lora_a", "lora_b", "params", "prescale", "rows",
                 "scale", "split_rows", "table")

    def __init__(self, key: tuple[Any, ...], params: list[Any], lora_a: list[Any], lora_b: list[Any],
                 alpha: Any, dim: Any, split_rows: list[tuple[int, int]]) -> None:
        self.key, self.params, self.lora_a, self.lora_b = key, params, lora_a, lora_b
        self.last = len(params) - 1
        self.alpha, self.dim = alpha, dim
        self.scale = alpha / dim  # LoRAMerge.merge's alpha / dim
        # whether A may be scaled once instead of every block's product (a power of two: see ``factors``); cleared
        # where the check finds that path is not upstream's merge
        self.prescale = _power_of_two(self.scale)
        self.split_rows = split_rows  # the row ranges upstream merges one by one (gate, up; or all rows)
        self.rows: list[tuple[int, int]] = []
        self.blocks: list[tuple[int, int]] = []
        # whether blocks are merged by the fused kernel (``merge.fused``: one launch per block, reading every
        # member where it lies); set where the kernel can run here and its blocks are bitwise upstream's merge
        self.fused = False
        self.table: Any = None  # the members' addresses for the fused kernel, made again when one moves

    def fused_possible(self) -> bool:
        """Whether the fused kernel can merge this group here: Triton on the parameters' CUDA device, and
        every parameter, A and B contiguous on that device with one shape and dtype each."""
        from moe_lora_plugins.merge import fused

        if not fused.available(self.params[0].device):
            return False
        try:
            fused.check_members(self.params, self.lora_a, self.lora_b)
        except fused.FusedMergeError:
            return False
        return True

    def current_table(self, start: int = 0, stop: int | None = None) -> Any:
        """The members' address table for the fused kernel, made again where a parameter, A or B of members
        ``start .. stop - 1`` no longer lies where it was (``param.data`` replaced, say by an offload and reload)."""
        from moe_lora_plugins.merge import fused

        table = self.table
        if table is None or not table.current(self.params, self.lora_a, self.lora_b, start, stop):
            table = self.table = None  # the old one freed first
            table = self.table = fused.AddressTable(self.params, self.lora_a, self.lora_b)
        return table

    def use_rows(self, rows: list[tuple[int, int]], budget: int) -> None:
        """Compute the deltas over ``rows`` (one product per range), in balanced blocks of at most ``budget``
        bytes of float32 deltas per range (with the fused kernel, which has no deltas: of merged parameters)."""
        self.rows = rows
        param = self.params[0]
        width = (param.numel() * param.element_size() if self.fused
                 else max(last - first for first, last in rows) * param.shape[1] * 4)
        count = len(self.params)
        blocks = -(-count // max(1, budget // width))
        sizes = [count // blocks + (1 if i < count % blocks else 0) for i in range(blocks)]
        self.blocks, start = [], 0
        for size in sizes:
            self.blocks.append((start, start + size))
            start += size

    def block_of(self, member: int) -> tuple[int, int]:
        for start, stop in self.blocks:
            if start <= member < stop:
                return start, stop
        raise IndexError(member)

    def factors(self, prescale: bool | None = None) -> tuple[Any, Any, bool]:
        """Every member's A and B stacked in float32 on the parameters' device (their values of now), and whether
        A is already scaled by alpha / dim.

        With ``prescale`` (default: ``self.prescale``) and a power-of-two scale, A is multiplied by it here, once,
        instead of every block's product after its ``bmm`` (one pass over the float32 deltas less per block). That
        is upstream's ``lora_scale * (B @ A)`` bit for bit where no value of the product is subnormal or overflows:
        multiplying by a power of two is then exact and commutes with every rounding of the product, whatever the
        order of its sums. Made sure of from the values (one synchronisation per group): every nonzero |A| and |B|
        is at least 2**-30, so every product term and partial sum, scaled or not, is zero or a multiple of 2**-126
        (normal), and max|A| * max|B| * rank * scale stays far below the float32 range. A scale of 1 needs no
        multiply at all. Otherwise A is returned unscaled."""
        import torch

        device = self.params[0].device
        with torch.no_grad():
            a32 = _stacked(self.lora_a).to(device=device, dtype=torch.float32)
            b32 = _stacked(self.lora_b).to(device=device, dtype=torch.float32)
            if not (self.prescale if prescale is None else prescale) or not _power_of_two(self.scale):
                return a32, b32, False
            if self.scale == 1.0:
                return a32, b32, True
            if not _exactly_scalable(a32, b32, self.scale):
                return a32, b32, False
            a32.mul_(self.scale)
            return a32, b32, True

    def merged_block(self, start: int, stop: int, factors: tuple[Any, Any, bool],
                     scratch: _Scratch | None = None) -> Any:
        """Members ``start .. stop - 1``'s merged parameters, stacked ``(stop - start, out, in)``: per row range
        one ``bmm`` of the float32 factors and one multiply by alpha / dim (upstream's ``lora_scale * (B @ A)``,
        the product checked bitwise per shape; none where A is scaled already, see ``factors``), then one add
        rounded to the parameters' dtype. The float32 deltas go to ``scratch`` (one buffer an export reuses, in
        stream order) or a fresh buffer. With the fused kernel (``self.fused``) one launch does all of that from
        where each member lies, with no stacking, factors or deltas (``factors`` unused)."""
        import torch

        if self.fused:
            from moe_lora_plugins.merge import fused

            param = self.params[0]
            return fused.merge_many(self.current_table(start, stop), start, stop, (param.shape[0], param.shape[1]),
                                    self.lora_a[0].shape[0], param.dtype, param.device, self.scale)
        a32, b32, prescaled = factors
        with torch.no_grad():
            stacked = _stacked(self.params[start:stop])
            a_block = a32[start:stop]
            for first, last in self.rows:
                b_block = b32[start:stop] if (first, last) == (0, b32.shape[1]) else \
                    b32[start:stop, first:last].contiguous()
                shape = (stop - start, last - first, a32.shape[2])
                deltas = (scratch or _Scratch()).take(shape, stacked.device)
                torch.bmm(b_block, a_block, out=deltas)
                if not prescaled:
                    deltas.mul_(self.scale)
                if first == 0 and last == stacked.shape[1]:
                    stacked.add_(deltas)
                else:
                    rows = stacked[:, first:last]
                    torch.add(rows, deltas, out=rows)
                del deltas
        return stacked

    def versions(self) -> list[tuple[int, int, int]]:
        """Every member's parameter, A and B version counters."""
        get = operator.attrgetter("_version")
        return list(zip(map(get, self.params), map(get, self.lora_a), map(get, self.lora_b), strict=True))

    def merged_alone(self, instance: Any, expert: int) -> Any:
        """One expert's merged parameter from its values of now, each row range by upstream's own
        ``_merge_single_adapter_weight``."""
        import torch

        param, lora_a, lora_b = self.params[expert], self.lora_a[expert], self.lora_b[expert]
        with torch.no_grad():
            merged = param.detach().clone(memory_format=torch.contiguous_format)
            for first, last in self.split_rows:
                merged[first:last] = instance._merge_single_adapter_weight(
                    param[first:last], self.alpha, self.dim, lora_a, lora_b[first:last])
        return merged

    def signature(self, mapping: Any, start: int, stop: int, prescaled: bool) -> tuple[Any, ...]:
        param, a, b = self.params[0], self.lora_a[0], self.lora_b[0]
        return (param.device, param.dtype, a.dtype, b.dtype, stop - start, tuple(param.shape), tuple(a.shape),
                tuple(b.shape), tuple(self.rows), type(mapping), self.scale, prescaled, self.fused)


class _Plan:
    __slots__ = ("by_position", "entries", "prefixes", "segments", "tasks")

    def __init__(self, tasks: list[Any], entries: dict[int, tuple[_Group, int]], prefixes: frozenset[str]) -> None:
        self.tasks, self.entries, self.prefixes = tasks, entries, prefixes
        # per task position: None, or (group, member, its parameter, A, B)
        self.by_position = [None if (hit := entries.get(id(task))) is None else
                            (hit[0], hit[1], hit[0].params[hit[1]], hit[0].lora_a[hit[1]], hit[0].lora_b[hit[1]])
                            for task in tasks]
        # in stream order: (a task not planned, None), or (the first task of a run of consecutive planned tasks
        # that upstream finishes alike, [(task, group, member, parameter, A, B) of each])
        self.segments: list[tuple[Any, list[tuple[Any, ...]] | None]] = []
        for task, hit in zip(tasks, self.by_position, strict=True):
            if hit is None:
                self.segments.append((task, None))
                continue
            last = self.segments[-1] if self.segments else None
            if last is not None and last[1] is not None and _finished_alike(last[0], task):
                last[1].append((task, *hit))
            else:
                self.segments.append((task, [(task, *hit)]))

    def made_for(self, tasks: list[Any]) -> bool:
        return len(tasks) == len(self.tasks) and all(map(operator.is_, tasks, self.tasks))


_plans: weakref.WeakKeyDictionary[Any, _Plan] = weakref.WeakKeyDictionary()
# signature -> whether the batched block equals upstream's merge, expert for expert
_verified: dict[tuple[Any, ...], bool] = {}


def _power_of_two(scale: float) -> bool:
    """``scale`` is 2**k for an integer k in [-20, 20] (the range ``factors``' bound is worked out for)."""
    import math

    mantissa, exponent = math.frexp(scale)
    return mantissa == 0.5 and -19 <= exponent <= 21


_SMALLEST = 2.0 ** -30  # nonzero |A| and |B| at least this: products and partial sums stay normal (``factors``)
_LARGEST = 2.0 ** 100  # max|A| * max|B| * rank * scale below this: nothing overflows


def _exactly_scalable(a32: Any, b32: Any, scale: float) -> bool:
    """Whether scaling A by the power of two ``scale`` before ``B @ A`` is exactly scaling the product after it
    (``_Group.factors``): one synchronisation."""
    import torch

    def smallest_nonzero(values: Any) -> Any:
        magnitude = values.abs()
        return magnitude.masked_fill_(magnitude == 0, float("inf")).amin()

    bounds = torch.stack([a32.abs().amax(), b32.abs().amax(), smallest_nonzero(a32), smallest_nonzero(b32)])
    largest_a, largest_b, smallest_a, smallest_b = bounds.tolist()
    rank = a32.shape[1]
    return (smallest_a >= _SMALLEST and smallest_b >= _SMALLEST
            and largest_a * largest_b * rank * max(scale, 1.0) < _LARGEST)


def _stacked(tensors: list[Any]) -> Any:
    """``torch.stack`` of 2-D tensors of one shape as one ``cat`` along rows viewed 3-D (no view of each input
    first: on the H200 host 36 us against 41 for a block of 21 experts, ``merged_stream_ops.py``)."""
    import torch

    first = tensors[0]
    return torch.cat(tensors).view(len(tensors), first.shape[0], first.shape[1])


def _budget(device: Any, fused: bool = False) -> int:
    """Bytes of float32 deltas one row range of one block may take (``fused``: of merged parameters one block
    may take): ``MOELORA_MERGE_BLOCK_MIB`` (or ``BLOCK_BUDGET_BYTES``, ``FUSED_BLOCK_BUDGET_BYTES``) on an
    accelerator, ``CPU_BLOCK_BUDGET_BYTES`` on the CPU."""
    if device.type == "cpu":
        return CPU_BLOCK_BUDGET_BYTES
    import os

    from moe_lora_plugins.envs import parse_merge_block_mib

    mib = parse_merge_block_mib(os.environ.get("MOELORA_MERGE_BLOCK_MIB"))
    if mib is not None:
        return mib << 20
    return FUSED_BLOCK_BUDGET_BYTES if fused else BLOCK_BUDGET_BYTES


def _row_range(whole: Any, part: Any) -> tuple[int, int] | None:
    """Where ``part`` lies in ``whole`` as a range of whole rows (a view of it), else ``None``."""
    if (part.dim() != 2 or part.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
            or part.stride() != whole.stride() or part.shape[1] != whole.shape[1]):
        return None
    offset = part.storage_offset() - whole.storage_offset()
    if offset % whole.stride(0):
        return None
    first = offset // whole.stride(0)
    return first, first + part.shape[0]


def _qualifies(task: Any, adapter_tasks: Any) -> bool:
    import torch
    from megatron.bridge.models.conversion.peft_bridge import ColumnParallelMapping, RowParallelMapping

    from moe_lora_plugins.patches.megatron_bridge.batched_merge import _plain_local_param

    if not isinstance(adapter_tasks, list) or len(adapter_tasks) != 1:
        return False
    adapter = adapter_tasks[0]
    mapping_types = (ColumnParallelMapping, RowParallelMapping)
    param = task.param_weight
    return (
        adapter.adapter_key is None
        and not adapter.requires_expert_splits
        and _plain_local_param(adapter.linear_in_task, mapping_types)
        and _plain_local_param(adapter.linear_out_task, mapping_types)
        and not getattr(task.mapping, "is_grouped_export", False)
        and type(param) in (torch.Tensor, torch.nn.Parameter)
        and param.dim() == 2
        and task.mapping.pp_size == 1
        and task.mapping.tp_size == 1
    )


def _make_group(instance: Any, key: tuple[Any, ...], ordered: list[tuple[Any, Any]]) -> _Group | None:
    tasks = [task for task, _ in ordered]
    adapters = [adapter for _, adapter in ordered]
    if any(type(task.mapping) is not type(tasks[0].mapping) for task in tasks):
        return None
    params = [t.param_weight for t in tasks]
    lora_a = [a.linear_in_task.param_weight for a in adapters]
    lora_b = [a.linear_out_task.param_weight for a in adapters]
    alpha, dim = adapters[0].alpha, adapters[0].dim
    p0, a0, b0 = params[0], lora_a[0], lora_b[0]
    if (any(p.shape != p0.shape or p.dtype != p0.dtype or p.device != p0.device for p in params)
            or any(a.shape != a0.shape or a.dtype != a0.dtype for a in lora_a)
            or any(b.shape != b0.shape or b.dtype != b0.dtype for b in lora_b)
            or any((a.alpha, a.dim) != (alpha, dim) for a in adapters)
            or a0.dim() != 2 or b0.dim() != 2 or a0.shape[1] != p0.shape[1] or b0.shape[1] != a0.shape[0]
            or b0.shape[0] != p0.shape[0]):
        return None
    converted = tasks[0].mapping.megatron_to_hf(p0, tasks[0].megatron_module)
    names = list(converted or ())
    if not names or instance._is_gdn_in_proj_split(names):
        return None
    if instance._is_fused_fc1_gate_up(names, b0, converted[names[0]].shape):
        parts = instance._split_fused_fc1_linear_out_weight(b0, is_expert=".local_experts." in key[1])
        split_rows = [_row_range(b0, part) for part in parts]
        if None in split_rows:
            return None
    else:
        split_rows = [(0, b0.shape[0])]
    return _Group(key, params, lora_a, lora_b, alpha, dim, split_rows)  # type: ignore[arg-type]


def _verify(instance: Any, models: Any, group: _Group, tasks: list[Any], adapters: list[Any]) -> bool:
    """Pick the group's row ranges: all rows in one product where that is bitwise upstream's merge (one
    product per range upstream splits, such as gate and up, otherwise); ``False`` where neither is."""
    budget = _budget(group.params[0].device)
    whole = [(0, group.lora_b[0].shape[0])]
    if group.fused_possible():
        group.fused = True
        group.use_rows(whole, _budget(group.params[0].device, fused=True))
        try:
            equal = _verify_rows(instance, models, group, tasks, adapters)
        except Exception as error:  # noqa: BLE001 - Triton could not compile or launch it here: the bmm blocks
            log.warning("moe-lora-plugins: the fused merge kernel failed for %s on %s (%r): those are merged by bmm "
                        "blocks; MOELORA_FUSED_MERGE=off skips it", group.key[1], group.params[0].device, error)
            equal = False
        else:
            if not equal:
                log.info("moe-lora-plugins: the fused merge kernel's blocks differ from Megatron-Bridge's merge for "
                         "%s on %s: those are merged by bmm blocks", group.key[1], group.params[0].device)
        if equal:
            return True
        group.fused, group.table = False, None
    for rows in ([whole, group.split_rows] if group.split_rows != whole else [whole]):
        group.use_rows(rows, budget)
        if _verify_rows(instance, models, group, tasks, adapters):
            return True
    log.warning("moe-lora-plugins: the per-layer merged export differs from Megatron-Bridge's merge for %s on %s: "
                "those go through upstream's per-tensor merge", group.key[1], group.params[0].device)
    return False


def _verify_rows(instance: Any, models: Any, group: _Group, tasks: list[Any], adapters: list[Any]) -> bool:
    """Every block shape of ``group`` checked once per process: its merged members, through upstream's
    mapping, bitwise upstream's ``_merge_lora_adapter_weights`` of upstream's mapping output; with A scaled by a
    power-of-two scale up front (``_Group.factors``) too, which is dropped for the group where it differs."""
    factors: dict[bool, Any] = {}
    for start, stop in group.blocks:
        for prescale in ((False, True) if group.prescale and not group.fused else (False,)):
            signature = group.signature(tasks[0].mapping, start, stop, prescale)
            equal = _verified.get(signature)
            if equal is None and group.fused:  # the kernel reads the members where they lie: no factors
                equal = _verified[signature] = _block_is_upstreams(
                    instance, models, group.merged_block(start, stop, None), start, tasks, adapters)
            if equal is None:
                if prescale not in factors:
                    factors[prescale] = group.factors(prescale)
                if factors[prescale][2] != prescale:  # these values may not be scaled up front: left unchecked,
                    group.prescale = False  # so the group keeps the multiply after each product
                    continue
                equal = _verified[signature] = _block_is_upstreams(
                    instance, models, group.merged_block(start, stop, factors[prescale]), start, tasks, adapters)
                if not equal:
                    log.info("moe-lora-plugins: merged-stream block %s is not upstream's merge", signature)
            if not equal and not prescale:
                return False
            if not equal:
                group.prescale = False
    return True


def _block_is_upstreams(instance: Any, models: Any, block: Any, start: int, tasks: list[Any],
                        adapters: list[Any]) -> bool:
    import torch
    from megatron.bridge.models.conversion.model_bridge import MegatronWeightTuple
    from megatron.bridge.models.conversion.peft_bridge import AdapterWeight

    for member in range(start, start + block.shape[0]):
        task, adapter = tasks[member], adapters[member]
        linear_in, linear_out = adapter.linear_in_task, adapter.linear_out_task
        materialized = AdapterWeight(
            global_base_prefix=adapter.global_base_prefix, adapter_key=None, alpha=adapter.alpha, dim=adapter.dim,
            linear_in_weight=MegatronWeightTuple(linear_in.param_name, linear_in.param_weight, linear_in.vp_stage),
            linear_out_weight=MegatronWeightTuple(linear_out.param_name, linear_out.param_weight, linear_out.vp_stage),
        )
        base = dict(task.mapping.megatron_to_hf(task.param_weight, task.megatron_module))
        reference = instance._merge_lora_adapter_weights(models, base, [materialized])
        ours = task.mapping.megatron_to_hf(block[member - start], task.megatron_module)
        if list(ours) != list(reference) or not all(torch.equal(ours[n], reference[n]) for n in reference):
            return False
    return True


def _build_plan(instance: Any, models: Any, tasks: list[Any]) -> _Plan:
    from moe_lora_plugins.patches.megatron_bridge._export_common import model_list

    chunks = model_list(models)
    by_base = instance.build_adapter_conversion_tasks(chunks)
    members: dict[tuple[Any, ...], list[tuple[Any, Any, str]]] = {}
    for task in tasks:
        name = getattr(task, "global_param_name", None)
        if not isinstance(name, str) or not name.endswith(_WRAPPED):
            continue
        base = name[: -len(_WRAPPED)]
        adapter_tasks = by_base.get(base)
        if not _qualifies(task, adapter_tasks):
            continue
        # one group per (virtual stage, projection of every layer / expert): e.g. all experts' fc1 of all layers
        key = (task.vp_stage or 0, _INDEX.sub(".#.", base))
        members.setdefault(key, []).append((task, adapter_tasks[0], base))
    entries: dict[int, tuple[_Group, int]] = {}
    prefixes = set()
    for key, found in members.items():
        ordered = [(task, adapter) for task, adapter, _ in found]
        group = _make_group(instance, key, ordered)
        if group is None:
            continue
        if not _verify(instance, models, group, [t for t, _ in ordered], [a for _, a in ordered]):
            continue
        for index, (task, _, base) in enumerate(found):
            entries[id(task)] = (group, index)
            prefixes.add(base)  # the key upstream looks the adapter tasks up by
    return _Plan(list(tasks), entries, frozenset(prefixes))


def plan_tasks(instance: Any, models: Any, hf_pretrained: Any, conversion_tasks: Any
               ) -> tuple[Any, frozenset[str], Any] | None:
    """The conversion tasks to hand upstream for this merged stream, the adapter bases it merges itself (none
    where no group qualifies: the tasks are then upstream's own, built once) and the conversion-task cache
    entry checked for this call; ``None`` under expert or pipeline parallelism (upstream's stream as it is)."""
    import torch.distributed as dist

    from moe_lora_plugins.patches.megatron_bridge._export_common import ep_group_and_size, model_list

    if ep_group_and_size(models)[1] != 1:
        return None
    if dist.is_available() and dist.is_initialized():
        from megatron.bridge.models.conversion.model_bridge import _get_pp_group

        try:
            group = _get_pp_group(models)
        except (AssertionError, RuntimeError):  # no pipeline group to be found: leave the stream to upstream
            return None
        if group is not None and dist.get_world_size(group) > 1:
            return None
    from moe_lora_plugins.patches.megatron_bridge.conversion_tasks_cache import last_checked_entry

    chunks = model_list(models)
    checked = None
    if conversion_tasks is None:
        tasks = instance.build_conversion_tasks(hf_pretrained, chunks)
        checked = last_checked_entry()
    else:
        tasks = conversion_tasks
    if not isinstance(tasks, list):
        return None
    plan = _plans.get(chunks[0])
    if plan is None or not plan.made_for(tasks):
        plan = _plans[chunks[0]] = _build_plan(instance, models, tasks)
    if not plan.entries:
        return tasks, frozenset(), checked
    return _MergedTasks(instance, tasks, plan), plan.prefixes, checked


def _finished_alike(first: Any, task: Any) -> bool:
    """Whether upstream's loop does the same with ``task``'s HF tensors as with ``first``'s once they are made
    (same export hook, same export dtype), so that both may reach it as one task."""
    return (getattr(task, "export_hook", None) is getattr(first, "export_hook", None)
            and getattr(task, "weight_dtype", None) == getattr(first, "weight_dtype", None))


def _runs_allowed(instance: Any) -> bool:
    """A run of planned tasks may reach upstream's loop as one task where the bridge post-processes the HF
    tensors of a task as Megatron-Bridge's base class does (not at all): a bridge that overrides
    ``maybe_modify_converted_hf_weight`` (DeepSeek-V3, GLM-4.7-Flash, ...) gets one task per tensor."""
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge

    base = MegatronModelBridge.maybe_modify_converted_hf_weight
    return (getattr(type(instance), "maybe_modify_converted_hf_weight", None) is base
            and "maybe_modify_converted_hf_weight" not in getattr(instance, "__dict__", {}))


class _Merging:
    """One stream's merge state: each group's current block of merged parameters, its stacked factors and
    its members' versions when those were read, and the float32 scratch buffer of its products."""

    __slots__ = ("instance", "live", "scratch")

    def __init__(self, instance: Any) -> None:
        self.instance = instance
        # group -> [block start, block stop, the block's members' merged parameters, stacked factors,
        #           every member's versions when the factors were read]
        self.live: dict[_Group, list[Any]] = {}
        self.scratch = _Scratch()  # freed with the stream

    def merged(self, group: _Group, member: int, param: Any, lora_a: Any, lora_b: Any) -> Any:
        """``member``'s merged parameter: its slice of its block, or (changed in place since its group's factors
        were read, as upstream would see it) merged alone by upstream's own merge."""
        live = self.live
        state = live.get(group)
        if state is None:
            versions = group.versions()  # before the factors and parameters are read
            state = live[group] = [-1, -1, (), None if group.fused else group.factors(), versions]
        if not state[0] <= member < state[1]:
            start, stop = group.block_of(member)
            state[2] = ()  # the last block freed before the next is made (where the caller holds none of it)
            state[:3] = [start, stop, group.merged_block(start, stop, state[3], self.scratch).unbind(0)]
        if state[4][member] == (param._version, lora_a._version, lora_b._version):
            merged = state[2][member - state[0]]
        else:
            merged = group.merged_alone(self.instance, member)
        if member == group.last:
            del live[group]  # the group's last member: its block is the caller's now, its factors freed
        return merged


class _RunWeights:
    """What upstream's loop gets from a run's ``megatron_to_hf``: ``items()`` walks the run's tasks in order and,
    as upstream asks for the next item, merges each (its block computed when its first member is reached) and
    yields what the task's own mapping makes of its merged parameter. Upstream's 0.6 loop only calls
    ``items()`` on it (through ``maybe_modify_converted_hf_weight`` and ``_cast_export_weight_dtype``, which hand it
    on); anything else means the loop changed, and is refused."""

    __slots__ = ("merging", "run")

    def __init__(self, run: list[tuple[Any, ...]], merging: _Merging) -> None:
        self.run, self.merging = run, merging

    def items(self) -> Iterator[tuple[str, Any]]:
        merged, live = self.merging.merged, self.merging.live
        for task, group, member, param, lora_a, lora_b in self.run:
            # ``_Merging.merged`` inlined for a member of the live block, unchanged, not its group's last
            state = live.get(group)
            if (state is not None and state[0] <= member < state[1] and member != group.last
                    and state[4][member] == (param._version, lora_a._version, lora_b._version)):
                weight = state[2][member - state[0]]
            else:
                weight = merged(group, member, param, lora_a, lora_b)
            yield from task.mapping.megatron_to_hf(weight, task.megatron_module).items()

    def __getattr__(self, name: str) -> Any:
        from moe_lora_plugins.errors import MoeLoraError

        raise MoeLoraError(
            f"the per-layer merged export's run of tasks was used through {name!r}, not items(): Megatron-Bridge's "
            "export loop changed. Disable the patch with MOELORA_DISABLED_PATCHES=megatron_bridge.batched_expert_merge "
            "and report it to moe-lora-plugins."
        )


class _RunMapping:
    """The mapping of a run's task: ``megatron_to_hf`` returns the run's :class:`_RunWeights`; any other
    attribute is the first task's mapping's (upstream reads ``is_grouped_export``)."""

    __slots__ = ("first", "weights")

    def __init__(self, first: Any, weights: _RunWeights) -> None:
        self.first, self.weights = first, weights

    def megatron_to_hf(self, megatron_weights: Any, megatron_module: Any) -> _RunWeights:
        return self.weights

    def __getattr__(self, name: str) -> Any:
        return getattr(self.first, name)


class _MergedTasks:
    """Upstream's task list with the planned tasks merged: each run of consecutive planned tasks handed out
    as one task whose mapping makes every member's HF tensors from its merged weight, in upstream's order (or,
    for a bridge that post-processes each task's tensors, each planned task as a copy holding its merged
    weight)."""

    def __init__(self, instance: Any, tasks: list[Any], plan: _Plan) -> None:
        self._instance, self._tasks, self._plan = instance, tasks, plan
        self._runs = _runs_allowed(instance)

    def __len__(self) -> int:
        return len(self._plan.segments) if self._runs else len(self._tasks)

    def __iter__(self) -> Iterator[Any]:
        new_task = object.__new__
        merging = _Merging(self._instance)
        if self._runs:
            for task, run in self._plan.segments:
                if run is None:
                    yield task
                    continue
                proxy = new_task(type(task))
                proxy.__dict__.update(task.__dict__)
                proxy.__dict__["mapping"] = _RunMapping(task.mapping, _RunWeights(run, merging))
                yield proxy
            return
        merged = merging.merged
        for task, hit in zip(self._tasks, self._plan.by_position, strict=True):
            if hit is None:
                yield task
                continue
            proxy = new_task(type(task))
            proxy.__dict__.update(task.__dict__)
            proxy.__dict__["param_weight"] = merged(*hit)
            yield proxy


def stream(wrapped: Any, call: dict[str, Any], planned: tuple[Any, frozenset[str], Any]) -> Iterator[Any]:
    """Upstream's merged stream over the planned tasks, with the planned experts left out of its merge tasks."""
    from moe_lora_plugins.errors import MoeLoraError

    tasks, prefixes, checked = planned
    inner = wrapped(**{**call, "conversion_tasks": tasks})
    if not prefixes:  # nothing planned: upstream's merged stream over the tasks already built
        yield from inner
        return
    exclusion = _Exclusion(prefixes, checked)
    token = _EXCLUDED.set(exclusion)
    try:
        first = next(inner, _END)
    finally:
        _EXCLUDED.reset(token)
    if not exclusion.used:
        inner.close()
        raise MoeLoraError(
            "the per-layer merged export handed Megatron-Bridge merged expert weights, but the stream did not "
            "build its adapter merge tasks before its first item, so it could merge them a second time; nothing "
            "was exported. Megatron-Bridge's stream changed: disable the patch with "
            "MOELORA_DISABLED_PATCHES=megatron_bridge.batched_expert_merge and report it to moe-lora-plugins."
        )
    if first is _END:
        return
    yield first
    yield from inner


_END = object()

"""Several LoRA adapters on one frozen Megatron model: each target linear wrapped once, one (A, B, scale)
per adapter slot inside, each sample's rows through its own adapter (:mod:`.routing`).

:func:`apply_multi_lora` wraps every ``linear_qkv`` / ``linear_proj`` / ``linear_fc1`` / ``linear_fc2`` of
the model chunks (routed experts' SequentialMLP linears included) and freezes the base;
:func:`add_adapter` materialises one adapter's factors in a slot (its own rank, alpha, targets, expert
coverage, seeded initialisation), :func:`remove_adapter` frees the slot. :func:`adapter_parameters`
names an adapter's parameters on this rank as Megatron-Bridge's single-adapter LoRA would
(``...linear_qkv.adapter.linear_in.weight``, global layer and expert numbers), so its checkpoints are
keyed by layout-free names and :func:`gather_adapter_of_slot` converts it with this suite's
Megatron -> PEFT converter like the single adapter.

Supported: tensor-parallel and expert-tensor-parallel size 1, the local (non-TE) layer spec with
SequentialMLP experts (``moe_grouped_gemm=False``), any PP / VPP / EP; anything else is refused by name.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_lora_plugins.errors import MoeLoraError
from moe_lora_plugins.multilora.controller import KNOWN_TARGETS, AdapterSpec
from moe_lora_plugins.multilora.routing import LoraFactors, RoutingError, current_routing, routed_lora_delta
from moe_lora_plugins.topology.naming import global_param_name, unwrap_model_chunk

_SLOT_IN_NAME = re.compile(r"\.adapters\.(\d+)\.")


class MultiLoraSetupError(MoeLoraError, ValueError):
    """The model or layout cannot carry multi-LoRA as asked; the message names what and the fix."""


@dataclass(frozen=True)
class MultiLoraSetup:
    """The LoRA config that asks the ``multi_lora`` plugin's ``on_build_model`` to wrap these targets (adapters
    are added per slot afterwards with :func:`add_adapter`)."""

    targets: tuple[str, ...] = KNOWN_TARGETS


class AdapterFactors(nn.Module):
    """One adapter's LoRA on one linear: ``linear_in`` (A, rank x in), ``linear_out`` (B, out x rank), ``scale``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.linear_in = nn.Linear(in_features, rank, bias=False)
        self.linear_out = nn.Linear(rank, out_features, bias=False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = float(alpha) / rank

    def factors(self) -> LoraFactors:
        return LoraFactors(self.linear_in.weight, self.linear_out.weight, self.scale)


class MultiLoraLinear(nn.Module):
    """A Megatron linear plus any number of adapters, one per slot; the forward adds each sample's own delta.

    ``is_expert`` marks a routed expert's linear: its input rows are dispatched tokens, so the forward's
    routing must give every sample one adapter (see :mod:`.routing`).
    """

    def __init__(self, to_wrap: nn.Module, target: str, is_expert: bool, in_features: int, out_features: int,
                 module_name: str) -> None:
        super().__init__()
        self.to_wrap = to_wrap
        self.target = target
        self.is_expert = is_expert
        self.in_features = in_features
        self.out_features = out_features
        self.module_name = module_name
        self.adapters = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (code that reads ``linear.weight`` sees the base, as with one adapter off)."""
        return self.to_wrap.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.to_wrap, "bias", None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = self.to_wrap(x, *args, **kwargs)
        if not isinstance(result, tuple) or len(result) != 2 or isinstance(result[0], tuple):
            raise MultiLoraSetupError(
                f"{self.module_name}: expected the wrapped linear to return (output, bias); got "
                f"{type(result).__name__} (layer norm fused into the linear? use the local layer spec)"
            )
        output, bias = result
        if not len(self.adapters):
            return output, bias
        routing = current_routing()
        if routing is None:
            raise RoutingError(
                f"{self.module_name}: a multi-LoRA forward needs the samples' adapters; run it inside "
                "moe_lora_plugins.multilora.routing.adapter_routing(slots)"
            )
        factors = {int(slot): module.factors() for slot, module in self.adapters.items()}
        delta = routed_lora_delta(x, factors, routing, self.out_features,
                                  sample_dim=None if self.is_expert else 1, where=self.module_name)
        if delta is None:
            return output, bias
        return output + delta.reshape(output.shape).to(output.dtype), bias


def _is_routed_expert(name: str) -> bool:
    return ".experts." in name and ".shared_experts." not in name


def _linear_features(module: nn.Module, name: str) -> tuple[int, int]:
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 2:
        raise MultiLoraSetupError(
            f"{name}: {type(module).__name__} has no 2-D weight; multi-LoRA supports SequentialMLP experts and "
            "plain Megatron linears (build with moe_grouped_gemm=False and the local layer spec)"
        )
    out_features, in_features = weight.shape
    return int(in_features), int(out_features)


def _check_layout() -> None:
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # no Megatron here, so no Megatron parallel layout to check
        return
    if not ps.model_parallel_is_initialized():
        return
    tp, etp = ps.get_tensor_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    if tp != 1 or etp != 1:
        raise MultiLoraSetupError(
            f"multi-LoRA needs tensor_model_parallel_size 1 and expert_tensor_parallel_size 1 (got {tp} and {etp}); "
            "use PP, VPP and EP for scale"
        )


def apply_multi_lora(model_chunks: list[nn.Module], targets: Iterable[str] = KNOWN_TARGETS,
                     check_layout: bool = True) -> list[MultiLoraLinear]:
    """Freeze every parameter of the chunks and wrap each target linear in a :class:`MultiLoraLinear` (no
    adapter yet). Returns the wrappers. Call before any DDP wrapping (a pre-wrap hook)."""
    if check_layout:
        _check_layout()
    targets = tuple(targets)
    wrappers: list[MultiLoraLinear] = []
    for chunk in model_chunks:
        grouped = [name for name, module in chunk.named_modules()
                   if name.rsplit(".", 1)[-1] == "experts" and not hasattr(module, "local_experts")]
        if grouped:
            raise MultiLoraSetupError(
                f"{grouped[0]}: grouped-GEMM experts ({type(chunk.get_submodule(grouped[0])).__name__}) hold every "
                "local expert in one module; multi-LoRA needs SequentialMLP experts (moe_grouped_gemm=False)"
            )
        for param in chunk.parameters():
            param.requires_grad_(False)
        found = [(name, module) for name, module in chunk.named_modules()
                 if name.rsplit(".", 1)[-1] in targets and not isinstance(module, MultiLoraLinear)
                 and ".to_wrap" not in name]
        for name, module in found:
            parent_name, _, attr = name.rpartition(".")
            parent = chunk.get_submodule(parent_name) if parent_name else chunk
            in_features, out_features = _linear_features(module, name)
            wrapper = MultiLoraLinear(module, attr, _is_routed_expert(name), in_features, out_features, name)
            setattr(parent, attr, wrapper)
            wrappers.append(wrapper)
    if not wrappers:
        raise MultiLoraSetupError(f"no module named one of {list(targets)} in the model chunks")
    return wrappers


def _wrappers(model_chunks: list[nn.Module]) -> list[tuple[nn.Module, str, MultiLoraLinear]]:
    return [(chunk, name, module) for chunk in model_chunks for name, module in chunk.named_modules()
            if isinstance(module, MultiLoraLinear)]


def bridge_name(global_name: str) -> str:
    """``...linear_qkv.adapters.<slot>.linear_in.weight`` -> ``...linear_qkv.adapter.linear_in.weight``."""
    return _SLOT_IN_NAME.sub(".adapter.", global_name, count=1)


def lora_init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """LoRA A ~ N(0, 1/in) seeded by the adapter's seed and the parameter's layout-free name; LoRA B zero.
    Every replica and every layout gets the same values."""
    if ".linear_out." in name:
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed((zlib.crc32(name.encode()) + 7919 * seed) % (2**63))
    return torch.randn(shape, generator=generator) / float(shape[-1]) ** 0.5


def add_adapter(model_chunks: list[nn.Module], slot: int, spec: AdapterSpec) -> int:
    """Materialise ``spec`` in ``slot`` on every matching wrapper (seeded A, zero B); returns the parameter
    count on this rank. The slot must be free."""
    created = 0
    wrappers = _wrappers(model_chunks)
    for _, name, wrapper in wrappers:
        if str(slot) in wrapper.adapters:
            raise MultiLoraSetupError(f"slot {slot} already holds an adapter at {name}; remove_adapter first")
    for _, _, wrapper in wrappers:
        if wrapper.target not in spec.targets or (wrapper.is_expert and not spec.experts):
            continue
        factors = AdapterFactors(wrapper.in_features, wrapper.out_features, spec.rank, spec.alpha)
        wrapper.adapters[str(slot)] = factors.to(wrapper.to_wrap.weight.dtype)
    with torch.no_grad():
        for name, param in adapter_parameters(model_chunks, slot).items():
            param.copy_(lora_init(name, tuple(param.shape), spec.seed))
            param.requires_grad_(True)
            created += param.numel()
    return created


def remove_adapter(model_chunks: list[nn.Module], slot: int) -> int:
    """Drop the adapter in ``slot`` from every wrapper; returns how many wrappers held it."""
    removed = 0
    for _, _, wrapper in _wrappers(model_chunks):
        if str(slot) in wrapper.adapters:
            del wrapper.adapters[str(slot)]
            removed += 1
    return removed


def adapter_parameters(model_chunks: list[nn.Module], slot: int) -> dict[str, nn.Parameter]:
    """This rank's parameters of the adapter in ``slot``, by global single-adapter (Megatron-Bridge) name."""
    out: dict[str, nn.Parameter] = {}
    marker = f".adapters.{slot}."
    for chunk in model_chunks:
        for local_name, param in chunk.named_parameters():
            if marker in local_name:
                name = bridge_name(global_param_name(chunk, local_name))
                if name in out:
                    raise MultiLoraSetupError(f"two parameters of slot {slot} map to {name}")
                out[name] = param
    return out


def slots_present(model_chunks: list[nn.Module]) -> list[int]:
    """Slots that hold an adapter somewhere on this rank."""
    return sorted({int(s) for _, _, w in _wrappers(model_chunks) for s in w.adapters})


def gather_adapter_of_slot(model_chunks: list[nn.Module], slot: int, spec: AdapterSpec, family: str,
                           dst: int | None = 0) -> Any:
    """The adapter in ``slot`` over every rank as a PEFT-form ``LoraAdapter`` (on ``dst``; every rank when
    ``None``). Collective. Data-parallel replicas must hold equal values."""
    import torch.distributed as dist

    from moe_lora_plugins.lora.convert import megatron_to_peft
    from moe_lora_plugins.lora.families import ModelDims

    local = {name: p.detach().to("cpu", copy=True) for name, p in adapter_parameters(model_chunks, slot).items()}
    parts: list[Any] = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        if dst is None:
            dist.all_gather_object(parts, local)
        else:
            dist.gather_object(local, parts if dist.get_rank() == dst else None, dst=dst)
            if dist.get_rank() != dst:
                return None
    merged: dict[str, torch.Tensor] = {}
    for rank, tensors in enumerate(parts):
        for name, tensor in tensors.items():
            if name in merged and not torch.equal(merged[name], tensor):
                raise MultiLoraSetupError(f"adapter {spec.name!r}: {name} differs on rank {rank} from an earlier replica")
            merged.setdefault(name, tensor)
    if not merged:
        raise MultiLoraSetupError(f"adapter {spec.name!r} (slot {slot}) has no parameters on any rank")
    config = unwrap_model_chunk(model_chunks[0]).config
    dims = ModelDims(config.num_attention_heads, config.num_query_groups or config.num_attention_heads,
                     config.kv_channels, config.num_moe_experts or 0)
    return megatron_to_peft(merged, family, dims, alpha=spec.alpha)

"""Local -> global numbering of Megatron parameter names for pipeline and expert parallelism.

Three expert families are told apart by name:

* ``SequentialMLP``: ``...mlp.experts.local_experts.{e}.linear_fc1.weight`` (one module per expert;
  LoRA adapters live under it: ``...local_experts.{e}.linear_fc1.adapter.linear_in.weight``);
* ``TEGroupedMLP``: ``...mlp.experts.linear_fc1.weight{e}`` / ``bias{e}`` (one parameter per expert;
  its LoRA adapter ``...experts.linear_fc1.adapter.linear_in.weight`` is shared (2-D) or per-expert
  (3-D, ``share_expert_adapters=False``) and carries no expert number in its name);
* legacy ``GroupedMLP``: ``...mlp.experts.weight1`` / ``weight2`` (every local expert packed in one
  tensor: the digit names fc1 / fc2, it is *not* an expert number).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

_LAYER = re.compile(r"(?<![A-Za-z0-9_])layers\.(\d+)\.")
_SEQUENTIAL = re.compile(r"\.experts\.local_experts\.(\d+)\.")
_GROUPED = re.compile(r"\.experts\.linear_fc[12]\.(?:weight|bias)(\d+)$")
_LEGACY_GROUPED = re.compile(r"\.experts\.weight[12]$")
_HF_EXPERT = re.compile(r"\.experts\.(\d+)\.")


class ExpertFamily(str, enum.Enum):
    """Which Megatron expert implementation a parameter belongs to (``NONE`` for dense ones)."""

    NONE = "none"
    SEQUENTIAL = "sequential"  # SequentialMLP: local_experts.{e}
    GROUPED = "grouped"  # TEGroupedMLP: linear_fc{1,2}.weight{e}
    GROUPED_ADAPTER = "grouped-adapter"  # TEGroupedMLP LoRA: all local experts in one (2-D or 3-D) tensor
    LEGACY_GROUPED = "legacy-grouped"  # GroupedMLP: experts.weight{1,2}, all local experts packed


@dataclass(frozen=True)
class MegatronParamRef:
    """What a Megatron parameter name says about its place: layer, expert number, family, adapter."""

    name: str
    layer: int | None
    expert: int | None
    family: ExpertFamily
    is_adapter: bool

    @property
    def is_expert(self) -> bool:
        return self.family is not ExpertFamily.NONE


def parse_megatron_name(name: str) -> MegatronParamRef:
    """Read the layer number, the expert number (if the name carries one) and the expert family."""
    layer_match = _LAYER.search(name)
    layer = int(layer_match.group(1)) if layer_match else None
    is_adapter = ".adapter." in name
    expert: int | None = None
    family = ExpertFamily.NONE
    if (match := _SEQUENTIAL.search(name)) is not None:
        family, expert = ExpertFamily.SEQUENTIAL, int(match.group(1))
    elif ".experts.linear_fc" in name and is_adapter:
        family = ExpertFamily.GROUPED_ADAPTER
    elif (match := _GROUPED.search(name)) is not None:
        family, expert = ExpertFamily.GROUPED, int(match.group(1))
    elif _LEGACY_GROUPED.search(name) is not None:
        family = ExpertFamily.LEGACY_GROUPED
    return MegatronParamRef(name=name, layer=layer, expert=expert, family=family, is_adapter=is_adapter)


def _check_ep(num_experts: int, ep_size: int, ep_rank: int) -> None:
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"expert-parallel rank {ep_rank} is not in [0, {ep_size})")
    if num_experts % ep_size != 0:
        raise ValueError(
            f"{num_experts} experts cannot be split evenly over expert-parallel size {ep_size}; "
            "choose an EP size that divides the number of experts"
        )


def global_expert_index(local_expert: int, ep_rank: int, ep_size: int, num_experts: int) -> int:
    """Global number of local expert ``local_expert`` on EP rank ``ep_rank`` (contiguous blocks)."""
    _check_ep(num_experts, ep_size, ep_rank)
    per_rank = num_experts // ep_size
    if not 0 <= local_expert < per_rank:
        raise ValueError(
            f"local expert {local_expert} is out of range: each of the {ep_size} EP ranks holds "
            f"{per_rank} of {num_experts} experts"
        )
    return ep_rank * per_rank + local_expert


def expert_owner(global_expert: int, ep_size: int, num_experts: int) -> tuple[int, int]:
    """``(ep_rank, local_expert)`` that holds global expert ``global_expert``."""
    _check_ep(num_experts, ep_size, 0)
    if not 0 <= global_expert < num_experts:
        raise ValueError(f"expert {global_expert} is out of range for {num_experts} experts")
    per_rank = num_experts // ep_size
    return divmod(global_expert, per_rank)


def _replace_group(name: str, match: re.Match[str], value: int) -> str:
    start, end = match.span(1)
    return f"{name[:start]}{value}{name[end:]}"


def globalize_megatron_name(
    name: str,
    *,
    global_layer: int | None,
    ep_rank: int = 0,
    ep_size: int = 1,
    num_experts: int | None = None,
) -> str:
    """The world-size-1 name of a rank-local Megatron parameter name.

    ``global_layer`` replaces the layer number (``None``: leave it). Under ``ep_size > 1`` the
    expert number of ``local_experts.{e}`` (LoRA adapters included) and of grouped
    ``weight{e}`` / ``bias{e}`` becomes global. Grouped LoRA adapters and legacy ``weight1`` /
    ``weight2`` carry no expert number and keep their name.
    """
    if global_layer is not None and (layer_match := _LAYER.search(name)) is not None:
        name = _replace_group(name, layer_match, global_layer)
    if ep_size == 1:
        return name
    ref = parse_megatron_name(name)
    if ref.family not in (ExpertFamily.SEQUENTIAL, ExpertFamily.GROUPED):
        return name
    if num_experts is None:
        raise ValueError(f"num_experts is needed to globalize expert parameter {name!r} under EP={ep_size}")
    pattern = _SEQUENTIAL if ref.family is ExpertFamily.SEQUENTIAL else _GROUPED
    match = pattern.search(name)
    assert match is not None and ref.expert is not None
    return _replace_group(name, match, global_expert_index(ref.expert, ep_rank, ep_size, num_experts))


def hf_expert_index(hf_name: str) -> int | None:
    """The expert number in an HF name (``...mlp.experts.{e}.gate_proj...``), or ``None``."""
    match = _HF_EXPERT.search(hf_name)
    return int(match.group(1)) if match else None


def hf_layer_index(hf_name: str) -> int | None:
    """The layer number in an HF name (``model.layers.{l}....``), or ``None``."""
    match = _LAYER.search(hf_name)
    return int(match.group(1)) if match else None


_CHUNK_LAYER = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.")


def unwrap_model_chunk(chunk: Any) -> Any:
    """The GPT model inside DDP / Float16Module wrappers (the first object with a ``decoder``)."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def global_param_name(chunk: Any, local_name: str) -> str:
    """The name a parameter of a live model chunk has in the world-size-1 model.

    Read from the modules themselves, not from any bridge's naming: the layer number from
    ``TransformerLayer.layer_number`` (1-based, already global across PP and VPP), the expert number
    of a ``local_experts.{e}`` module from ``MoELayer.local_expert_indices`` (global across EP).
    ``module.`` wrapper prefixes are dropped. Duck-typed: no Megatron import.
    """
    model = unwrap_model_chunk(chunk)
    name = local_name
    while name.startswith("module."):
        name = name[len("module."):]
    layer_match = _CHUNK_LAYER.search(name)
    if layer_match is None:
        return name
    layer = model.decoder.layers[int(layer_match.group(1))]
    expert_match = _SEQUENTIAL.search(name)
    if expert_match is not None:
        expert = layer.mlp.local_expert_indices[int(expert_match.group(1))]
        name = f"{name[: expert_match.start()]}.experts.local_experts.{expert}.{name[expert_match.end():]}"
    start, end = layer_match.span(1)
    return f"{name[:start]}{layer.layer_number - 1}{name[end:]}"

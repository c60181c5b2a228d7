"""Megatron LoRA tensors <-> HF PEFT names and tensors, driven by the model-family tables.

Input on the Megatron side: global parameter names (layer and expert indices already global, as a
world-size-1 model names them) with tensors gathered over (expert-)TP in rank order; ``tp`` and
``expert_tp`` say how many slices each gathered tensor holds (1 for a world-size-1 model). Output on
the HF side: a :class:`LoraAdapter` in PEFT's per-module form, ``base_model.model.<hf module>.lora_A.weight``
(experts one module each, ``mlp.experts.{e}.gate_proj``). Tensors that Megatron shares (LoRA A of a
fused module, an expert adapter shared by all experts) come out as the *same* tensor object under every
name, so nothing is copied and :mod:`moe_lora_plugins.lora.wire` can send them once.

A name that no table rule covers raises :class:`UnknownLoraNameError` naming it: nothing is dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_lora_plugins.errors import MoeLoraError
from moe_lora_plugins.lora.families import ModelDims, ModelFamily, ModuleRule, get_family
from moe_lora_plugins.lora.shards import (
    fuse_gate_up_lora_b,
    fuse_qkv_lora_b,
    split_gate_up_lora_b,
    split_qkv_lora_b,
)

PEFT_PREFIX = "base_model.model."
_SIDES = {"linear_in": "lora_A", "linear_out": "lora_B"}
_MEGATRON_NAME = re.compile(
    r"^(?:module\.)*(?P<layers>[\w.]*?layers)\.(?P<layer>\d+)\.(?P<module>.+?)\.adapter\."
    r"(?:(?P<key>adapter_\w+)\.)?(?P<side>linear_in|linear_out)\.weight$"
)
_PEFT_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<layers>[\w.]*?layers)\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<side>lora_A|lora_B)"
    r"(?:\.(?P<adapter>[\w-]+))?\.weight$"
)
_LOCAL_EXPERT = re.compile(r"^(?P<experts>.+)\.local_experts\.(?P<expert>\d+)\.(?P<fc>linear_fc[12])$")
_HF_EXPERT = re.compile(r"^(?P<experts>.+)\.(?P<expert>\d+)\.(?P<proj>\w+)$")


class UnknownLoraNameError(MoeLoraError, KeyError):
    """A LoRA tensor name that the model family's table does not cover (nothing is dropped silently)."""

    def __str__(self) -> str:
        return str(self.args[0])


class AdapterShapeError(MoeLoraError, ValueError):
    """LoRA tensors whose shapes do not fit together (rank mismatch, missing half of a pair, ...)."""


@dataclass
class LoraAdapter:
    """A LoRA adapter in PEFT's per-module form: ``tensors`` keyed by PEFT names, plus its scaling.

    ``alpha`` is LoRA alpha (scaling is ``alpha / r`` per module, as in Megatron-Bridge and PEFT);
    ranks are read from the tensors. ``num_experts`` is the routed expert count (0 for dense models).
    """

    tensors: dict[str, torch.Tensor]
    alpha: float
    family: ModelFamily
    num_experts: int = 0
    base_model_name_or_path: str | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """HF module name (``model.layers.0.self_attn.q_proj``) -> (lora_A, lora_B)."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.tensors.items():
            module, side = split_peft_name(name)
            pairs.setdefault(module, {})[side] = tensor
        out = {}
        for module, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise AdapterShapeError(f"{module}: has {sorted(pair)}, needs both lora_A and lora_B")
            out[module] = (pair["lora_A"], pair["lora_B"])
        return out

    def module_ranks(self) -> dict[str, int]:
        return {module: int(a.shape[0]) for module, (a, _) in self.modules().items()}

    @property
    def rank(self) -> int:
        """The most common rank (PEFT's ``r``); other ranks go into ``rank_pattern``."""
        return Counter(self.module_ranks().values()).most_common(1)[0][0]

    def peft_config(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT (and vLLM's ``PEFTHelper``) reads for this adapter."""
        ranks = self.module_ranks()
        rank = self.rank
        rank_pattern = {re.escape(module): r for module, r in sorted(ranks.items()) if r != rank}
        targets = sorted({module.rsplit(".", 1)[-1] for module in ranks})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "target_modules": targets,
            "rank_pattern": rank_pattern,
            "alpha_pattern": {},
            "modules_to_save": None,
        }
        config.update(self.extra_config)
        return config

    def nbytes(self) -> int:
        """Bytes of the distinct tensors (a tensor shared under several names counts once)."""
        return distinct_nbytes(self.tensors.values())


def distinct_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of ``nbytes`` over distinct tensor objects (views of one storage region count once each)."""
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def split_peft_name(name: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` (or ``X.lora_A.default.weight``) -> (``X``, ``"lora_A"``)."""
    stripped = name.removeprefix(PEFT_PREFIX)
    for side in ("lora_A", "lora_B"):
        for suffix in (f".{side}.weight", f".{side}.default.weight"):
            if stripped.endswith(suffix):
                return stripped[: -len(suffix)], side
    raise UnknownLoraNameError(f"{name!r} is not a PEFT LoRA tensor name (expected '<module>.lora_A.weight')")


def _peft_name(module: str, side: str) -> str:
    return f"{PEFT_PREFIX}{module}.{side}.weight"


# -------------------------------------------------------------------------------------------------
# Megatron -> PEFT
# -------------------------------------------------------------------------------------------------


def megatron_to_peft(
    tensors: Mapping[str, torch.Tensor],
    family: str | ModelFamily,
    dims: ModelDims,
    *,
    alpha: float,
    tp: int = 1,
    expert_tp: int = 1,
    base_model_name_or_path: str | None = None,
) -> LoraAdapter:
    """Convert global Megatron LoRA tensors to a PEFT-form :class:`LoraAdapter`.

    :param tensors: ``decoder.layers.{L}.<module>.adapter.linear_{in,out}.weight`` -> tensor, with global
        layer and expert indices. Routed experts may come as SequentialMLP names
        (``mlp.experts.local_experts.{e}.linear_fc1``, 2-D per expert) or grouped names
        (``mlp.experts.linear_fc1``: 2-D shared by all experts, 3-D ``(E, ...)`` per expert, or
        shared-outer with one side 2-D and the other 3-D).
    :param family: a family name or HF ``model_type`` (see :mod:`moe_lora_plugins.lora.families`).
    :param dims: attention and expert sizes for the fused splits.
    :param alpha: LoRA alpha of the Megatron LoRA config.
    :param tp: number of tensor-parallel slices each non-expert tensor was gathered from.
    :param expert_tp: number of expert-TP slices each expert tensor was gathered from.
    """
    family = get_family(family)
    pairs: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _MEGATRON_NAME.match(name)
        if match is None:
            raise UnknownLoraNameError(
                f"{name!r} is not a Megatron LoRA adapter name "
                "('<...>layers.<L>.<module>.adapter.linear_in|linear_out.weight')"
            )
        if match["key"] is not None:
            raise UnknownLoraNameError(
                f"{name!r}: CanonicalLoRA adapters ({match['key']}) are not supported; use LoRA (fused adapters)"
            )
        key = (match["layers"], int(match["layer"]), match["module"])
        pairs.setdefault(key, {})[_SIDES[match["side"]]] = tensor

    out: dict[str, torch.Tensor] = {}
    for (_, layer, module), pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterShapeError(
                f"layer {layer} {module}: got {sorted(pair)}, a LoRA adapter needs linear_in and linear_out"
            )
        prefix = f"{family.hf_layer_prefix}.{layer}"
        for hf_module, side, tensor in _convert_module(family, dims, module, pair, tp, expert_tp):
            name = _peft_name(f"{prefix}.{hf_module}", side)
            if name in out:
                raise AdapterShapeError(f"{name} produced twice (two Megatron adapters map to it)")
            out[name] = tensor
    return LoraAdapter(out, alpha, family, dims.num_experts, base_model_name_or_path)


def _convert_module(
    family: ModelFamily,
    dims: ModelDims,
    module: str,
    pair: dict[str, torch.Tensor],
    tp: int,
    expert_tp: int,
) -> Iterable[tuple[str, str, torch.Tensor]]:
    experts = family.experts
    if experts is not None:
        local = _LOCAL_EXPERT.match(module)
        if local is not None and local["experts"] == experts.megatron:
            expert = int(local["expert"])
            rule = experts.fc1_rule(expert) if local["fc"] == "linear_fc1" else experts.fc2_rule(expert)
            yield from _split_pair(rule, dims, pair["lora_A"], pair["lora_B"], expert_tp)
            return
        for fc in ("linear_fc1", "linear_fc2"):
            if module == f"{experts.megatron}.{fc}":
                yield from _convert_grouped_experts(family, dims, fc, pair, expert_tp)
                return
    rule = family.rule_for_megatron(module)
    if rule is None:
        raise UnknownLoraNameError(
            f"Megatron LoRA module {module!r} has no rule in the {family.name!r} table (known: "
            f"{', '.join(family.megatron_modules)}); add it to moe_lora_plugins.lora.families"
        )
    yield from _split_pair(rule, dims, pair["lora_A"], pair["lora_B"], tp)


def _convert_grouped_experts(
    family: ModelFamily, dims: ModelDims, fc: str, pair: dict[str, torch.Tensor], expert_tp: int
) -> Iterable[tuple[str, str, torch.Tensor]]:
    experts = family.experts
    assert experts is not None
    lora_a, lora_b = pair["lora_A"], pair["lora_B"]
    count = dims.num_experts
    for side, tensor in (("linear_in", lora_a), ("linear_out", lora_b)):
        if tensor.ndim == 3 and tensor.shape[0] != count:
            raise AdapterShapeError(
                f"{experts.megatron}.{fc}.adapter.{side}: 3-D tensor has {tensor.shape[0]} experts, the model has "
                f"{count}; gather every EP rank's experts (in EP rank order) before converting"
            )
        if tensor.ndim not in (2, 3):
            raise AdapterShapeError(
                f"{experts.megatron}.{fc}.adapter.{side}: expected 2-D or 3-D, got {tensor.ndim}-D"
            )
    if count <= 0:
        raise AdapterShapeError("grouped expert adapters need ModelDims.num_experts > 0")
    # A 2-D side is shared by every expert: split it once so every expert gets the same tensor objects.
    shared_a = lora_a if lora_a.ndim == 2 else None
    shared_b_parts = None
    if lora_b.ndim == 2:
        rule0 = experts.fc1_rule(0) if fc == "linear_fc1" else experts.fc2_rule(0)
        shared_b_parts = _split_b(rule0, dims, lora_b, expert_tp)
    for expert in range(count):
        rule = experts.fc1_rule(expert) if fc == "linear_fc1" else experts.fc2_rule(expert)
        a = shared_a if shared_a is not None else lora_a[expert]
        b_parts = (
            shared_b_parts if shared_b_parts is not None else _split_b(rule, dims, lora_b[expert], expert_tp)
        )
        for hf_module, b in zip(rule.hf, b_parts, strict=False):
            yield hf_module, "lora_A", a
            yield hf_module, "lora_B", b


def _split_b(
    rule: ModuleRule, dims: ModelDims, lora_b: torch.Tensor, shards: int
) -> tuple[torch.Tensor, ...]:
    if rule.split == "qkv":
        return split_qkv_lora_b(lora_b, dims)
    if rule.split == "gate_up":
        return split_gate_up_lora_b(lora_b, shards)
    return (lora_b,)


def _split_pair(
    rule: ModuleRule, dims: ModelDims, lora_a: torch.Tensor, lora_b: torch.Tensor, shards: int
) -> Iterable[tuple[str, str, torch.Tensor]]:
    if lora_a.ndim != 2 or lora_b.ndim != 2:
        raise AdapterShapeError(
            f"{rule.megatron}: expected 2-D LoRA tensors, got A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)}"
        )
    if lora_a.shape[0] != lora_b.shape[1]:
        raise AdapterShapeError(
            f"{rule.megatron}: LoRA A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} disagree on the rank"
        )
    for hf_module, b in zip(rule.hf, _split_b(rule, dims, lora_b, shards), strict=False):
        yield hf_module, "lora_A", lora_a
        yield hf_module, "lora_B", b


# -------------------------------------------------------------------------------------------------
# PEFT -> Megatron
# -------------------------------------------------------------------------------------------------


def peft_to_megatron(
    tensors: Mapping[str, torch.Tensor],
    family: str | ModelFamily,
    dims: ModelDims,
    *,
    tp: int = 1,
    expert_tp: int = 1,
    experts_layout: str = "sequential",
) -> dict[str, torch.Tensor]:
    """Convert PEFT LoRA tensors to global Megatron adapter tensors (to resume from a PEFT adapter).

    :param experts_layout: ``"sequential"`` (``local_experts.{e}`` 2-D per expert, the local spec),
        ``"grouped"`` (``mlp.experts.linear_fc1`` 3-D ``(E, ...)`` per expert) or ``"grouped_shared"``
        (one 2-D adapter shared by all experts: every expert's tensors must be equal).
    :param tp: / :param expert_tp: produce fc1 LoRA B in the gathered layout of that many slices.

    Fused modules need LoRA A equal across their projections (q/k/v, gate/up): Megatron stores one.
    """
    family = get_family(family)
    modules: dict[tuple[str, int], dict[str, dict[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        match = _PEFT_NAME.match(name)
        if match is None:
            raise UnknownLoraNameError(f"{name!r} is not a PEFT LoRA tensor name of a decoder layer")
        key = (match["layers"], int(match["layer"]))
        modules.setdefault(key, {}).setdefault(match["module"], {})[match["side"]] = tensor

    out: dict[str, torch.Tensor] = {}
    for (layers, layer), by_module in sorted(modules.items()):
        prefix = f"{family.megatron_layer_prefix}.{layer}"
        remaining = dict(by_module)
        for rule in family.modules:
            parts = [remaining.pop(hf, None) for hf in rule.hf]
            if all(p is None for p in parts):
                continue
            a, b = _fuse_pair(rule, dims, rule.hf, parts, tp)
            out[f"{prefix}.{rule.megatron}.adapter.linear_in.weight"] = a
            out[f"{prefix}.{rule.megatron}.adapter.linear_out.weight"] = b
        if family.experts is not None:
            out.update(_fuse_experts(family, dims, prefix, remaining, expert_tp, experts_layout))
        if remaining:
            raise UnknownLoraNameError(
                f"PEFT LoRA modules {sorted(f'{layers}.{layer}.{m}' for m in remaining)} have no rule in the "
                f"{family.name!r} table; add them to moe_lora_plugins.lora.families"
            )
    return out


def _fuse_pair(
    rule: ModuleRule,
    dims: ModelDims,
    names: tuple[str, ...],
    parts: list[dict[str, torch.Tensor] | None],
    shards: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [n for n, p in zip(names, parts, strict=False) if p is None or set(p) != {"lora_A", "lora_B"}]
    if missing:
        raise AdapterShapeError(
            f"{rule.megatron} is fused from {list(names)}; {missing} missing or without both lora_A and lora_B"
        )
    a = parts[0]["lora_A"]  # type: ignore[index]
    for name, p in zip(names[1:], parts[1:], strict=False):
        if not torch.equal(p["lora_A"], a):  # type: ignore[index]
            raise AdapterShapeError(
                f"{name} and {names[0]} have different LoRA A; Megatron's fused {rule.megatron} has one LoRA A"
            )
    bs = [p["lora_B"] for p in parts]  # type: ignore[index]
    if rule.split == "qkv":
        return a, fuse_qkv_lora_b(*bs, dims)
    if rule.split == "gate_up":
        return a, fuse_gate_up_lora_b(bs[0], bs[1], shards)
    return a, bs[0]


def _fuse_experts(
    family: ModelFamily,
    dims: ModelDims,
    prefix: str,
    remaining: dict[str, dict[str, torch.Tensor]],
    expert_tp: int,
    layout: str,
) -> dict[str, torch.Tensor]:
    experts = family.experts
    assert experts is not None
    per_expert: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for module in list(remaining):
        match = _HF_EXPERT.match(module)
        if match is None or match["experts"] != experts.hf:
            continue
        if match["proj"] not in (experts.gate, experts.up, experts.down):
            continue
        per_expert.setdefault(int(match["expert"]), {})[match["proj"]] = remaining.pop(module)
    if not per_expert:
        return {}
    if sorted(per_expert) != list(range(dims.num_experts)):
        absent = sorted(set(range(dims.num_experts)) - set(per_expert))
        raise AdapterShapeError(
            f"{prefix}: experts {absent} have no LoRA tensors (model has {dims.num_experts})"
        )
    fused: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"linear_fc1": [], "linear_fc2": []}
    for expert in range(dims.num_experts):
        projs = per_expert[expert]
        fc1 = experts.fc1_rule(expert)
        fused["linear_fc1"].append(
            _fuse_pair(fc1, dims, fc1.hf, [projs.get(experts.gate), projs.get(experts.up)], expert_tp)
        )
        fc2 = experts.fc2_rule(expert)
        fused["linear_fc2"].append(_fuse_pair(fc2, dims, fc2.hf, [projs.get(experts.down)], expert_tp))
    out = {}
    for fc, pairs in fused.items():
        if layout == "sequential":
            for expert, (a, b) in enumerate(pairs):
                base = f"{prefix}.{experts.megatron}.local_experts.{expert}.{fc}.adapter"
                out[f"{base}.linear_in.weight"], out[f"{base}.linear_out.weight"] = a, b
            continue
        base = f"{prefix}.{experts.megatron}.{fc}.adapter"
        a_all, b_all = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        if layout == "grouped":
            out[f"{base}.linear_in.weight"], out[f"{base}.linear_out.weight"] = a_all, b_all
        elif layout == "grouped_shared":
            if not (bool((a_all == a_all[:1]).all()) and bool((b_all == b_all[:1]).all())):
                raise AdapterShapeError(
                    f"{base}: experts have different adapters; 'grouped_shared' needs them equal"
                )
            out[f"{base}.linear_in.weight"], out[f"{base}.linear_out.weight"] = a_all[0], b_all[0]
        else:
            raise ValueError(f"experts_layout {layout!r}: choose 'sequential', 'grouped' or 'grouped_shared'")
    return out

"""Writers of a :class:`LoraAdapter` in each consumer's format, and the choice of format per engine.

Formats (names are PEFT names, ``base_model.model.<module>.lora_{A,B}.weight``):

- ``peft``: a PEFT directory, ``adapter_model.safetensors`` + ``adapter_config.json``; experts one
  module each (``mlp.experts.{e}.gate_proj``), the layout PEFT, vLLM and SGLang all read from disk.
  With transformers v5 (3-D expert parameters) ``peft`` >= 0.21 fuses the per-expert LoRA into
  ``target_parameters`` LoRA on load. Known upstream limit (peft 0.21.2): for MoE models that also
  have dense or shared-expert ``gate_proj``/``up_proj`` (GLM-4.5, DeepSeek-V3) that conversion moves
  those targets to the experts, so HF+PEFT ignores their LoRA; vLLM and SGLang load them.
- ``vllm_2d``: the same names and 2-D tensors, in memory (Qwen3-MoE, GLM-4.5, DeepSeek-V3 in vLLM).
- ``vllm_3d``: experts fused per layer as PEFT's ``target_parameters`` store them (Qwen3.5,
  Qwen3-VL-MoE, GPT-OSS in vLLM): ``mlp.experts.base_layer.lora_A`` ``(E*r, hidden)`` and
  ``lora_B`` ``(2*I, r*E)`` for gate_up, ``mlp.experts.lora_A`` ``(E*r, I)`` / ``lora_B``
  ``(hidden, r*E)`` for down; gate and up share LoRA A (Megatron's fused fc1 has one).
- ``vllm_shared_outer``: vLLM's ``enable_moe_shared_loras`` layout, ``mlp.experts.w{1,2,3}`` with
  3-D tensors, expert dim 1 for the shared factors (gate/up LoRA A, down LoRA B).
- ``sglang``: PEFT names and 2-D tensors plus the config dict for
  ``Engine.load_lora_adapter_from_tensors(name, tensors, config_dict)``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from moe_lora_plugins.errors import MoeLoraError
from moe_lora_plugins.lora.convert import PEFT_PREFIX, AdapterShapeError, LoraAdapter, split_peft_name
from moe_lora_plugins.lora.families import get_family

Format = Literal["peft", "vllm_2d", "vllm_3d", "vllm_shared_outer", "sglang"]
FORMATS: tuple[str, ...] = ("peft", "vllm_2d", "vllm_3d", "vllm_shared_outer", "sglang")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# vLLM model types whose MoE layers keep experts as 3-D fused weights (``is_3d_moe_weight``).
VLLM_3D_MOE_MODEL_TYPES = frozenset({"qwen3_5_moe", "qwen3_vl_moe", "gpt_oss", "qwen3_omni_moe"})
_EXPERT_MODULE = re.compile(r"^(?P<layer>.+)\.(?P<experts>experts)\.(?P<expert>\d+)\.(?P<proj>\w+)$")


class FormatError(MoeLoraError, ValueError):
    """An adapter that cannot be expressed in the requested format, or an unknown format."""


def choose_format(
    engine: str, model_type: str | None = None, *, shared_outer: bool = False, explicit: str | None = None
) -> Format:
    """Pick the format a consumer loads: ``explicit`` wins; else by engine and model type.

    vLLM: ``vllm_shared_outer`` when the engine runs with ``enable_moe_shared_loras``, ``vllm_3d`` for
    models vLLM keeps as 3-D experts, else ``vllm_2d``. SGLang: ``sglang``. Files: ``peft``.
    """
    if explicit is not None:
        if explicit not in FORMATS:
            raise FormatError(f"unknown adapter format {explicit!r}; choose one of {FORMATS}")
        return explicit  # type: ignore[return-value]
    if engine == "vllm":
        if shared_outer:
            return "vllm_shared_outer"
        return "vllm_3d" if model_type in VLLM_3D_MOE_MODEL_TYPES else "vllm_2d"
    if engine == "sglang":
        return "sglang"
    if engine in ("peft", "hf", "disk"):
        return "peft"
    raise FormatError(f"unknown engine {engine!r}; choose 'vllm', 'sglang' or 'peft' (or pass explicit=...)")


def render(adapter: LoraAdapter, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors and config dict in format ``fmt`` (see the module docstring)."""
    if fmt == "sglang":
        return sglang_payload(adapter)
    if fmt in ("peft", "vllm_2d"):
        return dict(adapter.tensors), adapter.peft_config()
    if fmt == "vllm_3d":
        return to_vllm_3d(adapter), adapter.peft_config()
    if fmt == "vllm_shared_outer":
        return to_vllm_shared_outer(adapter), adapter.peft_config()
    raise FormatError(f"unknown adapter format {fmt!r}; choose one of {FORMATS}")


# -------------------------------------------------------------------------------------------------
# PEFT directory
# -------------------------------------------------------------------------------------------------


def write_adapter_dir(
    out_dir: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``out_dir`` (created if needed).

    Each file is written under a temporary name in ``out_dir`` and renamed into place, weights first,
    so a reader never sees a half-written file. Tensors shared under several names are written once
    per name (safetensors stores no aliases). This is the one writer of adapter directories.
    """
    import tempfile

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".adapter-", suffix=".tmp", delete=False) as tmp:
        tmp_weights = Path(tmp.name)
    tmp_config = tmp_weights.with_suffix(".json.tmp")
    try:
        save_file({name: t.detach().to("cpu").clone().contiguous() for name, t in tensors.items()}, str(tmp_weights),
                  metadata={"format": "pt"})
        tmp_config.write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        os.replace(tmp_weights, out / ADAPTER_WEIGHTS)
        os.replace(tmp_config, out / ADAPTER_CONFIG)
    finally:
        for leftover in (tmp_weights, tmp_config):
            leftover.unlink(missing_ok=True)
    return out


def write_peft_dir(adapter: LoraAdapter, out_dir: str | os.PathLike) -> Path:
    """Write ``adapter`` as a PEFT directory (its tensors and :meth:`LoraAdapter.peft_config`), atomically."""
    return write_adapter_dir(out_dir, adapter.tensors, adapter.peft_config())


def read_peft_dir(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a PEFT directory: (PEFT-name -> tensor, adapter config dict); errors name the missing file."""
    from safetensors.torch import load_file

    root = Path(path)
    for needed in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (root / needed).is_file():
            raise FileNotFoundError(f"{root / needed} does not exist: {str(path)!r} is not a PEFT adapter directory")
    config = json.loads((root / ADAPTER_CONFIG).read_text())
    if not isinstance(config, dict):
        raise FormatError(f"{root / ADAPTER_CONFIG} holds a JSON {type(config).__name__}, not an object")
    return load_file(str(root / ADAPTER_WEIGHTS)), config


def _refuse_unsupported_variants(config: Mapping[str, Any]) -> None:
    """LoRA variants whose tensors mean something else than ``W + (alpha/r) B A``: refuse, never drop."""
    if config.get("use_dora"):
        raise FormatError(
            "the adapter uses DoRA (use_dora=true: a learned magnitude vector besides A and B); only plain LoRA "
            "converts: retrain with use_dora=false or merge the DoRA adapter into the base weights"
        )
    if config.get("fan_in_fan_out"):
        raise FormatError(
            "the adapter has fan_in_fan_out=true (GPT-2 style Conv1D weights, A and B stored transposed); convert "
            "only adapters of nn.Linear models (fan_in_fan_out=false)"
        )
    if config.get("use_rslora"):
        raise FormatError(
            "the adapter uses rsLoRA (scaling alpha/sqrt(r)); the target formats scale by alpha/r: retrain with "
            "use_rslora=false"
        )


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    """The value of the first ``rank_pattern`` / ``alpha_pattern`` key that matches ``module`` (PEFT's rule:
    the key is a regex that must match a whole dotted suffix of the module path)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _unfuse_target_parameters(
    tensors: dict[str, torch.Tensor], family: Any, hf_config: Mapping[str, Any] | None, num_experts: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT's ``target_parameters`` experts (transformers v5 saves ``mlp.experts[.base_layer].lora_{A,B}``, one
    fused module for gate_up and one for down) as per-expert 2-D tensors; also which fused parameter
    (``<prefix>.gate_up_proj`` / ``<prefix>.down_proj``) each per-expert module came from, for its alpha.

    Which fused module is gate_up and which is down is read from the shapes and the model config (gate_up:
    A takes ``hidden_size``, B gives ``2 * moe_intermediate_size``), not from PEFT's nesting order.
    """
    rules = family.experts
    fused: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module, side = split_peft_name(name)
        if rules is not None and module.endswith((f".{rules.hf}", f".{rules.hf}.base_layer")):
            fused.setdefault(module, {})[side] = tensor
        else:
            rest[name] = tensor
    if not fused:
        return dict(tensors), {}
    if hf_config is None or not num_experts:
        raise FormatError(
            f"the adapter stores experts fused ({sorted(fused)[0]}); pass the base model's config.json "
            "(--hf-config) with its expert count to convert it"
        )
    from moe_lora_plugins.lora.hf_shapes import HfConfigError

    try:
        hidden, inter = int(hf_config["hidden_size"]), int(hf_config["moe_intermediate_size"])
    except (KeyError, TypeError, ValueError):
        raise HfConfigError("the model config needs hidden_size and moe_intermediate_size for fused experts") from None
    canonical: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for module, pair in sorted(fused.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterShapeError(f"{module}: has {sorted(pair)}, needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        prefix = module.removesuffix(".base_layer")
        if (a.shape[1], b.shape[0]) == (hidden, 2 * inter):
            kind, target = "gate_up", f"{prefix}.base_layer"
        elif (a.shape[1], b.shape[0]) == (inter, hidden):
            kind, target = "down", prefix
        else:
            raise AdapterShapeError(
                f"{module}: LoRA A {list(a.shape)} / B {list(b.shape)} fit neither the fused gate_up (in {hidden}, out "
                f"{2 * inter}) nor the down projection (in {inter}, out {hidden}) of this config: is --hf-config the "
                "adapter's base model?"
            )
        if a.shape[0] % num_experts or b.shape[1] != a.shape[0]:
            raise AdapterShapeError(
                f"{module}: LoRA A has {a.shape[0]} rows and B {b.shape[1]} columns; both must be rank x "
                f"{num_experts} experts"
            )
        canonical[_name(target, "lora_A")], canonical[_name(target, "lora_B")] = a, b
        param = f"{prefix}.{'gate_up_proj' if kind == 'gate_up' else 'down_proj'}"
        projections = (rules.gate, rules.up) if kind == "gate_up" else (rules.down,)
        for expert in range(num_experts):
            for proj in projections:
                origin[f"{prefix}.{expert}.{proj}"] = param
    rest.update(from_vllm_3d(canonical, num_experts, family.name))
    return rest, origin


def adapter_from_peft(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    family: str,
    num_experts: int = 0,
    hf_config: Mapping[str, Any] | None = None,
) -> LoraAdapter:
    """Read what PEFT saves as a :class:`LoraAdapter` in per-module form with one alpha.

    Experts saved fused through ``target_parameters`` (transformers v5) are split per expert (needs
    ``hf_config``). A module's own alpha from ``alpha_pattern`` is folded into its LoRA B
    (``B * alpha_module / lora_alpha``), so ``lora_alpha / r_module`` gives the same delta in every target
    format; ranks come from the tensors. DoRA, rsLoRA and ``fan_in_fan_out`` adapters are refused.
    """
    _refuse_unsupported_variants(config)
    table = get_family(family)
    names = {name if name.startswith(PEFT_PREFIX) else PEFT_PREFIX + name: t for name, t in tensors.items()}
    per_module, origin = _unfuse_target_parameters(names, table, hf_config, num_experts)
    try:
        alpha = float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"adapter_config.json has lora_alpha={config.get('lora_alpha')!r}; it needs a number") from None
    alpha_pattern = config.get("alpha_pattern") or {}
    if alpha_pattern:
        scaled = {}
        for name, tensor in per_module.items():
            module, side = split_peft_name(name)
            own = _pattern_value(alpha_pattern, origin.get(module, module))
            scaled[name] = tensor * (float(own) / alpha) if side == "lora_B" and own is not None else tensor
        per_module = scaled
    return LoraAdapter(per_module, alpha, table, num_experts, config.get("base_model_name_or_path"))


# -------------------------------------------------------------------------------------------------
# vLLM 3-D fused and shared-outer
# -------------------------------------------------------------------------------------------------


def _expert_modules(adapter: LoraAdapter) -> tuple[dict[str, dict[int, dict[str, tuple]]], dict[str, tuple]]:
    """Split the adapter's modules into {experts prefix: {expert: {proj: (A, B)}}} and the rest."""
    family = adapter.family
    assert family.experts is not None
    experts: dict[str, dict[int, dict[str, tuple]]] = {}
    rest: dict[str, tuple] = {}
    for module, pair in adapter.modules().items():
        match = _EXPERT_MODULE.match(module)
        if (
            match is not None
            and module.endswith(
                tuple(f".{p}" for p in (family.experts.gate, family.experts.up, family.experts.down))
            )
            and f".{family.experts.hf}." in f".{module}"
        ):
            prefix = f"{match['layer']}.{match['experts']}"
            experts.setdefault(prefix, {}).setdefault(int(match["expert"]), {})[match["proj"]] = pair
        else:
            rest[module] = pair
    for prefix, by_expert in experts.items():
        if sorted(by_expert) != list(range(adapter.num_experts)):
            raise FormatError(
                f"{prefix}: LoRA for experts {sorted(by_expert)[:8]}... ({len(by_expert)}), the model has "
                f"{adapter.num_experts}; fused formats need every expert"
            )
    return experts, rest


def _name(module: str, side: str) -> str:
    return f"{PEFT_PREFIX}{module}.{side}.weight"


def to_vllm_3d(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Experts fused per layer in PEFT's ``target_parameters`` layout (what vLLM's 3-D MoE models load).

    Per layer: ``experts.base_layer.lora_A`` ``(E*r, hidden)`` (expert-major), ``experts.base_layer.lora_B``
    ``(2*I, r*E)`` (rank-major, expert-minor columns), and ``experts.lora_{A,B}`` for down. Gate and up
    must share LoRA A. Non-expert modules keep their 2-D names.
    """
    rules, experts, out = _split_routed_experts(adapter)
    for prefix, by_expert in experts.items():
        gate_a, gate_b, up_b, down_a, down_b = [], [], [], [], []
        for expert in range(adapter.num_experts):
            projs = by_expert[expert]
            missing = {rules.gate, rules.up, rules.down} - set(projs)
            if missing:
                raise FormatError(
                    f"{prefix}.{expert}: no LoRA for {sorted(missing)}; the 3-D format needs all three"
                )
            (ga, gb), (ua, ub), (da, db) = projs[rules.gate], projs[rules.up], projs[rules.down]
            if not torch.equal(ga, ua):
                raise FormatError(
                    f"{prefix}.{expert}: gate and up LoRA A differ; the 3-D format stores one LoRA A for gate_up"
                )
            gate_a.append(ga), gate_b.append(gb), up_b.append(ub), down_a.append(da), down_b.append(db)
        if rules.gate_up_interleaved:
            fused_b = [
                torch.stack((g, u), dim=1).reshape(2 * g.shape[0], g.shape[1])
                for g, u in zip(gate_b, up_b, strict=False)
            ]
        else:
            fused_b = [torch.cat((g, u), dim=0) for g, u in zip(gate_b, up_b, strict=False)]
        out[_name(f"{prefix}.base_layer", "lora_A")] = _stack_a(gate_a)
        out[_name(f"{prefix}.base_layer", "lora_B")] = _stack_b(fused_b)
        out[_name(prefix, "lora_A")] = _stack_a(down_a)
        out[_name(prefix, "lora_B")] = _stack_b(down_b)
    return out


def _split_routed_experts(adapter: LoraAdapter) -> tuple[Any, dict, dict[str, torch.Tensor]]:
    """The family's expert rules, the routed experts' LoRA by layer prefix, and every other module's
    tensors under their 2-D names (the part the fused expert formats leave as it is)."""
    family = adapter.family
    if family.experts is None:
        raise FormatError(f"family {family.name!r} has no routed experts; use 'vllm_2d' or 'peft'")
    experts, rest = _expert_modules(adapter)
    out = {_name(m, side): t for m, (a, b) in rest.items() for side, t in (("lora_A", a), ("lora_B", b))}
    return family.experts, experts, out


def _stack_a(per_expert: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(per_expert).reshape(-1, per_expert[0].shape[-1])  # (E*r, in), expert-major


def _stack_b(per_expert: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(per_expert)  # (E, out, r)
    return stacked.permute(1, 2, 0).reshape(stacked.shape[1], -1).contiguous()  # (out, r*E), rank-major


def to_vllm_shared_outer(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """vLLM's shared-outer MoE layout (``enable_moe_shared_loras``): ``experts.w1/w2/w3`` 3-D tensors.

    ``w1``/``w3`` (gate/up) LoRA A and ``w2`` (down) LoRA B must be equal across experts; they are
    stored once with expert dim 1. The other factors are stacked ``(E, ...)``.
    """
    rules, experts, out = _split_routed_experts(adapter)
    for prefix, by_expert in experts.items():
        for slot, proj, shared_side in (("w1", rules.gate, 0), ("w3", rules.up, 0), ("w2", rules.down, 1)):
            pairs = [by_expert[e].get(proj) for e in range(adapter.num_experts)]
            if any(p is None for p in pairs):
                raise FormatError(f"{prefix}: some experts have no LoRA for {proj}; shared-outer needs all")
            shared = [p[shared_side] for p in pairs]  # type: ignore[index]
            if not all(torch.equal(shared[0], t) for t in shared[1:]):
                side = "LoRA A" if shared_side == 0 else "LoRA B"
                raise FormatError(
                    f"{prefix}.*.{proj}: {side} differs between experts; the shared-outer format stores one {side}"
                )
            per_expert = torch.stack([p[1 - shared_side] for p in pairs])  # type: ignore[index]
            shared_t = shared[0].unsqueeze(0)
            a, b = (shared_t, per_expert) if shared_side == 0 else (per_expert, shared_t)
            out[_name(f"{prefix}.{slot}", "lora_A")] = a
            out[_name(f"{prefix}.{slot}", "lora_B")] = b
    return out


def from_vllm_3d(
    tensors: Mapping[str, torch.Tensor], num_experts: int, family: str
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_vllm_3d`: back to per-expert 2-D PEFT tensors (gate and up share one A)."""
    rules = get_family(family).experts
    if rules is None:
        raise FormatError(f"family {family!r} has no routed experts")
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, side = split_peft_name(name)
        if module.endswith((f".{rules.hf}", f".{rules.hf}.base_layer")):
            fused.setdefault(module, {})[side] = tensor
        else:
            out[name] = tensor
    for module, pair in fused.items():
        is_gate_up = module.endswith(".base_layer")
        prefix = module.removesuffix(".base_layer")
        a = pair["lora_A"].reshape(num_experts, -1, pair["lora_A"].shape[-1])
        b = pair["lora_B"].reshape(pair["lora_B"].shape[0], -1, num_experts).permute(2, 0, 1)
        for expert in range(num_experts):
            if is_gate_up:
                rows = b.shape[1] // 2
                if rules.gate_up_interleaved:
                    gate, up = b[expert, 0::2], b[expert, 1::2]
                else:
                    gate, up = b[expert, :rows], b[expert, rows:]
                for proj, part in ((rules.gate, gate), (rules.up, up)):
                    out[_name(f"{prefix}.{expert}.{proj}", "lora_A")] = a[expert]
                    out[_name(f"{prefix}.{expert}.{proj}", "lora_B")] = part
            else:
                out[_name(f"{prefix}.{expert}.{rules.down}", "lora_A")] = a[expert]
                out[_name(f"{prefix}.{expert}.{rules.down}", "lora_B")] = b[expert]
    return out


def sglang_payload(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, config_dict)`` for SGLang's ``load_lora_adapter_from_tensors`` (PEFT names, 2-D)."""
    if not adapter.tensors:
        raise AdapterShapeError("empty adapter")
    return dict(adapter.tensors), adapter.peft_config()

"""What a complete adapter must contain, and the check of a received one against it.

The expectation is derived from the served model's Hugging Face config and the adapter's PEFT
config (rank, rank_pattern, target_modules): every layer, every projection it targets, every
routed expert of every MoE layer, with the shape and dtype the engine will load. Nothing here
knows about vLLM; the worker extension adds the engine's own limits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moe_lora_plugins.sync.errors import AdapterValidationError

PEFT_LAYER_PREFIX = "base_model.model.model.layers"


@dataclass(frozen=True)
class ExpectedTensor:
    shape: tuple[int, int]
    dtype: Any


def _rank_of(peft_config: Mapping[str, Any], module: str) -> int:
    for pattern, rank in (peft_config.get("rank_pattern") or {}).items():
        if re.search(pattern, module) or module.endswith(pattern):
            return int(rank)
    return int(peft_config["r"])


def projection_shapes(hf_config: Mapping[str, Any], layer: int) -> dict[str, tuple[int, int]]:
    """(out, in) of every LoRA-able projection of one decoder layer, for every family the converter supports
    (see :mod:`moe_lora_plugins.lora.hf_shapes`); a config that lacks a needed field is a validation error."""
    from moe_lora_plugins.lora.hf_shapes import HfConfigError, layer_module_shapes

    try:
        return layer_module_shapes(hf_config, layer)
    except HfConfigError as exc:
        raise AdapterValidationError([f"{exc} (the served model's config cannot describe layer {layer})"]) from None


def expected_adapter(hf_config: Mapping[str, Any], peft_config: Mapping[str, Any], dtype: Any) -> dict[str, ExpectedTensor]:
    """Every ``lora_A`` / ``lora_B`` tensor a complete adapter has, PEFT-named, with shape and dtype."""
    targets = peft_config.get("target_modules") or ()
    if isinstance(targets, str):
        raise AdapterValidationError(
            [f"target_modules is the regex {targets!r}; sync validation needs an explicit list of module names"]
        )
    targets = set(targets)
    if "num_hidden_layers" not in hf_config:
        raise AdapterValidationError(["the served model's config has no 'num_hidden_layers'"])
    expected: dict[str, ExpectedTensor] = {}
    for layer in range(int(hf_config["num_hidden_layers"])):
        for module, (out_dim, in_dim) in projection_shapes(hf_config, layer).items():
            leaf = module.rsplit(".", 1)[-1]
            if leaf not in targets and not (".experts." in module and "experts" in targets) and module not in targets:
                continue
            name = f"{PEFT_LAYER_PREFIX}.{layer}.{module}"
            rank = _rank_of(peft_config, name)
            expected[f"{name}.lora_A.weight"] = ExpectedTensor((rank, in_dim), dtype)
            expected[f"{name}.lora_B.weight"] = ExpectedTensor((out_dim, rank), dtype)
    return expected


def non_finite_problems(tensors: Mapping[str, Any]) -> list[str]:
    """One line per tensor holding NaN or +-inf: its name, how many such values, and the first one's index.

    A tensor filed under several names (a shared expert adapter) is scanned once. Integer tensors
    are finite by construction.
    """
    import torch

    distinct = {id(t): t for t in tensors.values()}  # a shared expert adapter: one scan for its E names
    finite = _finite_by_storage(distinct)
    verdicts: dict[int, str] = {}
    for key, tensor in distinct.items():
        if key not in finite and (tensor.is_floating_point() or tensor.is_complex()):
            bad = ~torch.isfinite(tensor)
            count = int(bad.sum())
            if count:
                first = [int(i) for i in bad.nonzero()[0]]
                value = tensor[tuple(first)].item()
                verdicts[key] = f"{count} non-finite value(s) (first: {value} at {first})"
    if not verdicts:  # the usual case: no per-name pass (and no sort of tens of thousands of names)
        return []
    return [f"{name} has {verdicts[id(tensors[name])]}; a NaN or inf adapter would poison the engine"
            for name in sorted(tensors) if id(tensors[name]) in verdicts]


def _finite_by_storage(distinct: Mapping[int, Any]) -> set[int]:
    """Keys of the tensors shown finite by one check per storage and dtype.

    A received adapter's tensors are views of a few bucket payloads. Contiguous floating tensors of
    one dtype over one storage are checked together: the span of the storage from the first of them
    to the end of the last, viewed as that dtype, is scanned once, and if it is all finite so is each
    of them. A span that is not (a NaN, or bytes of another dtype between them) certifies nothing:
    those tensors are then checked one by one, so every problem is still named.
    """
    import torch

    groups: dict[tuple[Any, ...], list[int]] = {}
    for key, tensor in distinct.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and tensor.is_contiguous() and tensor.numel():
            groups.setdefault((tensor.untyped_storage().data_ptr(), tensor.dtype, tensor.device), []).append(key)
    finite: set[int] = set()
    for keys in groups.values():
        if len(keys) < 2:
            continue
        members = [distinct[k] for k in keys]
        start = min(t.storage_offset() for t in members)
        end = max(t.storage_offset() + t.numel() for t in members)
        span = members[0].as_strided((end - start,), (1,), start)
        if bool(torch.isfinite(span).all()):
            finite.update(keys)
    return finite


def check_adapter(tensors: Mapping[str, Any], expected: Mapping[str, ExpectedTensor], context: str = "") -> None:
    """Raise :class:`AdapterValidationError` naming every missing, unexpected, ill-shaped / -typed tensor and
    every tensor holding NaN or inf (checked before anything is swapped in)."""
    problems: list[str] = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems += [f"missing {name} (expected shape {list(expected[name].shape)})" for name in missing]
    problems += [f"unexpected {name}: the served model / adapter config has no such LoRA tensor" for name in unexpected]
    for name in sorted(set(expected) & set(tensors)):
        want, got = expected[name], tensors[name]
        if tuple(got.shape) != want.shape:
            problems.append(f"{name} has shape {list(got.shape)}, expected {list(want.shape)}")
        if want.dtype is not None and got.dtype != want.dtype:
            problems.append(f"{name} has dtype {got.dtype}, expected {want.dtype} (the engine's LoRA dtype)")
    problems += non_finite_problems(tensors)
    if problems:
        raise AdapterValidationError(problems, context)

"""``moe-lora-plugins convert``: convert a saved LoRA adapter between PEFT, engine and Megatron formats.

    moe-lora-plugins convert ADAPTER_DIR OUT_DIR --to vllm_3d --hf-config BASE/config.json
    moe-lora-plugins convert megatron_lora.safetensors OUT_DIR --from megatron --alpha 32 --hf-config ...
    moe-lora-plugins convert ADAPTER_DIR OUT_DIR --to megatron --hf-config ...   # import to resume

Every output is a directory with ``adapter_model.safetensors`` and ``adapter_config.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

OUTPUTS = ("peft", "vllm_2d", "vllm_3d", "vllm_shared_outer", "sglang", "megatron")


def add_convert_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a saved LoRA adapter between formats (PEFT, vLLM, SGLang, Megatron)"
    )
    p.add_argument(
        "source", help="a PEFT directory, or (with --from megatron) a safetensors file of Megatron names"
    )
    p.add_argument("out_dir", help="directory to write adapter_model.safetensors + adapter_config.json into")
    p.add_argument("--to", choices=OUTPUTS, default="peft", help="output format (default: peft)")
    p.add_argument("--from", dest="source_format", choices=("peft", "megatron"), default="peft")
    p.add_argument("--hf-config", required=True, help="the base model's config.json (dims and model_type)")
    p.add_argument("--family", default=None, help="naming table (default: the config's model_type)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (required with --from megatron)")
    p.add_argument("--tp", type=int, default=1, help="TP slices each Megatron tensor was gathered from")
    p.add_argument("--expert-tp", type=int, default=1, help="expert-TP slices of each Megatron expert tensor")
    p.add_argument(
        "--experts-layout",
        choices=("sequential", "grouped", "grouped_shared"),
        default="sequential",
        help="Megatron expert naming for --to megatron",
    )
    p.set_defaults(func=run_convert)


class ConvertInputError(Exception):
    """Bad input to ``convert``: reported as one line, exit status 2, nothing written."""


def _read_hf_config(path: str) -> dict[str, Any]:
    source = Path(path)
    if not source.is_file():
        raise ConvertInputError(f"--hf-config {path!r} is not a file: pass the base model's config.json")
    try:
        config = json.loads(source.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertInputError(f"--hf-config {path!r} is not valid JSON ({exc}): pass the base model's config.json") from None
    if not isinstance(config, dict):
        raise ConvertInputError(
            f"--hf-config {path!r} holds a JSON {type(config).__name__}, not an object: pass the base model's config.json"
        )
    for key in ("num_attention_heads", "hidden_size", "num_hidden_layers"):
        if not isinstance(config.get(key), int) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise ConvertInputError(
                f"--hf-config {path!r} has {key}={config.get(key)!r}, a positive integer is needed: pass the base "
                "model's own config.json"
            )
    return config


def _check_arguments(args: argparse.Namespace, hf_config: dict[str, Any]) -> None:
    if args.source_format == "peft":
        source = Path(args.source)
        if not source.is_dir():
            raise ConvertInputError(f"{args.source!r} is not a directory: pass a PEFT adapter directory")
        for needed in ("adapter_config.json", "adapter_model.safetensors"):
            if not (source / needed).is_file():
                raise ConvertInputError(
                    f"{args.source!r} has no {needed}: pass a PEFT adapter directory (save_pretrained output)"
                )
    elif not Path(args.source).is_file():
        raise ConvertInputError(f"{args.source!r} is not a file: pass the safetensors file of Megatron LoRA tensors")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ConvertInputError(f"OUT_DIR {args.out_dir!r} exists and is not a directory: name a directory")
    for flag, value in (("--tp", args.tp), ("--expert-tp", args.expert_tp)):
        if value < 1:
            raise ConvertInputError(f"{flag} {value} must be 1 or more (1: the tensors are not split)")
    heads = hf_config["num_attention_heads"]
    groups = hf_config.get("num_key_value_heads") or heads
    if heads % args.tp or groups % args.tp:
        raise ConvertInputError(
            f"--tp {args.tp} does not divide num_attention_heads={heads} and num_key_value_heads={groups}: pass the "
            "tensor-parallel size the tensors were gathered from"
        )
    moe_inter = hf_config.get("moe_intermediate_size")
    if isinstance(moe_inter, int) and moe_inter % args.expert_tp:
        raise ConvertInputError(
            f"--expert-tp {args.expert_tp} does not divide moe_intermediate_size={moe_inter}: pass the expert "
            "tensor-parallel size the expert tensors were gathered from"
        )
    if args.alpha is not None and not args.alpha > 0:
        raise ConvertInputError(f"--alpha {args.alpha} must be a positive number (the LoRA alpha the adapter was trained with)")
    if args.source_format == "megatron" and args.alpha is None:
        raise ConvertInputError("--from megatron needs --alpha (Megatron tensors do not carry it)")


def check_shapes_against_config(adapter: Any, hf_config: dict[str, Any]) -> None:
    """Every module's (out, in) must be the base model's: an adapter of another model is refused by name."""
    from moe_lora_plugins.lora.hf_shapes import layer_module_shapes

    by_layer: dict[int, dict[str, tuple[int, int]]] = {}
    for module, (a, b) in sorted(adapter.modules().items()):
        match = re.match(r"^model\.layers\.(\d+)\.(.+)$", module)
        if match is None:
            continue
        layer, path = int(match[1]), match[2]
        if layer >= hf_config["num_hidden_layers"]:
            raise ConvertInputError(
                f"{module}: layer {layer} does not exist, the config has num_hidden_layers="
                f"{hf_config['num_hidden_layers']}: is --hf-config the adapter's base model?"
            )
        if layer not in by_layer:
            by_layer[layer] = layer_module_shapes(hf_config, layer)
        want = by_layer[layer].get(path)
        got = (int(b.shape[0]), int(a.shape[1]))
        if want is None:
            raise ConvertInputError(
                f"{module}: the config's layer {layer} has no such projection: is --hf-config the adapter's base model?"
            )
        if got != want:
            raise ConvertInputError(
                f"{module}: LoRA gives (out, in) = {got}, the config's projection is {want}: is --hf-config the "
                "adapter's base model?"
            )


def run_convert(args: argparse.Namespace) -> int:
    """``convert``: exit 0 once written; 2 with one line on stderr (nothing written) for bad input."""
    from moe_lora_plugins.errors import MoeLoraError

    try:
        return _convert(args)
    except (ConvertInputError, MoeLoraError) as exc:
        print(f"moe-lora-plugins convert: {exc}", file=sys.stderr)
        return 2


def _convert(args: argparse.Namespace) -> int:
    hf_config = _read_hf_config(args.hf_config)
    _check_arguments(args, hf_config)
    try:
        import torch  # noqa: F401
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ConvertInputError(
            f"convert needs torch and safetensors ({exc}): pip install 'moe-lora-plugins[torch]'"
        ) from None

    from moe_lora_plugins.lora.convert import megatron_to_peft, peft_to_megatron
    from moe_lora_plugins.lora.families import ModelDims, get_family
    from moe_lora_plugins.lora.formats import adapter_from_peft, read_peft_dir, render, write_adapter_dir
    from moe_lora_plugins.lora.wire import encode

    family = args.family or hf_config.get("model_type")
    if not family:
        raise ConvertInputError(
            f"--hf-config {args.hf_config!r} has no model_type: pass --family (one of the tables in "
            "moe_lora_plugins.lora.families) or the base model's own config.json"
        )
    get_family(family)
    dims = ModelDims.from_hf_config(hf_config)
    if args.source_format == "megatron":
        adapter = megatron_to_peft(
            load_file(args.source), family, dims, alpha=args.alpha, tp=args.tp, expert_tp=args.expert_tp
        )
    else:
        tensors, config = read_peft_dir(args.source)
        adapter = adapter_from_peft(tensors, config, family, dims.num_experts, hf_config)
        if args.alpha is not None and args.alpha != adapter.alpha:
            raise ConvertInputError(
                f"--alpha {args.alpha} differs from the adapter's lora_alpha={adapter.alpha}; leave --alpha out for a "
                "PEFT source (its config carries alpha)"
            )
    check_shapes_against_config(adapter, hf_config)
    if args.to == "peft":
        written, config = dict(adapter.tensors), adapter.peft_config()
    elif args.to == "megatron":
        written = peft_to_megatron(
            adapter.tensors, family, dims, tp=args.tp, expert_tp=args.expert_tp, experts_layout=args.experts_layout
        )
        config = adapter.peft_config()
    else:
        written, config = render(adapter, args.to)
    out = write_adapter_dir(args.out_dir, written, config)
    payload = encode(adapter.tensors, dedupe="content")
    print(
        f"wrote {len(written)} tensors ({args.to}) to {out}; adapter: {payload.wire_bytes} distinct bytes, "
        f"{payload.expanded_bytes} as per-module PEFT tensors"
    )
    return 0

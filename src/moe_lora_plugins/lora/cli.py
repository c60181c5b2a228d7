"""``moe-lora-plugins convert``: convert a saved LoRA adapter between PEFT, engine and Megatron formats.

    moe-lora-plugins convert ADAPTER_DIR OUT_DIR --to vllm_3d --hf-config BASE/config.json
    moe-lora-plugins convert megatron_lora.safetensors OUT_DIR --from megatron --alpha 32 --hf-config ...
    moe-lora-plugins convert ADAPTER_DIR OUT_DIR --to megatron --hf-config ...   # import to resume

Every output is a directory with ``adapter_model.safetensors`` and ``adapter_config.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def run_convert(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file, save_file

    from moe_lora_plugins.lora.convert import megatron_to_peft, peft_to_megatron
    from moe_lora_plugins.lora.families import ModelDims
    from moe_lora_plugins.lora.formats import adapter_from_peft, read_peft_dir, render, write_peft_dir
    from moe_lora_plugins.lora.wire import encode

    hf_config = json.loads(Path(args.hf_config).read_text())
    family = args.family or hf_config.get("model_type")
    dims = ModelDims.from_hf_config(hf_config)
    if args.source_format == "megatron":
        if args.alpha is None:
            raise SystemExit("convert --from megatron needs --alpha (Megatron tensors do not carry it)")
        adapter = megatron_to_peft(
            load_file(args.source), family, dims, alpha=args.alpha, tp=args.tp, expert_tp=args.expert_tp
        )
    else:
        tensors, config = read_peft_dir(args.source)
        adapter = adapter_from_peft(tensors, config, family, dims.num_experts)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.to == "peft":
        write_peft_dir(adapter, out)
        written = adapter.tensors
    elif args.to == "megatron":
        written = peft_to_megatron(
            adapter.tensors,
            family,
            dims,
            tp=args.tp,
            expert_tp=args.expert_tp,
            experts_layout=args.experts_layout,
        )
        save_file({k: v.contiguous() for k, v in written.items()}, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(
            json.dumps(adapter.peft_config(), indent=2, sort_keys=True) + "\n"
        )
    else:
        written, config = render(adapter, args.to)
        save_file(
            {k: v.clone().contiguous() for k, v in written.items()}, str(out / "adapter_model.safetensors")
        )
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    payload = encode(adapter.tensors, dedupe="content")
    print(
        f"wrote {len(written)} tensors ({args.to}) to {out}; adapter: {payload.wire_bytes} distinct bytes, "
        f"{payload.expanded_bytes} as per-module PEFT tensors"
    )
    return 0

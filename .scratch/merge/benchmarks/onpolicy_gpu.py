"""Benchmark: true-on-policy mode on one GPU, bf16, a Qwen3-MoE-shaped model (issue 11's GPU "done means").

One process (NCCL world size 1 through ``run_distributed``) builds a Qwen3-MoE-shaped model in
Megatron-Core through Megatron-Bridge (local spec, ``SequentialMLP`` experts, random weights made
here from each parameter's global name; LoRA r=16 on qkv / proj / fc1 / fc2 of attention and every
expert, one adapter per expert, B random) and measures:

(a) Megatron, mode on: rows scored alone vs inside the batch -> bitwise equal?
(b) Megatron, mode on, vs an independent implementation: HF transformers' ``Qwen3MoeForCausalLM``
    loaded from Megatron-Bridge's plain export plus this suite's PEFT adapter, scored through
    :mod:`moe_lora_plugins.testing.hf_onpolicy` (the same onpolicy ops on HF's own modules) -> bitwise?
    On any difference, the first differing point (embedding, attention / MLP / layer output of each
    layer, final norm, logits) is reported.
(c) the same comparisons with the mode off (Megatron's default kernels; HF stock with the adapter
    merged into its weights): the "before" max diffs;
(d) one forward + backward step (policy-gradient loss on the batch's log-probs, gradients into the
    LoRA parameters) with the mode on vs off: median wall time of ``--iters`` steps after a warm-up.

    python benchmarks/onpolicy_gpu.py --out onpolicy.json [--seq 512 --batch 8 --layers 4 --iters 3]
    python benchmarks/onpolicy_gpu.py --device cpu --tiny --out /tmp/x.json   # a dry run on the CPU

Writes the JSON result to ``--out`` (and a partial result after each phase, next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_lora_plugins.testing.distributed import run_distributed  # noqa: E402


def model_config(layers: int, tiny: bool) -> Any:
    from transformers import Qwen3MoeConfig

    if tiny:
        sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
    else:
        sizes = dict(vocab_size=32000, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=64,
                     num_experts_per_tok=8)
    return Qwen3MoeConfig(num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False,
                          norm_topk_prob=True, torch_dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"],
                          **sizes)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _diff(a: Any, b: Any) -> dict[str, Any]:
    d = (a.float() - b.float()).abs()
    return {"bitwise_equal": bool(a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())),
            "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "equal_fraction": float((a == b).float().mean())}


def _set_mode(model: Any, on: bool) -> None:
    """Switch the mode in this process; the norms (made invariant at build time in the mode) follow."""
    import torch

    from moe_lora_plugins.patches.megatron_core.onpolicy import _invariant_rms_norm_class

    os.environ["MOELORA_TRUE_ON_POLICY"] = "on" if on else "off"
    invariant = _invariant_rms_norm_class()
    for module in model.modules():
        if type(module) in (invariant, torch.nn.RMSNorm):
            module.__class__ = invariant if on else torch.nn.RMSNorm


class _Capture:
    """Forward hooks that keep named intermediate outputs, in one layout (``[b, s, ...]``)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.handles: list[Any] = []

    def add(self, module: Any, name: str, seq_first: bool) -> None:
        def hook(mod: Any, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            self.values[name] = (out.transpose(0, 1) if seq_first else out).detach().clone()

        self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _megatron_points(model: Any, capture: _Capture) -> list[str]:
    names = ["embedding"]
    capture.add(model.embedding, "embedding", seq_first=True)
    for i, layer in enumerate(model.decoder.layers):
        for part, module in (("attention", layer.self_attention), ("mlp", layer.mlp), ("layer", layer)):
            capture.add(module, f"{i}.{part}", seq_first=True)
            names.append(f"{i}.{part}")
    capture.add(model.decoder.final_layernorm, "final_norm", seq_first=True)
    capture.add(model.output_layer, "logits", seq_first=True)
    return [*names, "final_norm", "logits"]


def _hf_points(model: Any, capture: _Capture) -> None:
    capture.add(model.model.embed_tokens, "embedding", seq_first=False)
    for i, layer in enumerate(model.model.layers):
        for part, module in (("attention", layer.self_attn), ("mlp", layer.mlp), ("layer", layer)):
            capture.add(module, f"{i}.{part}", seq_first=False)
    capture.add(model.model.norm, "final_norm", seq_first=False)
    capture.add(model.lm_head, "logits", seq_first=False)


def bench_rank(opts: dict[str, Any]) -> dict[str, Any]:
    import contextlib

    import torch
    from safetensors.torch import save_file

    import moe_lora_plugins
    from moe_lora_plugins.lora.export import save_peft_adapter
    from moe_lora_plugins.onpolicy import ops
    from moe_lora_plugins.testing import hf_onpolicy
    from moe_lora_plugins.testing.tiny_models import LoraSettings, build_lora_model, fill_from_global_names

    device, partial = opts["device"], Path(opts["out"] + ".partial")
    result: dict[str, Any] = {"options": opts}

    def save() -> None:
        partial.write_text(json.dumps(result, indent=1) + "\n")

    os.environ["MOELORA_TRUE_ON_POLICY"] = "on"
    moe_lora_plugins.activate(role="trainer")
    if device == "cpu":
        torch.cuda.current_device = lambda: "cpu"
    config = model_config(opts["layers"], opts["tiny"])
    start = time.perf_counter()
    built = build_lora_model(config, lora=LoraSettings(dim=16, alpha=32, share_expert_adapters=False),
                             dtype=torch.bfloat16, device=device)
    fill_from_global_names(built, generate_on=device)
    if device == "cpu":
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    model = built.model[0].eval()
    statuses = {row["id"]: row["status"] for row in moe_lora_plugins.get_registry().rows()}
    result.update({
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "versions": _versions(),
        "params": sum(p.numel() for p in model.parameters()),
        "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "build_seconds": time.perf_counter() - start,
        "onpolicy_patches": {k: v for k, v in statuses.items() if "onpolicy" in k},
    })
    save()
    batch, seq = opts["batch"], opts["seq"]
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(7)).to(device)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)[None, None]

    def megatron_logprobs(rows: Any, invariant: bool) -> Any:
        n = rows.shape[0]
        with torch.no_grad():
            logits = model(input_ids=rows, position_ids=torch.arange(seq, device=device)[None].expand(n, -1),
                           attention_mask=causal)
        if invariant:
            return ops.token_logprobs(logits[:, :-1].float(), rows[:, 1:])
        return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, rows[:, 1:, None]).squeeze(-1)

    def timed(fn: Any) -> tuple[Any, float]:
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return out, time.perf_counter() - t0

    alone_rows = list(range(batch)) if opts["alone"] == ["all"] else [int(r) for r in opts["alone"] if int(r) < batch]
    # (a) mode on: alone vs in the batch, with hooks for the layer-by-layer comparison against HF
    _set_mode(model, True)
    capture = _Capture()
    points = _megatron_points(model, capture)
    on_full, seconds = timed(lambda: megatron_logprobs(tokens, True))
    capture.remove()
    megatron_points = capture.values
    result["on"] = {"forward_seconds_batch": seconds, "alone_vs_batch": {}}
    for r in alone_rows:
        alone, seconds = timed(lambda r=r: megatron_logprobs(tokens[r : r + 1], True))
        result["on"]["alone_vs_batch"][str(r)] = {**_diff(alone[0], on_full[r]), "seconds": seconds}
    save()
    # (c) mode off: the same for Megatron's default kernels
    _set_mode(model, False)
    off_full, seconds = timed(lambda: megatron_logprobs(tokens, False))
    result["off"] = {"forward_seconds_batch": seconds, "alone_vs_batch": {}}
    for r in alone_rows:
        alone = megatron_logprobs(tokens[r : r + 1], False)
        result["off"]["alone_vs_batch"][str(r)] = _diff(alone[0], off_full[r])
    _set_mode(model, True)
    save()

    # HF side: Megatron-Bridge's plain export + the PEFT adapter, loaded by transformers
    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp(prefix="onpolicy-hf-"))
    start = time.perf_counter()
    base_dir, adapter_dir = work / "base", work / "adapter"
    base_dir.mkdir()
    weights = built.bridge.export_hf_weights(built.model, cpu=True, show_progress=False, merge_adapter_weights=False)
    save_file({k.replace(".base_layer.", "."): v.contiguous() for k, v in weights}, str(base_dir / "model.safetensors"))
    config.save_pretrained(base_dir)
    save_peft_adapter(built.model, adapter_dir, bridge=built.bridge, base_model_name_or_path=str(base_dir))
    hf, info = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, output_loading_info=True)
    hf = hf.to(device).eval()
    result["hf_load"] = {"seconds": time.perf_counter() - start, "loading_info": {k: list(v)[:5] for k, v in
                                                                                 info.items()}}
    hf_onpolicy.apply_onpolicy_forwards(hf, adapter_dir)
    capture = _Capture()
    _hf_points(hf, capture)
    hf_on, seconds = timed(lambda hf=hf: hf_onpolicy.hf_token_logprobs(hf, tokens))
    capture.remove()
    result["on"]["hf_forward_seconds_batch"] = seconds
    result["on"]["megatron_vs_hf"] = _diff(on_full, hf_on)
    result["on"]["first_difference"] = None
    result["on"]["points"] = {}
    for name in points:
        a, b = megatron_points.get(name), capture.values.get(name)
        if a is None or b is None:
            result["on"]["points"][name] = "not captured"
            continue
        d = _diff(a, b)
        result["on"]["points"][name] = {"bitwise_equal": d["bitwise_equal"], "max_abs_diff": d["max_abs_diff"]}
        if not d["bitwise_equal"] and result["on"]["first_difference"] is None:
            result["on"]["first_difference"] = name
    del megatron_points, capture
    save()
    result["on"]["megatron_on_vs_off"] = _diff(on_full, off_full)
    result["off"]["megatron_vs_hf_invariant_reference"] = _diff(off_full, hf_on)
    # (c) HF with its stock kernels: the adapter unmerged (PEFT's order), then merged into the weights
    hf_onpolicy.restore_forwards(hf)

    def hf_stock_logprobs(hf: Any = hf) -> Any:
        with torch.no_grad():
            logits = hf(input_ids=tokens, use_cache=False).logits
        return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)

    hf_onpolicy.apply_stock_lora_forwards(hf, adapter_dir)
    result["off"]["megatron_vs_hf"] = _diff(off_full, hf_stock_logprobs())
    hf_onpolicy.restore_forwards(hf)
    hf_onpolicy.merge_adapter(hf, adapter_dir)
    result["off"]["megatron_vs_hf_merged"] = _diff(off_full, hf_stock_logprobs())
    result["off"]["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()
    save()

    # (d) one forward + backward step, mode on vs off, interleaved after one warm-up each
    advantages = torch.randn(batch, generator=torch.Generator().manual_seed(3)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(on: bool) -> float:
        _set_mode(model, on)
        for p in params:
            p.grad = None
        _sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=tokens, position_ids=torch.arange(seq, device=device)[None].expand(batch, -1),
                       attention_mask=causal)
        if on:
            logprobs = ops.token_logprobs(logits[:, :-1].float(), tokens[:, 1:])
        else:
            logprobs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        loss = -(advantages[:, None] * logprobs).mean()
        loss.backward()
        _sync(device)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"on": [], "off": []}
    step(True)
    step(False)
    for _ in range(opts["iters"]):
        for mode in ("on", "off"):
            times[mode].append(step(mode == "on"))
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
    result["step"] = {mode: {"seconds": t, "median": statistics.median(t)} for mode, t in times.items()}
    result["step"]["on_over_off"] = result["step"]["on"]["median"] / result["step"]["off"]["median"]
    result["step"]["lora_grads_finite"] = grads_finite
    if device == "cuda":
        result["step"]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # where the mode-on forward spends its time (synchronised module hooks; one no-grad forward of the batch)
    _set_mode(model, True)
    result["on"]["forward_breakdown_seconds"] = _breakdown(model, lambda: megatron_logprobs(tokens, True), device)
    save()
    return result


def _breakdown(model: Any, run: Any, device: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    started: dict[int, float] = {}
    handles = []

    def watch(module: Any, label: str) -> None:
        def pre(mod: Any, args: Any) -> None:
            _sync(device)
            started[id(mod)] = time.perf_counter()

        def post(mod: Any, args: Any, output: Any) -> None:
            _sync(device)
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - started.pop(id(mod))

        handles.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

    for layer in model.decoder.layers:
        watch(layer.self_attention.linear_qkv, "attention: qkv projection (+LoRA)")
        watch(layer.self_attention.core_attention, "attention: softmax(QK^T)V")
        watch(layer.self_attention.linear_proj, "attention: output projection (+LoRA)")
        watch(layer.mlp, "MoE layer (router, experts with LoRA, combine)")
        watch(layer.input_layernorm, "norms")
        watch(layer.pre_mlp_layernorm, "norms")
    watch(model.output_layer, "lm head")
    try:
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        totals["total (incl. log-softmax)"] = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return totals


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("megatron-core", "megatron-bridge", "transformers", "torch", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model (dry run of the script)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--alone", default="0,5", help="rows also scored alone (comma-separated, or 'all')")
    parser.add_argument("--timeout", type=float, default=1500)
    args = parser.parse_args()
    opts = {"out": str(Path(args.out).resolve()), "device": args.device, "tiny": args.tiny, "seq": args.seq,
            "batch": args.batch, "layers": args.layers, "iters": args.iters,
            "alone": [r for r in args.alone.split(",") if r]}
    env = {"MOELORA_PLUGINS": "on", "MOELORA_TRUE_ON_POLICY": "on", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    (result,) = run_distributed(bench_rank, 1, args=(opts,), backend="nccl" if args.device == "cuda" else "gloo",
                                env=env, timeout_s=args.timeout)
    result["wall_seconds"] = time.perf_counter() - start
    result["date_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: result[k] for k in ("device", "params", "wall_seconds")}
    summary["on"] = {k: v for k, v in result["on"].items() if k != "points"}
    summary["off"] = result["off"]
    summary["step"] = result["step"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

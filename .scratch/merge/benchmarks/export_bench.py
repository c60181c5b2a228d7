"""Benchmark: Megatron-Bridge HF export, unpatched upstream vs moe-lora-plugins, on the anchor model.

The anchor model of docs/upstream-notes.md: Qwen3-MoE shape, 8 layers, hidden 2048, 64 experts (moe_ffn 768),
vocab 32000, 2.69 B parameters, bf16, LoRA r=16 on qkv / proj / fc1 / fc2 including experts. For
each layout (world size 1, then EP=2 on two GPUs with NCCL) each rank builds the model, fills it
from global names (on the GPU), measures the NCCL broadcast bandwidth, and then, for upstream and
for the patched export (audit on, and audit off), for plain / merged / adapter exports: one pass
that fingerprints every emitted tensor (bitwise, for the correctness check against world size 1),
then timed passes that only count bytes (wall time, GB/s, peak extra GPU memory), interleaving
upstream / patched / patched-without-audit round by round (``deactivate()`` reverts the patches).

    python benchmarks/export_bench.py --out results.json [--iters 3] [--layouts world1,ep2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_lora_plugins.testing.distributed import run_distributed  # noqa: E402
from moe_lora_plugins.testing.tiny_models import LoraSettings, ParallelLayout  # noqa: E402

KINDS = ("plain", "merged", "adapter")


def anchor_config() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=64,
        num_experts_per_tok=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["Qwen3MoeForCausalLM"],
    )


def _stream(built: Any, kind: str) -> Any:
    bridge, model = built.bridge, built.model
    if kind == "plain":
        return bridge.export_hf_weights(model, cpu=False, show_progress=False, merge_adapter_weights=False)
    if kind == "merged":
        return bridge.export_hf_weights(model, cpu=False, show_progress=False, merge_adapter_weights=True)
    return bridge.export_adapter_weights(model, cpu=False, show_progress=False)


def _fingerprint(tensor: Any) -> int:
    import torch

    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(torch.int64)
    weights = torch.arange(raw.numel(), device=raw.device, dtype=torch.int64) % 8191 + 1
    return int((raw * weights).sum().item())


def _fingerprints(built: Any, kind: str) -> dict[str, list]:
    out = {}
    for item in _stream(built, kind):
        name, tensor = item[0], item[1]
        if name in out:
            out[name] = ["DUPLICATE"]
            continue
        out[name] = [list(tensor.shape), str(tensor.dtype), _fingerprint(tensor)]
    return out


def _timed_once(built: Any, kind: str) -> tuple[float, int, int, int]:
    import torch

    torch.cuda.synchronize()
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()  # every rank starts together: no rank's lateness lands in the other's time
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    nbytes, count = 0, 0
    for item in _stream(built, kind):
        nbytes += item[1].numel() * item[1].element_size()
        count += 1
    torch.cuda.synchronize()
    return time.perf_counter() - start, nbytes, count, torch.cuda.max_memory_allocated() - base


def _summary(samples: list[tuple[float, int, int, int]]) -> dict[str, float]:
    times = [s[0] for s in samples]
    best = min(times)
    nbytes, count = samples[-1][1], samples[-1][2]
    return {
        "seconds_min": best,
        "seconds_median": statistics.median(times),
        "gb": nbytes / 1e9,
        "gb_per_s": nbytes / 1e9 / best,
        "tensors": count,
        "peak_extra_gib": max(s[3] for s in samples) / 2**30,
    }


def _broadcast_gbps(size_bytes: int = 2**30, iters: int = 5) -> float | None:
    import torch
    import torch.distributed as dist

    if dist.get_world_size() < 2:
        return None
    buffer = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dist.broadcast(buffer, 0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        dist.broadcast(buffer, 0)
    torch.cuda.synchronize()
    return size_bytes * iters / (time.perf_counter() - start) / 1e9


def _profile(built: Any, kind: str, top: int = 25) -> str:
    """cProfile of one export (the tensors are consumed as in the timed rounds), top functions by own time."""
    import cProfile
    import io
    import pstats

    import torch

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for item in _stream(built, kind):
        item[1].numel()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def bench_rank(layout: ParallelLayout, iters: int, profile: bool = False) -> dict[str, Any]:
    import torch

    import moe_lora_plugins
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names

    start = time.perf_counter()
    built = build_lora_model(anchor_config(), layout, LoraSettings(dim=16, alpha=32), dtype=torch.bfloat16,
                             device="cuda")
    fill_from_global_names(built, generate_on="cuda")
    params = sum(p.numel() for chunk in built.model for p in chunk.parameters())
    result: dict[str, Any] = {
        "layout": layout.label,
        "rank": torch.distributed.get_rank(),
        "local_params": params,
        "build_seconds": time.perf_counter() - start,
        "nccl_broadcast_gb_per_s": _broadcast_gbps(),
        "device": torch.cuda.get_device_name(),
        "timings": {},
        "fingerprints": {},
    }
    phases = ("upstream", "patched", "patched-noaudit")

    def enter(phase: str) -> None:
        if phase == "upstream":
            moe_lora_plugins.deactivate()
        else:
            moe_lora_plugins.activate(role="trainer")
        os.environ["MOELORA_EXPORT_AUDIT"] = "off" if phase == "patched-noaudit" else "on"

    for phase in ("upstream", "patched"):
        enter(phase)
        for kind in KINDS:
            result["fingerprints"][f"{phase}/{kind}"] = _fingerprints(built, kind)
    # Interleaved rounds, so drift in clocks or caches favours no phase.
    samples: dict[str, list] = {f"{phase}/{kind}": [] for phase in phases for kind in KINDS}
    for _ in range(iters):
        for kind in KINDS:
            for phase in phases:
                enter(phase)
                samples[f"{phase}/{kind}"].append(_timed_once(built, kind))
    result["timings"] = {key: _summary(value) for key, value in samples.items()}
    for key, value in samples.items():  # every timed round emitted what its checked pass emitted
        checked = result["fingerprints"][key.replace("patched-noaudit", "patched")]
        counts = {count for _, _, count, _ in value}
        if counts != {len(checked)}:
            raise RuntimeError(f"{key}: timed rounds emitted {sorted(counts)} tensors, the checked pass {len(checked)}")
    if profile:
        result["profiles"] = {}
        for phase in ("upstream", "patched"):
            enter(phase)
            result["profiles"][f"{phase}/merged"] = _profile(built, "merged")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--layouts", default="world1,ep2")
    parser.add_argument("--profile", action="store_true", help="add a cProfile of one merged export per phase")
    args = parser.parse_args()
    layouts = {"world1": ParallelLayout(), "ep2": ParallelLayout(ep=2)}
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for label in args.layouts.split(","):
        layout = layouts[label]
        t0 = time.perf_counter()
        report[label] = run_distributed(bench_rank, layout.world_size, (layout, args.iters, args.profile), backend="nccl",
                                        timeout_s=500)
        print(f"{label}: {time.perf_counter() - t0:.1f} s", flush=True)
        Path(args.out).write_text(json.dumps(report))
    reference = report["world1"][0]["fingerprints"]
    summary = {}
    for label in args.layouts.split(","):
        for rank_result in report[label]:
            for key, prints in rank_result["fingerprints"].items():
                kind = key.split("/")[1]
                ref = reference[f"upstream/{kind}"]
                missing = sorted(ref.keys() - prints.keys())
                different = sorted(n for n in ref.keys() & prints.keys() if ref[n] != prints[n])
                extra = sorted(prints.keys() - ref.keys())
                summary[f"{label}/rank{rank_result['rank']}/{key}"] = {
                    "equal_to_world1": not (missing or different or extra),
                    "missing": len(missing), "different": len(different), "extra": len(extra),
                }
    report["correctness"] = summary
    for rank_result in (r for label in args.layouts.split(",") for r in report[label]):
        rank_result.pop("fingerprints")
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "date"}, indent=1))


if __name__ == "__main__":
    main()

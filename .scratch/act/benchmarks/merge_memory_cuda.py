"""GPU memory and time of merged-weight export approaches on the docs/upstream-notes.md anchor model (bf16).

One rank (world size 1, NCCL) builds the anchor model (Qwen3-MoE shape, 8 layers, hidden 2048, 64
experts, LoRA r=16 on qkv / proj / fc1 / fc2 including experts) on the GPU, fills it from global
names, and streams four exports with ``cpu=False``, reporting for each the peak GPU memory above what
was allocated before it started (``torch.cuda.max_memory_allocated``) and the wall time:

- ``plain``: ``export_hf_weights(merge_adapter_weights=False)``, no merge;
- ``merge_on_export``: ours, ``moe_lora_plugins.merge.bridge_export.stream_merged_hf_weights``;
- ``upstream_merge``: ``export_hf_weights(merge_adapter_weights=True)`` (patches off);
- ``backup_merge``: slime's approach: a full copy of the parameters (to pinned CPU memory), the
  merged export, then a restore from the copy; its host-memory bytes are reported too.

It also checks that ours and upstream's merged tensors are bitwise equal (world size 1, where
upstream's merge is correct).

    python benchmarks/merge_memory_cuda.py --out merge_cuda.json [--iters 2] [--tiny --device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_bench import _fingerprint, anchor_config  # noqa: E402

from moe_lora_plugins.testing.distributed import run_distributed  # noqa: E402
from moe_lora_plugins.testing.tiny_models import LoraSettings, ParallelLayout  # noqa: E402


def bench(tiny: bool, device: str, iters: int) -> dict[str, Any]:
    import torch

    import moe_lora_plugins
    from moe_lora_plugins.merge.bridge_export import stream_merged_hf_weights
    from moe_lora_plugins.testing.merge_memory import peak_during
    from moe_lora_plugins.testing.tiny_models import (
        build_lora_model,
        fill_from_global_names,
        tiny_qwen3_moe_config,
    )

    moe_lora_plugins.deactivate()
    config = tiny_qwen3_moe_config() if tiny else anchor_config()
    lora = LoraSettings(dim=16, alpha=32)
    dtype = torch.bfloat16
    built = build_lora_model(config, ParallelLayout(), lora, dtype=dtype, device=device)
    fill_from_global_names(built, generate_on=device)
    bridge, model = built.bridge, built.model
    scale = lora.alpha / lora.dim
    on_gpu = device == "cuda"

    def plain() -> Any:
        return bridge.export_hf_weights(model, cpu=False, show_progress=False, merge_adapter_weights=False)

    def ours() -> Any:
        return stream_merged_hf_weights(bridge, model, scale, cpu=False)

    def upstream() -> Any:
        return bridge.export_hf_weights(model, cpu=False, show_progress=False, merge_adapter_weights=True)

    backup_bytes = 0

    def backup() -> Any:
        nonlocal backup_bytes
        copy = {n: p.detach().to("cpu", copy=True).pin_memory() if on_gpu else p.detach().clone()
                for chunk in model for n, p in chunk.named_parameters()}
        backup_bytes = sum(t.numel() * t.element_size() for t in copy.values())
        yield from upstream()
        with torch.no_grad():
            for chunk in model:
                for n, p in chunk.named_parameters():
                    p.copy_(copy[n])

    def consume(make: Any) -> tuple[float, int]:
        if on_gpu:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        peak_cpu = 0
        if on_gpu:
            for item in make():
                del item
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak_cpu = peak_during(lambda: [None for _ in make()])
            peak = peak_cpu
        return time.perf_counter() - start, peak

    approaches = {"plain": plain, "merge_on_export": ours, "upstream_merge": upstream, "backup_merge": backup}
    fingerprints = {}
    for name in ("merge_on_export", "upstream_merge"):
        fingerprints[name] = {item[0].replace(".base_layer", ""): _fingerprint(item[1]) for item in approaches[name]()}
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in approaches}
    for _ in range(iters):
        for name, make in approaches.items():
            samples[name].append(consume(make))
    params = sum(p.numel() for chunk in model for p in chunk.parameters())
    param_bytes = sum(p.numel() * p.element_size() for chunk in model for p in chunk.parameters())
    ours_prints, upstream_prints = fingerprints["merge_on_export"], fingerprints["upstream_merge"]
    return {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "params": params,
        "param_bytes": param_bytes,
        "backup_host_bytes": backup_bytes,
        "merged_equal_to_upstream_world1": ours_prints == upstream_prints,
        "merged_tensors": len(ours_prints),
        "names_only_in_ours": sorted(ours_prints.keys() - upstream_prints.keys())[:5],
        "names_only_in_upstream": sorted(upstream_prints.keys() - ours_prints.keys())[:5],
        "results": {
            name: {"seconds_min": min(s[0] for s in v), "peak_extra_bytes": max(s[1] for s in v)}
            for name, v in samples.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of the anchor")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    report = run_distributed(bench, 1, (args.tiny, args.device, args.iters), backend=backend, timeout_s=500)[0]
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

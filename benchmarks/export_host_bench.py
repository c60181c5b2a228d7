"""Benchmark: Megatron-Bridge HF export timed the way a host's weight sync calls it, upstream vs patched.

World size 1 on one GPU, the anchor model of ``export_bench.py`` (Qwen3-MoE shape, 8 layers, hidden
2048, 64 experts of 768, 32 heads, LoRA r=16 on every linear including the experts, bf16). Each timed
call is a fresh ``bridge.export_hf_weights(model, ...)`` iterated to the end, every tensor's bytes
counted, synchronised before and after; upstream (``deactivate()``) and patched (``activate()``)
alternate round by round. Three calls:

- ``user_default``: ``export_hf_weights(model, cpu=False)``, as a user writes it: upstream's defaults
  are ``merge_adapter_weights=True`` and ``show_progress=True`` (a merged export with a progress bar);
- ``host_plain``: ``cpu=False, show_progress=False, merge_adapter_weights=False`` (what a host that
  syncs base weights and the adapter separately calls; what ``export_bench.py`` timed as "plain");
- ``host_merged``: ``cpu=False, show_progress=False, merge_adapter_weights=True``.

Before timing, plain and merged exports of upstream and patched are fingerprinted tensor by tensor
(position-weighted byte sums) and compared. On a GPU each call's peak of allocated memory above its
start is recorded (``peak_extra_bytes_max``). One patched ``host_plain`` and one ``host_merged`` export are profiled (cProfile,
top functions by own time).

    python benchmarks/export_host_bench.py --out export_host.json [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from export_bench import _fingerprints, anchor_config  # noqa: E402

from moe_lora_plugins.testing.tiny_models import LoraSettings  # noqa: E402

CALLS = {
    "user_default": {"cpu": False},
    "host_plain": {"cpu": False, "show_progress": False, "merge_adapter_weights": False},
    "host_merged": {"cpu": False, "show_progress": False, "merge_adapter_weights": True},
}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(built: Any, call: str) -> tuple[float, int, int, int]:
    """Seconds, bytes and tensors of one call, and by how much the GPU's allocated memory peaked above its
    level at the start (0 on the CPU); the caller drops each tensor, as a streaming sync does."""
    import torch

    cuda = torch.cuda.is_available()
    _sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    nbytes = count = 0
    for item in built.bridge.export_hf_weights(built.model, **CALLS[call]):
        nbytes += item[1].numel() * item[1].element_size()
        count += 1
    _sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    return seconds, nbytes, count, peak


def _profile(built: Any, call: str = "host_plain") -> str:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    _sync()
    profiler.enable()
    for item in built.bridge.export_hf_weights(built.model, **CALLS[call]):
        item[1].numel()
    _sync()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def run(rounds: int = 7, tiny: bool = False, anchor_counts: bool = False) -> dict[str, Any]:
    import torch

    import moe_lora_plugins
    from moe_lora_plugins.testing.distributed import init_single_process_group
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names

    cuda = init_single_process_group()
    device = "cuda" if cuda else "cpu"
    if tiny or anchor_counts:  # a CPU smoke run of this script, or the CPU proxy of the anchor's per-tensor work
        from moe_lora_plugins.testing.tiny_models import tiny_qwen3_moe_config

        counts = {"num_hidden_layers": 8, "num_experts": 64, "num_experts_per_tok": 8} if anchor_counts else {}
        config = tiny_qwen3_moe_config(torch_dtype="bfloat16", **counts)
    else:
        config = anchor_config()
    start = time.perf_counter()
    built = build_lora_model(config, lora=LoraSettings(dim=16, alpha=32), dtype=torch.bfloat16, device=device)
    fill_from_global_names(built, generate_on=device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "params": sum(p.numel() for p in built.model[0].parameters()),
        "build_seconds": time.perf_counter() - start,
    }
    prints = {}
    for phase in ("upstream", "patched"):
        moe_lora_plugins.deactivate() if phase == "upstream" else moe_lora_plugins.activate(role="trainer")
        for export in ("plain", "merged"):
            prints[f"{phase}/{export}"] = _fingerprints(built, export)
    result["bitwise_equal"] = {e: prints[f"upstream/{e}"] == prints[f"patched/{e}"] for e in ("plain", "merged")}
    result["tensors"] = {k: len(v) for k, v in prints.items()}
    samples: dict[str, list[tuple[float, int, int, int]]] = {f"{p}/{c}": [] for p in ("upstream", "patched") for c in CALLS}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for call in CALLS:
            for phase in ("upstream", "patched"):
                moe_lora_plugins.deactivate() if phase == "upstream" else moe_lora_plugins.activate(role="trainer")
                samples[f"{phase}/{call}"].append(_timed(built, call))
    timings = {}
    for key, values in samples.items():
        values = values[1:]
        times = [v[0] for v in values]
        nbytes = values[-1][1]
        timings[key] = {
            "seconds_median": statistics.median(times),
            "seconds_min": min(times),
            "gb": nbytes / 1e9,
            "gb_per_s_median": nbytes / 1e9 / statistics.median(times),
            "tensors": values[-1][2],
            "peak_extra_bytes_max": max(v[3] for v in values),
        }
    result["timings"] = timings
    med = {k: v["seconds_median"] for k, v in timings.items()}
    result["ratios"] = {
        **{f"patched_over_upstream/{c}": med[f"patched/{c}"] / med[f"upstream/{c}"] for c in CALLS},
        "patched_merged_over_patched_plain": med["patched/host_merged"] / med["patched/host_plain"],
        "upstream_merged_over_upstream_plain": med["upstream/host_merged"] / med["upstream/host_plain"],
    }
    moe_lora_plugins.activate(role="trainer")
    from moe_lora_plugins.patches.megatron_bridge import merged_stream

    # the tasks the per-layer merged stream merges itself (0: none qualified or passed the bitwise check)
    result["merged_stream_planned_tasks"] = sum(len(plan.entries) for plan in merged_stream._plans.values())
    stream_groups = {id(g): g for plan in merged_stream._plans.values() for g, _ in plan.entries.values()}.values()
    result["merged_stream_groups"] = {g.key[1]: {"fused": g.fused, "blocks": len(g.blocks)} for g in stream_groups}
    result["merged_stream_checked_shapes"] = {str(k): v for k, v in merged_stream._verified.items()}
    result["profile_patched_host_plain"] = _profile(built)
    result["profile_patched_host_merged"] = _profile(built, "host_merged")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="tiny model: a CPU smoke run")
    parser.add_argument(
        "--anchor-counts", action="store_true",
        help="tiny widths with the anchor's counts (8 layers, 64 experts: the same 1,611 tensors): a CPU proxy of "
        "the per-tensor and per-call work",
    )
    args = parser.parse_args()
    result = run(args.rounds, args.tiny, args.anchor_counts)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("bitwise_equal", "timings", "ratios")}, indent=1))
    print(result["profile_patched_host_plain"])


if __name__ == "__main__":
    main()

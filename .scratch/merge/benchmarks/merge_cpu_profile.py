"""CPU proxy: a merged export's cost over a plain one, with and without the batched expert merge.

World size 1 on the CPU (gloo), a small Qwen3-MoE bf16 model (hidden 64, ``--experts`` experts of
32, ``--layers`` layers, LoRA r=16 alpha=32 on every linear including each expert), the suite active.
Three states alternate round by round: upstream (suite off), the suite with the batched expert merge
disabled (``megatron_bridge.batched_expert_merge`` reverted: upstream's per-tensor merge) and the
full suite. Each timed call is a fresh ``export_hf_weights(model, cpu=False, show_progress=False,
merge_adapter_weights=...)`` iterated to the end. Before timing, the merged exports of the three
states are compared tensor by tensor (``torch.equal``). Then one merged export of each suite state is
profiled (cProfile, top functions by own time).

    python benchmarks/merge_cpu_profile.py [--experts 32] [--layers 4] [--rounds 7] [--out f.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

BATCHED_ID = "megatron_bridge.batched_expert_merge"
STATES = ("upstream", "suite_per_tensor_merge", "suite")


def _set_state(state: str) -> None:
    import moe_lora_plugins

    moe_lora_plugins.deactivate()
    if state == "upstream":
        return
    moe_lora_plugins.activate(role="trainer")
    if state == "suite_per_tensor_merge":
        moe_lora_plugins.get_registry().revert(BATCHED_ID)


def _export(built: Any, merged: bool) -> dict[str, Any]:
    return {
        item[0]: item[1].clone()
        for item in built.bridge.export_hf_weights(
            built.model, cpu=False, show_progress=False, merge_adapter_weights=merged
        )
    }


def _timed(built: Any, merged: bool) -> float:
    start = time.perf_counter()
    for item in built.bridge.export_hf_weights(built.model, cpu=False, show_progress=False,
                                               merge_adapter_weights=merged):
        item[1].numel()
    return time.perf_counter() - start


def _profile(built: Any) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for item in built.bridge.export_hf_weights(built.model, cpu=False, show_progress=False,
                                               merge_adapter_weights=True):
        item[1].numel()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


def run(experts: int, layers: int, rounds: int) -> dict[str, Any]:
    import torch

    from moe_lora_plugins.testing.distributed import init_single_process_group
    from moe_lora_plugins.testing.tiny_models import (
        LoraSettings,
        build_lora_model,
        fill_from_global_names,
        tiny_qwen3_moe_config,
    )

    init_single_process_group()
    config = tiny_qwen3_moe_config(torch_dtype="bfloat16", num_experts=experts, num_hidden_layers=layers)
    built = build_lora_model(config, lora=LoraSettings(dim=16, alpha=32), dtype=torch.bfloat16, device="cpu")
    fill_from_global_names(built)
    exports = {}
    for state in STATES:
        _set_state(state)
        exports[state] = _export(built, True)
    reference = exports["upstream"]
    bitwise = {
        state: list(exports[state]) == list(reference)
        and all(torch.equal(exports[state][k], reference[k]) for k in reference)
        for state in STATES[1:]
    }
    samples: dict[str, list[float]] = {f"{s}/{m}": [] for s in STATES for m in ("plain", "merged")}
    for _ in range(rounds + 1):
        for merged in (False, True):
            for state in STATES:
                _set_state(state)
                samples[f"{state}/{'merged' if merged else 'plain'}"].append(_timed(built, merged))
    med = {k: statistics.median(v[1:]) for k, v in samples.items()}
    profiles = {}
    for state in STATES[1:]:
        _set_state(state)
        _timed(built, True)
        profiles[state] = _profile(built)
    _set_state("suite")
    return {
        "model": {"experts": experts, "layers": layers, "hidden": 64, "expert_ffn": 32, "rank": 16,
                  "merged_tensors": len(reference)},
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "merged_bitwise_equal_upstream": bitwise,
        "median_seconds": med,
        "merged_over_plain": {s: med[f"{s}/merged"] / med[f"{s}/plain"] for s in STATES},
        "profiles_merged": profiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args.experts, args.layers, args.rounds)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "profiles_merged"}, indent=1))
    for state, text in result["profiles_merged"].items():
        print(f"--- profile, one merged export, {state} ---")
        print(text)


if __name__ == "__main__":
    main()

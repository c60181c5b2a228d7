"""One patched merged export of the anchor model under torch.profiler (after two warm-up exports): the CPU
ops and CUDA runtime calls by self CPU time, to find host-side waits (synchronisations, allocations).

    python benchmarks/merged_stream_torch_profile.py [--rows 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from export_bench import anchor_config  # noqa: E402

from moe_lora_plugins.testing.tiny_models import LoraSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    import moe_lora_plugins
    from moe_lora_plugins.testing.distributed import init_single_process_group
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names

    init_single_process_group()
    built = build_lora_model(anchor_config(), lora=LoraSettings(dim=16, alpha=32), dtype=torch.bfloat16, device="cuda")
    fill_from_global_names(built, generate_on="cuda")
    moe_lora_plugins.activate(role="trainer")

    def export(merged: bool) -> None:
        for item in built.bridge.export_hf_weights(built.model, cpu=False, show_progress=False,
                                                   merge_adapter_weights=merged):
            item[1].numel()

    for merged in (True, True, False, True):
        export(merged)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        export(True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()

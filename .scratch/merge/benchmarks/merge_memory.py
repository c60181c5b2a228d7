"""Peak extra resident memory of merged-weight export approaches on the CPU (one process, float32).

    PYTHONPATH=src:tests/megatron python benchmarks/merge_memory.py [tiny|mid|anchor-shape]...

Approaches: plain export (no merge), merge-on-export (ours), Megatron-Bridge's
``export_hf_weights(merge_adapter_weights=True)``, and slime's backup approach (a full copy of the
parameters kept across the merged export). Peaks are VmHWM above the resident size at the start of each
export, with glibc serving allocations above 64 KiB by mmap so freed tensors leave at once.
"""

from __future__ import annotations

import sys
import time

from merge_workers import export_memory_worker

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import LoraSettings, tiny_qwen3_moe_config

MODELS = {
    "tiny": {},
    "mid": dict(hidden_size=512, moe_intermediate_size=512, intermediate_size=1024, num_experts=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=1024),
    # the docs/upstream-notes.md anchor's layer shapes (hidden 2048, 64 experts of 768), 1 layer instead of 8
    "anchor-layer": dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=64,
                         num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         vocab_size=4096, num_hidden_layers=1),
}
APPROACHES = ("plain", "merge_on_export", "upstream_merge", "backup_merge")


def per_tensor_transients(out_features: int = 6144, in_features: int = 2048, rank: int = 16) -> None:
    """Peak extra memory of merging one bf16 weight: ours vs the upstream formula (four temporaries)."""
    import torch

    from moe_lora_plugins.merge import merged_weight
    from moe_lora_plugins.testing.merge_memory import malloc_returns_memory_at_once, peak_during

    malloc_returns_memory_at_once()
    base = torch.randn(out_features, in_features).to(torch.bfloat16)
    a = torch.randn(rank, in_features).to(torch.bfloat16)
    b = torch.randn(out_features, rank).to(torch.bfloat16)
    kept: list = []
    ours = peak_during(lambda: kept.append(merged_weight(base, a, b, 2.0)))
    upstream = peak_during(lambda: kept.append((base.float() + 2.0 * (b.float() @ a.float())).to(base.dtype)))
    assert torch.equal(kept[0], kept[1])
    weight_mib = base.numel() * 4 / 2**20
    print(f"\nOne {out_features}x{in_features} bf16 weight (fp32 size {weight_mib:.0f} MiB), r={rank}: "
          f"merged_weight peak {ours / 2**20:.1f} MiB, upstream formula peak {upstream / 2**20:.1f} MiB "
          "(both include the bf16 result; results bitwise equal)")


def main(names: list[str]) -> None:
    print("| model | params (MiB fp32) | largest weight (MiB) | plain | merge-on-export | upstream merge | backup (slime) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        start = time.time()
        config = tiny_qwen3_moe_config(**MODELS[name])
        [r] = run_distributed(export_memory_worker, 1, (config, LoraSettings(dim=16, alpha=32, share_expert_adapters=False),
                                                        APPROACHES), timeout_s=1800)
        mib = [f"{r['peaks'][a] / 2**20:.1f}" for a in APPROACHES]
        print(f"| {name} | {r['param_bytes'] / 2**20:.1f} | {r['largest_fp32_bytes'] / 2**20:.1f} | " + " | ".join(mib)
              + f" | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:] or ["tiny", "mid", "per-tensor"]
    main([name for name in args if name != "per-tensor"])
    if "per-tensor" in args:
        per_tensor_transients()

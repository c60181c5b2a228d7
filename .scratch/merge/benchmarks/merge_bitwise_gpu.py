"""Check: the batched expert merge is bitwise Megatron-Bridge's per-tensor merge on this device.

Anchor shapes (64 experts; gate and up 768 x 2048 with A 16 x 2048 and B 768 x 16; down 2048 x 768
with A 16 x 768 and B 2048 x 16), bf16 base weights and bf16 adapters, alpha 32, dim 16, plus an fp32
case. For each projection, the batched path of ``moe_lora_plugins.merge.batched``
(``batched_deltas`` over blocks of experts, then ``merge_expert`` per expert) is compared with
Megatron-Bridge 0.6.2's own ``MegatronPeftBridge._merge_single_adapter_weight`` (which calls
``LoRAMerge.merge``) expert by expert, with ``torch.equal``. Block sizes 64 (a whole layer), 10, 21
(the export patch's default blocks for gate/up and down at its 256 MiB budget) and 1. The deltas
alone are also compared with the per-expert ``scale * (B @ A)`` so a mismatch says which step
differs. Prints one JSON verdict (and writes it to ``--out`` when given); exit status 0 when every
comparison is equal, 1 otherwise.

    python benchmarks/merge_bitwise_gpu.py [--out merge_bitwise.json] [--device cuda]

Needs torch and the Megatron-Core / Megatron-Bridge wheels (Transformer Engine optional).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

EXPERTS = 64
RANK = 16
ALPHA = 32
SHAPES = {"gate": (768, 2048), "up": (768, 2048), "down": (2048, 768)}
BLOCKS = (64, 21, 10, 1)


def _upstream_merge() -> Any:
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()  # no-op where Transformer Engine is installed
    from megatron.bridge.models.conversion.peft_bridge import MegatronPeftBridge

    # the method reads no state of the bridge (it builds a LoRAMerge and calls it with tp_group=None)
    bridge = MegatronPeftBridge.__new__(MegatronPeftBridge)
    return bridge._merge_single_adapter_weight


def run(device: str) -> dict[str, Any]:
    import torch

    from moe_lora_plugins.merge.batched import batched_deltas, merge_expert, per_expert_delta

    upstream = _upstream_merge()
    import megatron.bridge
    dev = torch.device(device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_bridge": getattr(megatron.bridge, "__version__", "?"),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32 if dev.type == "cuda" else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cases": [],
    }
    all_equal = True
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator(device="cpu").manual_seed(1234)
        for proj, (out_f, in_f) in SHAPES.items():
            bases = [(torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype).to(dev) for _ in range(EXPERTS)]
            a = [(torch.randn(RANK, in_f, generator=gen) * 0.02).to(dtype).to(dev) for _ in range(EXPERTS)]
            b = [(torch.randn(out_f, RANK, generator=gen) * 0.02).to(dtype).to(dev) for _ in range(EXPERTS)]
            scale = ALPHA / RANK
            reference = [upstream(bases[e], ALPHA, RANK, a[e], b[e]) for e in range(EXPERTS)]
            ref_deltas = [per_expert_delta(a[e], b[e], scale, dev) for e in range(EXPERTS)]
            for block in BLOCKS:
                delta_mismatch: list[int] = []
                merge_mismatch: list[int] = []
                max_ulp_diff = 0
                for start in range(0, EXPERTS, block):
                    stop = min(EXPERTS, start + block)
                    deltas = batched_deltas(a[start:stop], b[start:stop], scale, device=dev)
                    for e in range(start, stop):
                        if not torch.equal(deltas[e - start], ref_deltas[e]):
                            delta_mismatch.append(e)
                        merged = merge_expert(bases[e], deltas[e - start])
                        if not torch.equal(merged, reference[e]):
                            merge_mismatch.append(e)
                            bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
                            diff = (merged.view(bits).int() - reference[e].view(bits).int()).abs().max().item()
                            max_ulp_diff = max(max_ulp_diff, int(diff))
                    del deltas
                equal = not delta_mismatch and not merge_mismatch
                all_equal &= equal
                result["cases"].append({
                    "dtype": str(dtype).removeprefix("torch."),
                    "projection": proj,
                    "shape": [out_f, in_f],
                    "experts_per_bmm": block,
                    "deltas_equal": not delta_mismatch,
                    "merged_equal_upstream": not merge_mismatch,
                    "experts_with_delta_mismatch": len(delta_mismatch),
                    "experts_with_merge_mismatch": len(merge_mismatch),
                    "max_diff_in_ulps": max_ulp_diff,
                })
            del bases, a, b, reference, ref_deltas
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    result["bitwise_equal"] = all_equal
    result["verdict"] = (
        "batched merge bitwise equal to Megatron-Bridge's per-tensor merge on every case"
        if all_equal
        else "MISMATCH: see cases; keep the per-tensor fallback on this device"
    )
    return result


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args.device)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0 if result["bitwise_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

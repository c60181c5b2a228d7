"""The fused merge kernel (``merge/fused.py``) against upstream's per-tensor merge and the per-layer stream's
block arithmetic, at the anchor model's shapes: bitwise per shape / rank / scale / dtype, and per block the
time to return (host) and to finish, interleaved, medians of ``--rounds``.

- ``bitwise``: ``merge_many`` against ``(W.float() + scale * (B.float() @ A.float())).to(W.dtype)`` (upstream's
  ``_merge_single_adapter_weight``), one 2-D product per member, for both of the kernel's sum variants
  (``fma``: one fused multiply-add per rank step; ``dot``: ``tl.dot`` in IEEE float32);
- ``timing``: one block of ``--block`` experts' fc1 (1536 x 2048, r=16, bf16): the stream's ops (``cat``,
  ``bmm`` into float32, add) against one ``merge_many`` launch.

    python benchmarks/fused_merge_probe.py --out f.json [--rounds 21] [--block 42]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    import torch
    from merged_stream_ops import interleaved

    from moe_lora_plugins.merge import fused

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--block", type=int, default=42)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
                    "command": " ".join(sys.argv), "bitwise": {}, "timing": {}}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None

    def upstream(w, a, b, scale):
        return (w.float() + scale * (b.to(device=w.device, dtype=torch.float32)
                                     @ a.to(device=w.device, dtype=torch.float32))).to(w.dtype)

    cases = [(1536, 2048, 16, 1.3, torch.bfloat16, torch.bfloat16), (1536, 2048, 16, 2.0, torch.bfloat16, torch.bfloat16),
             (2048, 768, 16, 2.0, torch.bfloat16, torch.bfloat16), (768, 2048, 16, 2.0, torch.bfloat16, torch.bfloat16),
             (4608, 2048, 16, 2.0, torch.bfloat16, torch.bfloat16), (2048, 4096, 16, 2.0, torch.bfloat16, torch.bfloat16),
             (1536, 2048, 8, 2.0, torch.bfloat16, torch.bfloat16), (1536, 2048, 32, 0.5, torch.bfloat16, torch.bfloat16),
             (1536, 2048, 64, 2.0, torch.bfloat16, torch.bfloat16), (1536, 2048, 10, 1.3, torch.bfloat16, torch.bfloat16),
             (1536, 2048, 16, 2.0, torch.bfloat16, torch.float32), (1536, 2048, 16, 2.0, torch.float32, torch.float32),
             (1536, 2048, 16, 2.0, torch.float16, torch.float16), (100, 300, 16, 1.3, torch.bfloat16, torch.bfloat16)]
    if device.type != "cuda":
        cases = [c for c in cases if c[0] * c[1] <= 30000]
    for rows, cols, rank, scale, wdt, fdt in cases:
        n = 4
        ws = [(torch.randn(rows, cols, device=device) * 0.02).to(wdt) for _ in range(n)]
        a_s = [(torch.randn(rank, cols, device=device) * 0.01).to(fdt) for _ in range(n)]
        b_s = [(torch.randn(rows, rank, device=device) * 0.01).to(fdt) for _ in range(n)]
        reference = torch.stack([upstream(ws[i], a_s[i], b_s[i], scale) for i in range(n)])
        bmm = (torch.stack(ws).float() + scale * torch.bmm(torch.stack(b_s).float(), torch.stack(a_s).float())).to(wdt)
        key = f"{rows}x{cols} r{rank} scale {scale} W {wdt} AB {fdt}"
        entry = {"bmm_is_upstreams": torch.equal(bmm, reference)}
        table = fused.AddressTable(ws, a_s, b_s)
        for variant in ("fma", "dot"):
            if variant == "dot" and rank < 16:
                continue
            fused._SUM = variant
            try:
                out = fused.merge_many(table, 0, n, (rows, cols), rank, wdt, device, scale)
                entry[variant] = {"bitwise": torch.equal(out, reference),
                                  "differing": int((out != reference).sum()),
                                  "max_abs": float((out.float() - reference.float()).abs().max())}
            except Exception as error:  # noqa: BLE001 - a probe: record what broke
                entry[variant] = {"error": repr(error)[:300]}
        fused._SUM = None
        report["bitwise"][key] = entry
        print(key, entry, flush=True)

    if device.type == "cuda":
        rows, cols, rank, count = 1536, 2048, 16, args.block
        ws = [(torch.randn(rows, cols, device=device) * 0.02).to(torch.bfloat16) for _ in range(count)]
        a_s = [(torch.randn(rank, cols, device=device) * 0.01).to(torch.bfloat16) for _ in range(count)]
        b_s = [(torch.randn(rows, rank, device=device) * 0.01).to(torch.bfloat16) for _ in range(count)]
        a32 = torch.cat(a_s).view(count, rank, cols).float()
        b32 = torch.cat(b_s).view(count, rows, rank).float()
        scratch = torch.empty(count, rows, cols, dtype=torch.float32, device=device)
        table = fused.AddressTable(ws, a_s, b_s)

        def stream_ops():
            stacked = torch.cat(ws).view(count, rows, cols)
            torch.bmm(b32, a32, out=scratch)
            scratch.mul_(2.0)
            stacked.add_(scratch)
            return stacked

        def summed_by(variant):  # "fma", "dot", or None: merge_many's own pick
            def launch():
                fused._SUM = variant
                try:
                    return fused.merge_many(table, 0, count, (rows, cols), rank, torch.bfloat16, device, 2.0)
                finally:
                    fused._SUM = None
            return launch

        fused_one, fused_auto, fused_tl_dot = summed_by("fma"), summed_by(None), summed_by("dot")

        def table_check():
            return table.current(ws, a_s, b_s)

        def factors_stacked():
            return torch.cat(a_s).view(count, rank, cols).float(), torch.cat(b_s).view(count, rows, rank).float()

        assert torch.equal(stream_ops(), fused_one())
        variants = {"stream_ops": stream_ops, "fused_auto": fused_auto, "fused_fma": fused_one, "fused_dot": fused_tl_dot,
                    "table_check": table_check, "factors_stacked": factors_stacked}
        for _ in range(3):
            for run in variants.values():
                run()
        returned, finished = interleaved(variants, args.rounds, torch.cuda.synchronize)
        import statistics
        for name in variants:
            report["timing"][name] = {"return_us": statistics.median(returned[name]) * 1e6,
                                      "finish_us": statistics.median(finished[name]) * 1e6}
            print(name, report["timing"][name], flush=True)
        moved = count * rows * cols * 2 * 2
        report["timing"]["fused_fma"]["GB_per_s"] = moved / (report["timing"]["fused_fma"]["finish_us"] * 1e-6) / 1e9
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

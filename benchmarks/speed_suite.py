"""Issue 14's speed figures in one command: training step, export as a host calls it, adapter sync.

Runs, each in its own process with a time limit (one failing part does not stop the others):

1. ``step``: ``step_bench.py``'s table (forward / full FT / attention LoRA / expert LoRA upstream and
   grouped), interleaved, with the upstream-vs-grouped check (one GPU);
2. ``step_on_policy`` (not in the default parts: it needs a device call of its own, about 5 minutes):
   the expert-LoRA step in true on-policy mode (the grouped path steps aside; about 16x a step, so two
   rounds) next to its own attention-only step;
3. ``step_deterministic``: ``step_bench.py --deterministic-check``, the whole-model comparison with
   torch's deterministic algorithms (bitwise where upstream's step then equals itself);
4. ``export``: ``export_host_bench.py``, ``export_hf_weights`` as users and hosts call it, upstream vs
   patched, interleaved, bitwise checked (one GPU);
5. ``sync``: ``sync_nccl.py`` twice, the Qwen3-30B-A3B-shaped adapter (48 layers, 128 experts, r=32,
   79 MB) between two processes of this host, over gloo and through shared memory.

Writes ``OUT/suite.json`` (device, date, versions, command, each part's status) and
``OUT/suite.md`` (the tables), next to each part's own JSON; ``OUT/suite.log`` holds their output.

    python benchmarks/speed_suite.py --out OUT [--parts step,step_deterministic,export,sync] [--quick]

On the one-H200 device machine (torch there, no vLLM / Transformer Engine; the wheels carried in ``.whl``,
which is not tracked: on 2026-12-03 a fresh checkout filled it with
``PYENV_VERSION=3.12.1 python3.12 -m pip download --no-deps -d .whl megatron-core==0.19.2
megatron-bridge==0.6.2 omegaconf==2.4.0 einops==0.8.2 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2``
(without omegaconf megatron-bridge does not import there)), the whole suite in one call (about 5 minutes
of work; each part has its own time limit):

    pip install -q --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=$PWD/src:/tmp/site NCCL_NVLS_ENABLE=0 python3 benchmarks/speed_suite.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "megatron-core", "megatron-bridge", "transformers", "moe-lora-plugins"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        out["cpu_count"] = os.cpu_count()
    except ImportError:
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out["nvidia_smi"] = None
    out["commit"] = os.environ.get("MOELORA_COMMIT")
    return out


def _run(name: str, argv: list[str], timeout_s: float, log: Any) -> dict[str, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    log.write(f"\n===== {name}: {' '.join(argv)}\n")
    log.flush()
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout_s:.0f} s"
    return {"status": status, "seconds": time.perf_counter() - start, "argv": argv}


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _step_table(step: dict[str, Any], on_policy: dict[str, Any] | None = None) -> list[str]:
    rows = [
        ("forward", "forward only, no LoRA", "-"),
        ("full", "full fine-tune (every parameter)", "base"),
        ("lora_attention", "LoRA on attention only, base frozen", "attention"),
        ("lora_experts_upstream", "LoRA on attention and every expert, upstream (per expert)", "experts"),
        ("lora_experts_grouped", "LoRA on attention and every expert, grouped (this suite)", "experts"),
        ("lora_experts_on_policy", "same, true on-policy mode (grouped path steps aside)", "experts"),
    ]
    out = ["| mode | median step s | min s | trainable |", "|---|---|---|---|"]
    for key, label, model in rows:
        source = on_policy if key == "lora_experts_on_policy" and key not in step["timings"] else step
        if not source or key not in source["timings"]:
            continue
        t = source["timings"][key]
        trainable = "-" if model == "-" else f"{source['trainable'][model] / 1e6:,.1f} M"
        note = " (own part, against its own attention-only step)" if source is not step else ""
        out.append(f"| {label}{note} | {t['median']:.3f} | {t['min']:.3f} | {trainable} |")
    r = dict(step["ratios"])
    if on_policy and "experts_on_policy_over_attention" in on_policy.get("ratios", {}):
        r.setdefault("experts_on_policy_over_attention", on_policy["ratios"]["experts_on_policy_over_attention"])
    out.append("")
    out.append(
        "Expert LoRA / attention-only LoRA: "
        + ", ".join(
            f"{label} {r[key]:.2f}x"
            for key, label in (
                ("experts_grouped_over_attention", "grouped"),
                ("experts_upstream_over_attention", "upstream"),
                ("experts_on_policy_over_attention", "on-policy"),
                ("experts_grouped_over_upstream", "grouped / upstream"),
            )
            if key in r
        )
        + "."
    )
    c, layer = step["check_whole_model"], step["check_layer0_fc1_lora"]
    again = c.get("upstream_again")
    if again:
        out.append("")
        out.append(
            f"Noise floor, upstream against itself (same tokens, same model): logits rel. L2 "
            f"{again['logits_rel_l2']:.2e}; expert LoRA grads rel. L2 max {again['expert_lora_grads']['rel_l2_max']:.2e} "
            f"/ median {again['expert_lora_grads']['rel_l2_median']:.2e}; attention LoRA grads max "
            f"{again['attention_lora_grads']['rel_l2_max']:.2e}."
        )
    out.append("")
    out.append(
        f"Check, grouped vs upstream on the same tokens: logits rel. L2 {c['logits_rel_l2']:.2e} (max abs "
        f"{c['logits_max_abs']:.3g} of {c['logits_max_abs_reference']:.3g}); expert LoRA grads rel. L2 max "
        f"{c['expert_lora_grads']['rel_l2_max']:.2e} / median {c['expert_lora_grads']['rel_l2_median']:.2e} "
        f"({c['expert_lora_grads']['count']} tensors); attention LoRA grads max {c['attention_lora_grads']['rel_l2_max']:.2e}. "
        f"Layer 0 fc1 LoRA vs float32 ({layer['tokens']} routed tokens, {layer['experts']} experts, backend "
        f"{layer['backend']}): per-expert bf16 {layer['per_expert_bf16_vs_fp32_rel_l2']:.2e}, grouped bf16 "
        f"{layer['grouped_bf16_vs_fp32_rel_l2']:.2e}, grouped vs per-expert {layer['grouped_vs_per_expert_rel_l2']:.2e}."
    )
    return out


def _deterministic_lines(det: dict[str, Any]) -> list[str]:
    same, grouped = det["upstream_equals_itself_bitwise"], det["grouped_equals_upstream_bitwise"]
    return [
        f"With torch's deterministic algorithms (own process, CUBLAS_WORKSPACE_CONFIG={det['cublas_workspace_config']}): "
        f"upstream equals itself bitwise: logits {same['logits']}, LoRA grads {same['lora_grads']}; grouped equals "
        f"upstream bitwise: logits {grouped['logits']}, LoRA grads {grouped['lora_grads']}; ops torch warned about: "
        f"{det['nondeterministic_ops_warned'] or 'none'}."
    ]


def _export_table(export: dict[str, Any]) -> list[str]:
    out = ["| call | upstream s (median) | GB/s | peak MiB | patched s (median) | GB/s | peak MiB | patched / upstream |",
           "|---|---|---|---|---|---|---|---|"]

    def peak(t: dict[str, Any]) -> str:
        return f"{t['peak_extra_bytes_max'] / 2**20:.0f}" if "peak_extra_bytes_max" in t else "-"

    for call in ("user_default", "host_plain", "host_merged"):
        u, p = export["timings"][f"upstream/{call}"], export["timings"][f"patched/{call}"]
        out.append(
            f"| {call} | {u['seconds_median']:.4f} | {u['gb_per_s_median']:.1f} | {peak(u)} | {p['seconds_median']:.4f} | "
            f"{p['gb_per_s_median']:.1f} | {peak(p)} | {p['seconds_median'] / u['seconds_median']:.2f} |"
        )
    out.append("")
    out.append(f"Bitwise equal to upstream: {export['bitwise_equal']}; merged / plain, patched: "
               f"{export['ratios']['patched_merged_over_patched_plain']:.2f}x, upstream: "
               f"{export['ratios']['upstream_merged_over_upstream_plain']:.2f}x.")
    return out


def _sync_table(syncs: dict[str, Any]) -> list[str]:
    out = ["| transport | median s | each s | bitwise | wire bytes |", "|---|---|---|---|---|"]
    for name, s in syncs.items():
        if s is None:
            out.append(f"| {name} | (no result) | | | |")
            continue
        each = ", ".join(f"{x:.3f}" for x in s["seconds_each"])
        out.append(f"| {name} | {s['median_s']:.4f} | {each} | {s['bitwise_equal']} | {s['wire_bytes']:,} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--parts", default="step,step_deterministic,export,sync",
        help="comma-separated; step_on_policy (about 5 minutes alone) is not in the default",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (for a tight device budget)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    suite: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": _versions(),
        "parts": {},
    }
    rounds = ["--rounds", "4", "--warmup", "1"] if args.quick else ["--rounds", "5", "--warmup", "2"]
    with open(out / "suite.log", "w") as log:
        if "step" in parts:  # the on-policy mode (16x a step) runs as its own part, with fewer rounds
            modes = "forward,full,lora_attention,lora_experts_upstream,lora_experts_grouped"
            suite["parts"]["step"] = _run("step", ["benchmarks/step_bench.py", "--out", str(out / "step.json"),
                                                   "--modes", modes, *rounds], 200, log)
        if "step_on_policy" in parts:
            suite["parts"]["step_on_policy"] = _run(
                "step_on_policy", ["benchmarks/step_bench.py", "--out", str(out / "step_on_policy.json"), "--modes",
                                   "lora_attention,lora_experts_on_policy", "--rounds", "2", "--warmup", "1"], 300, log)
        if "step_deterministic" in parts:
            suite["parts"]["step_deterministic"] = _run(
                "step_deterministic", ["benchmarks/step_bench.py", "--deterministic-check", "--out",
                                       str(out / "step_deterministic.json")], 100, log)
        if "export" in parts:
            suite["parts"]["export"] = _run("export", ["benchmarks/export_host_bench.py", "--out",
                                                       str(out / "export_host.json"), "--rounds", "5"], 140, log)
        if "sync" in parts:
            for transport in ("group", "shm"):
                suite["parts"][f"sync_{transport}"] = _run(
                    f"sync_{transport}",
                    ["benchmarks/sync_nccl.py", "--backend", "gloo", "--transport", transport, "--layers", "48",
                     "--experts", "128", "--rank", "32", "--iters", "9", "--out", str(out / f"sync_{transport}.json")],
                    90, log)
    (out / "suite.json").write_text(json.dumps(suite, indent=1))
    lines = [f"Date: {suite['date']}. Command: `{suite['command']}`.", "", f"Versions: {json.dumps(suite['versions'])}", ""]
    step, export = _load(out / "step.json"), _load(out / "export_host.json")
    if step:
        lines += ["## Training step", "", *_step_table(step, _load(out / "step_on_policy.json")), ""]
    det = _load(out / "step_deterministic.json")
    if det:
        lines += [*_deterministic_lines(det), ""]
    if export:
        lines += ["## Export as a host calls it (world size 1)", "", *_export_table(export), ""]
    if "sync" in parts:
        lines += ["## Adapter sync, two processes of one host", "",
                  *_sync_table({t: _load(out / f"sync_{t}.json") for t in ("group", "shm")}), ""]
    lines += ["Parts: " + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f} s)" for k, v in suite["parts"].items())]
    (out / "suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

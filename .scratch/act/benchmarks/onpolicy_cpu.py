"""What true-on-policy mode costs on the CPU: the demo's step times with the mode on and off, same run otherwise.

    python benchmarks/onpolicy_cpu.py --steps 4 --out onpolicy_cpu.json

Runs ``moe-lora-plugins demo --json`` twice per round (mode on, then off; ``--rounds`` interleaves them) in
world size 1 and EP=2 x PP=2, and reports the median rollout (vLLM engine) and train (Megatron forward +
backward + Adam) seconds per step, and their ratio on / off. The mode-on runs must show a diff of 0.0,
the mode-off runs a non-zero one; the script refuses to report otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_demo(layout: list[str], steps: int, on: bool) -> dict:
    flags = ["--steps", str(steps), *layout, "--json", "--true-on-policy" if on else "--no-true-on-policy"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    env.pop("MOELORA_ONPOLICY_GATE", None)
    with tempfile.TemporaryDirectory(prefix="onpolicy-bench-") as workdir:
        proc = subprocess.run([sys.executable, "-m", "moe_lora_plugins.cli", "demo", *flags, "--workdir", workdir],
                              capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) != 1:
        raise SystemExit(f"demo {' '.join(flags)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(lines[0])
    diffs = [s["train_rollout_logprob_max_abs_diff"] for s in summary["steps"]]
    if on and any(d != 0.0 for d in diffs):
        raise SystemExit(f"mode on but the diff is {diffs}: not reporting a cost for a run that is not on-policy")
    if not on and not any(d > 0.0 for d in diffs):
        raise SystemExit("mode off and every diff is 0.0: the comparison would be meaningless")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    layouts = {"world size 1": ["--ep", "1", "--pp", "1"], "EP=2 x PP=2": ["--ep", "2", "--pp", "2"]}
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "command": " ".join(sys.argv), "layouts": {}}
    for name, layout in layouts.items():
        times: dict = {"on": {"rollout": [], "train": []}, "off": {"rollout": [], "train": []}}
        for _ in range(args.rounds):
            for mode in ("on", "off"):
                summary = run_demo(layout, args.steps, mode == "on")
                for step in summary["steps"][1:]:  # step 1 includes first-call warm-up on both sides
                    times[mode]["rollout"].append(step["rollout_seconds"])
                    times[mode]["train"].append(step["train_seconds"])
        row = {mode: {k: statistics.median(v) for k, v in parts.items()} for mode, parts in times.items()}
        row["ratio"] = {k: row["on"][k] / row["off"][k] for k in ("rollout", "train")}
        results["layouts"][name] = row
        print(f"{name}: rollout {row['on']['rollout']:.2f} s on / {row['off']['rollout']:.2f} s off "
              f"(x{row['ratio']['rollout']:.2f}); train {row['on']['train']:.2f} s on / {row['off']['train']:.2f} s "
              f"off (x{row['ratio']['train']:.2f})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Where a patched merged export's time goes beyond the plain export's (world size 1, the anchor model of
``export_bench.py``, or ``--tiny`` on the CPU): medians of ``--rounds`` interleaved rounds of

- ``plain`` / ``merged``: ``export_hf_weights(model, cpu=False, show_progress=False, merge_adapter_weights=...)``
  iterated to the end, synchronised before and after (as ``export_host_bench.py``);
- ``merged_bmm_blocks``: the merged export with the groups the fused kernel merges (``merge/fused.py``; where
  Triton runs on the device and its blocks are upstream's) merged as before it, a ``cat``, a ``bmm`` into float32
  and an add per block, in that path's block sizes (session 8's code);
- ``merged_no_compute``: the merged export with every block's merge replaced by a stack of the block's
  parameters prepared beforehand (the stream's Python and upstream's loop without the merge arithmetic);
- ``merged_no_proxy``: the merged export with the planned adapters left out of upstream's merge but the
  tasks handed on unmerged (wrong values: the cost of the merged stream's set-up alone);
- ``stream_tasks_only``: the merged stream's task list iterated alone, each run of planned tasks walked to its
  last HF tensor (their mappings called on their merged weights), merges replaced as above;
- ``blocks_only``: every block of every group merged once, nothing else (the merge arithmetic, synchronised);
- ``plan``: ``merged_stream.plan_tasks`` alone (the per-call check of the cached plan);
- ``merged_until_return`` / ``blocks_only_until_return``: those two timed to the call's return, before the
  final synchronisation (the host's share).

    python benchmarks/merged_stream_breakdown.py --out f.json [--rounds 7] [--tiny] [--budgets-mib 128,256,512]
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

from export_bench import anchor_config  # noqa: E402
from merged_stream_ops import interleaved  # noqa: E402

from moe_lora_plugins.testing.tiny_models import LoraSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--budgets-mib", default="",
                        help="comma-separated merged_stream.BLOCK_BUDGET_BYTES (and FUSED_BLOCK_BUDGET_BYTES) values "
                             "(MiB) to time plain vs merged "
                             "under, interleaved, with the merged export's peak of allocated memory")
    args = parser.parse_args()
    import torch

    import moe_lora_plugins
    from moe_lora_plugins.patches.megatron_bridge import merged_stream
    from moe_lora_plugins.testing.distributed import init_single_process_group
    from moe_lora_plugins.testing.tiny_models import (
        build_lora_model,
        fill_from_global_names,
        tiny_qwen3_moe_config,
    )

    cuda = init_single_process_group()
    device = "cuda" if cuda else "cpu"
    config = tiny_qwen3_moe_config(torch_dtype="bfloat16", num_hidden_layers=8, num_experts=64) if args.tiny \
        else anchor_config()
    built = build_lora_model(config, lora=LoraSettings(dim=16, alpha=32), dtype=torch.bfloat16, device=device)
    fill_from_global_names(built, generate_on=device)
    moe_lora_plugins.activate(role="trainer")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def export(merged: bool) -> None:
        for item in built.bridge.export_hf_weights(built.model, cpu=False, show_progress=False,
                                                   merge_adapter_weights=merged):
            item[1].numel()

    def timed(run: Any) -> float:
        run()
        times = []
        for _ in range(args.rounds):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu"}
    export(True)
    export(False)
    [plan] = merged_stream._plans.values()
    groups = list({id(g): g for g, _ in plan.entries.values()}.values())
    result["groups"] = {g.key[1]: {"members": len(g.params), "blocks": len(g.blocks), "rows": g.rows} for g in groups}
    result["fused_groups"] = sum(g.fused for g in groups)
    prepared = {(id(g), start): g.merged_block(start, stop, None if g.fused else g.factors())
                for g in groups for start, stop in g.blocks}
    real_block, real_iter = merged_stream._Group.merged_block, merged_stream._MergedTasks.__iter__
    bridge = built.bridge._model_bridge
    tasks = merged_stream.plan_tasks(bridge, built.model, built.bridge.hf_pretrained, None)[0]

    def drain(handed: Any) -> None:
        for task in handed:
            if isinstance(task.mapping, merged_stream._RunMapping):
                for _ in task.mapping.megatron_to_hf(None, None).items():
                    pass

    def blocks_only() -> None:
        for g in groups:
            factors = None if g.fused else g.factors()
            for start, stop in g.blocks:
                real_block(g, start, stop, factors)

    def no_compute(run: Any) -> Any:
        def wrapped() -> None:
            merged_stream._Group.merged_block = lambda self, start, stop, factors, scratch=None: prepared[(id(self), start)]
            try:
                run()
            finally:
                merged_stream._Group.merged_block = real_block
        return wrapped

    def no_proxy() -> None:  # the planned adapters left out, the tasks handed on as they are (wrong values)
        merged_stream._MergedTasks.__iter__ = lambda self: iter(self._tasks)
        try:
            export(True)
        finally:
            merged_stream._MergedTasks.__iter__ = real_iter

    device = groups[0].params[0].device

    def with_bmm_blocks() -> None:
        """The blocks merged as before the fused kernel (session 8: ``cat``, ``bmm`` into float32, add), in their
        own block sizes."""
        fused = [g for g in groups if g.fused]
        for g in fused:
            g.fused = False
            g.use_rows(g.rows, merged_stream._budget(device))
        try:
            export(True)
        finally:
            for g in fused:
                g.fused = True
                g.use_rows(g.rows, merged_stream._budget(device, fused=True))

    variants = {
        "plain": lambda: export(False),
        "merged": lambda: export(True),
        "merged_bmm_blocks": with_bmm_blocks,
        "merged_no_compute": no_compute(lambda: export(True)),
        "merged_no_proxy": no_proxy,
        "stream_tasks_only": no_compute(lambda: drain(tasks)),
        "blocks_only": blocks_only,
        "plan": lambda: merged_stream.plan_tasks(bridge, built.model, built.bridge.hf_pretrained, None),
    }
    returned_s, samples = interleaved(variants, args.rounds, sync)
    # also timed to the call's return, before the final synchronisation
    samples.update({f"{name}_until_return": returned_s[name] for name in ("merged", "blocks_only")})
    result.update({name: statistics.median(times) for name, times in samples.items()})
    budgets: dict[str, Any] = {}
    saved_budget = merged_stream.BLOCK_BUDGET_BYTES, merged_stream.FUSED_BLOCK_BUDGET_BYTES
    for mib in [int(m) for m in args.budgets_mib.split(",") if m]:
        merged_stream.BLOCK_BUDGET_BYTES = merged_stream.FUSED_BLOCK_BUDGET_BYTES = mib << 20
        merged_stream._plans.clear()
        export(True)  # plan made, new block shapes checked
        times: dict[str, list[float]] = {"plain": [], "merged": []}
        peak = 0
        for _ in range(args.rounds):
            for name, merged in (("plain", False), ("merged", True)):
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                start = time.perf_counter()
                export(merged)
                sync()
                times[name].append(time.perf_counter() - start)
                if cuda and merged:
                    peak = max(peak, torch.cuda.max_memory_allocated() - base)
        plain, merged_s = statistics.median(times["plain"]), statistics.median(times["merged"])
        budgets[str(mib)] = {"plain": plain, "merged": merged_s, "ratio": merged_s / plain,
                             "merged_peak_mib": peak / 2**20}
    merged_stream.BLOCK_BUDGET_BYTES, merged_stream.FUSED_BLOCK_BUDGET_BYTES = saved_budget
    result["budgets"] = budgets
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Host cost of the per-member tensor ops of the per-layer merged stream, at the anchor model's expert
shapes (64 experts x 8 layers = 512 members per group; fc1 1536 x 2048, LoRA r=16, bf16): how long one
call takes to return (the host's share; the stream is host-bound) and to finish (synchronised), medians
of ``--rounds``.

- ``stack`` / ``cat_view``: a block's 2-D parameters stacked 3-D by ``torch.stack`` (a view of each input
  first) or by one ``torch.cat`` viewed 3-D (``merged_stream._stacked``);
- ``foreach_copy``: into a fresh block through its ``unbind`` views by ``torch._foreach_copy_``;
- ``factors_*``: a group's LoRA A (B) stacked and cast to float32, by either;
- ``unbind``: a block's per-member views;
- ``baddbmm_alpha`` / ``bmm``: one block's float32 ``scale * (B @ A)`` (beta 0, alpha 2) or ``B @ A``;
  ``add_rounded``: its add into the bf16 block; ``empty_deltas``: the float32 delta buffer;
- ``proxies_all_members``: the Python per member (version check, task copy) for ``--members`` members.

    python benchmarks/merged_stream_ops.py --out f.json [--rounds 21] [--members 512] [--block 21]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, sync: Callable[[], None]
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every variant run once per round, in turn (so drift favours none), synchronised before; per variant the
    seconds until its call returned (the host's share) and until it finished (synchronised after)."""
    returned_s: dict[str, list[float]] = {name: [] for name in variants}
    finished_s: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            sync()
            start = time.perf_counter()
            run()
            returned = time.perf_counter()
            sync()
            returned_s[name].append(returned - start)
            finished_s[name].append(time.perf_counter() - start)
    return returned_s, finished_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--members", type=int, default=512)
    parser.add_argument("--block", type=int, default=21, help="members per block of stacked parameters")
    parser.add_argument("--out-rows", type=int, default=1536)
    parser.add_argument("--in-cols", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    import torch

    from moe_lora_plugins.patches.megatron_bridge.merged_stream import _stacked

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    n, out_rows, in_cols, rank = args.members, args.out_rows, args.in_cols, args.rank
    params = [torch.randn(out_rows, in_cols, dtype=dtype, device=device) for _ in range(args.block)]
    lora_a = [torch.randn(rank, in_cols, dtype=dtype, device=device) for _ in range(n)]
    lora_b = [torch.randn(out_rows, rank, dtype=dtype, device=device) for _ in range(n)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def foreach_copy(tensors: list[Any]) -> Any:
        first = tensors[0]
        block = torch.empty((len(tensors), *first.shape), dtype=first.dtype, device=first.device)
        torch._foreach_copy_(block.unbind(0), tensors)
        return block

    block = torch.stack(params)
    a32, b32 = torch.stack(lora_a[: args.block]).float(), torch.stack(lora_b[: args.block]).float()
    deltas = torch.empty((args.block, out_rows, in_cols), dtype=torch.float32, device=device)
    class Task:  # a conversion task's attributes (upstream's WeightConversionTask has these ten)
        def __init__(self, index: int) -> None:
            for name in ("param_name", "global_param_name", "mapping", "pp_rank", "vp_stage", "megatron_module",
                         "param_weight", "weight_dtype", "export_hook", "hf_param"):
                setattr(self, name, index)

    tasks = [Task(i) for i in range(n)]
    views = block.unbind(0)

    def proxies() -> None:  # what the stream does per member besides tensor ops
        new_task = object.__new__
        for i, task in enumerate(tasks):
            if (block._version, block._version, block._version) == (i, i, i):
                pass
            proxy = new_task(type(task))
            proxy.__dict__.update(task.__dict__)
            proxy.__dict__["param_weight"] = views[i % len(views)]

    variants = {
        "stack": lambda: torch.stack(params),
        "cat_view": lambda: _stacked(params),
        "foreach_copy": lambda: foreach_copy(params),
        "factors_stack": lambda: (torch.stack(lora_a).float(), torch.stack(lora_b).float()),
        "factors_cat_view": lambda: (_stacked(lora_a).float(), _stacked(lora_b).float()),
        "unbind": lambda: block.unbind(0),
        "proxies_all_members": proxies,
        "baddbmm_alpha": lambda: torch.baddbmm(deltas, b32, a32, beta=0, alpha=2.0, out=deltas),
        "bmm": lambda: torch.bmm(b32, a32, out=deltas),
        "add_rounded": lambda: block.add_(deltas),
        "empty_deltas": lambda: torch.empty((args.block, out_rows, in_cols), dtype=torch.float32, device=device),
    }
    assert torch.equal(torch.stack(params), _stacked(params)) and torch.equal(torch.stack(params), foreach_copy(params))
    with torch.no_grad():
        for run in variants.values():
            run()
        host, synced = interleaved(variants, args.rounds, sync)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "members": n, "block": args.block, "shape": [out_rows, in_cols], "rank": rank,
        "host_us": {name: statistics.median(v) * 1e6 for name, v in host.items()},
        "synced_us": {name: statistics.median(v) * 1e6 for name, v in synced.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

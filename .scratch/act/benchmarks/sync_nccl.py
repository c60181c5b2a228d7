"""Adapter sync over a real process group: correctness and throughput, gloo (CPU) or NCCL (2 GPUs).

One receiver (the engine side, group rank 0) and one or more senders (pipeline stages) exchange a
Qwen3-30B-A3B-shaped LoRA adapter (attention q/k/v/o per layer, one expert adapter shared by every
expert, bf16) through ``moe_lora_plugins.sync``: compact wire form, buckets by bytes, end markers,
acknowledgements. The receiver checks every expanded tensor bitwise against the sender's.

    PYTHONPATH=src python benchmarks/sync_nccl.py --backend nccl --layers 48 --experts 128 --rank 32
    PYTHONPATH=src python benchmarks/sync_nccl.py --backend gloo --layers 4 --experts 8 --rank 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.multiprocessing as mp

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MOE_FFN = 2048, 32, 4, 128, 768


def make_adapter(layers: int, experts: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    out: dict[str, torch.Tensor] = {}
    outs = {"q_proj": HEADS * HEAD_DIM, "k_proj": KV_HEADS * HEAD_DIM, "v_proj": KV_HEADS * HEAD_DIM}
    for layer in range(layers):
        head = f"base_model.model.model.layers.{layer}"
        for proj, n_out in outs.items():
            out[f"{head}.self_attn.{proj}.lora_A.weight"] = rnd(rank, HIDDEN)
            out[f"{head}.self_attn.{proj}.lora_B.weight"] = rnd(n_out, rank)
        out[f"{head}.self_attn.o_proj.lora_A.weight"] = rnd(rank, HEADS * HEAD_DIM)
        out[f"{head}.self_attn.o_proj.lora_B.weight"] = rnd(HIDDEN, rank)
        shared = {
            "gate_proj": (rnd(rank, HIDDEN), rnd(MOE_FFN, rank)),
            "up_proj": (rnd(rank, HIDDEN), rnd(MOE_FFN, rank)),
            "down_proj": (rnd(rank, MOE_FFN), rnd(HIDDEN, rank)),
        }
        for expert in range(experts):
            for proj, (a, b) in shared.items():
                out[f"{head}.mlp.experts.{expert}.{proj}.lora_A.weight"] = a
                out[f"{head}.mlp.experts.{expert}.{proj}.lora_B.weight"] = b
    return out


def _distinct_bytes(tensors: dict[str, torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors.values():
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _on_device(adapter: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """The adapter moved to ``device`` keeping its sharing (one copy per distinct tensor)."""
    moved: dict[int, torch.Tensor] = {}
    return {name: moved.setdefault(id(t), t.to(device)) for name, t in adapter.items()}


def _sender_cpu(result_path: str, world: int) -> list[list[float]]:
    out = []
    for rank in range(1, world):
        path = f"{result_path}.rank{rank}.cpu.json"
        with open(path) as fh:
            out.append(json.load(fh))
        os.remove(path)
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, result_path: str) -> None:
    if args.profile:
        import cProfile
        import pstats

        profile = f"{result_path}.rank{rank}.prof"
        cProfile.runctx("_sync(rank, world, port, args, result_path)", globals(), locals(), profile)
        with open(f"{profile}.txt", "w") as fh:
            for order in ("tottime", "cumulative"):
                pstats.Stats(profile, stream=fh).sort_stats(order).print_stats(30)
    else:
        _sync(rank, world, port, args, result_path)


def _sync(rank: int, world: int, port: int, args: argparse.Namespace, result_path: str) -> None:
    from moe_lora_plugins.sync.sender import send_lora_adapter
    from moe_lora_plugins.sync.transport import new_sync_group, receive_adapter

    device = "cpu"
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    group = new_sync_group("127.0.0.1", port, rank, world, args.backend, timeout_s=300)
    senders = list(range(1, world))
    stages = world - 1
    adapter = make_adapter(args.layers, args.experts, args.rank)
    if rank > 0 and args.pieces_on == "device":
        adapter = _on_device(adapter, device)
    config = {"r": args.rank, "lora_alpha": 2 * args.rank,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    timings, cpu_times = [], []
    shm = args.transport == "shm"
    for step in range(args.iters):
        if args.backend == "nccl":
            torch.cuda.synchronize()
        group.barrier().wait()  # both sides start together: the receiver's time is the whole sync
        start, cpu_start = time.perf_counter(), time.process_time()
        if rank == 0:
            received = receive_adapter(group, senders, version=step, device=device)
            received_tensors = len(received.tensors)
        else:
            stage = rank - 1
            layers = {layer for layer in range(args.layers) if layer % stages == stage}
            send_lora_adapter(adapter, group, [0], sender=stage, version=step, layers=layers, config=config,
                              bucket_bytes=args.bucket_mib << 20, device=device, shared_memory=shm or None)
        if args.backend == "nccl":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if rank > 0:  # the sender's CPU time per sync, for the receiver's report
        with open(f"{result_path}.rank{rank}.cpu.json", "w") as fh:
            json.dump(cpu_times, fh)
    group.barrier().wait()
    if rank == 0:
        verdicts: dict[tuple[int, int], bool] = {}  # a (received, sent) object pair is compared once

        def same(name: str, t: torch.Tensor) -> bool:
            got = received.tensors.get(name)
            if got is None:
                return True  # reported as missing
            key = (id(got), id(t))
            if key not in verdicts:
                verdicts[key] = got.dtype == t.dtype and torch.equal(got, t)
            return verdicts[key]

        mismatched = [name for name, t in adapter.items() if not same(name, t)]
        missing = sorted(set(adapter) - set(received.tensors))
        report = {
            "backend": args.backend,
            "transport": args.transport,
            "received_tensors": received_tensors,
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "pieces_on": args.pieces_on,
            "bucket_mib": args.bucket_mib,
            "device": torch.cuda.get_device_name(0) if args.backend == "nccl" else "cpu",
            "senders": stages,
            "tensors": len(adapter),
            "true_adapter_bytes": _distinct_bytes(adapter),
            "expanded_bytes": sum(t.numel() * t.element_size() for t in adapter.values()),
            "wire_bytes": received.wire_bytes,
            "buckets": received.buckets,
            "bitwise_equal": not mismatched and not missing,
            "mismatched": mismatched[:5],
            "missing": missing[:5],
            "seconds_each": timings,
            # CPU seconds each process spent per sync (its threads included): the work, apart from waiting
            # and from other load on the host
            "receiver_cpu_seconds_each": cpu_times,
            "sender_cpu_seconds_each": _sender_cpu(result_path, world),
            "median_s": sorted(timings)[len(timings) // 2],
        }
        report["wire_GBps"] = report["wire_bytes"] / report["median_s"] / 1e9
        with open(result_path, "w") as fh:
            json.dump(report, fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--bucket-mib", type=int, default=64)
    parser.add_argument("--pieces-on", choices=["cpu", "device"], default="cpu",
                        help="where the sender's adapter tensors live: the CPU, or the transport's device")
    parser.add_argument("--transport", choices=["group", "shm"], default="group",
                        help="payload bytes over the process group, or through shared memory (one host)")
    parser.add_argument("--out", default="sync_report.json")
    parser.add_argument("--profile", action="store_true", help="cProfile each rank into OUT.rankN.prof (+ .txt summary)")
    args = parser.parse_args()
    world = 1 + args.senders
    if args.backend == "nccl" and torch.cuda.device_count() < world:
        raise SystemExit(f"--backend nccl with {args.senders} sender(s) needs {world} GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, args, os.path.abspath(args.out)), nprocs=world, start_method="spawn")
    with open(args.out) as fh:
        report = json.load(fh)
    print(json.dumps(report, indent=1))
    if not report["bitwise_equal"]:
        raise SystemExit("received adapter differs from the sent one")


if __name__ == "__main__":
    main()

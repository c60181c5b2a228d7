"""Run one function in N real processes joined by a ``torch.distributed`` group (gloo or NCCL).

Tests and benchmarks use it to run the same code under several parallel layouts:
``run_distributed(fn, world_size=4, args=(...))`` spawns fresh interpreters (``spawn`` start method),
initialises the process group in each, calls ``fn(*args)`` and returns every rank's result in rank
order. Results travel back through ``torch.save`` files, so tensors are fine. If any rank raises,
:class:`DistributedRunError` carries each failing rank's traceback; a rank that hangs is killed after
``timeout_s``. :func:`init_single_process_group` makes the calling process a world of one instead.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moe_lora_plugins.errors import MoeLoraError


class DistributedRunError(MoeLoraError, RuntimeError):
    """At least one rank of a :func:`run_distributed` call raised, died or timed out."""

    def __init__(self, message: str, failures: Mapping[int, str]) -> None:
        super().__init__(message)
        self.failures = dict(failures)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process_group() -> bool:
    """Make this process a world of one (rank 0 on 127.0.0.1), unless a group is already initialised: NCCL on
    GPU 0 when CUDA is available, gloo otherwise. For benchmarks that build a model in-process. Returns
    whether CUDA is in use."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(0)
    return cuda


def _rank_main(
    fn: Callable[..., Any],
    args: Sequence[Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    env: Mapping[str, str],
    out_dir: str,
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    result_path = Path(out_dir) / f"rank{rank}.pt"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(*args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
    finally:
        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:
                pass
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
) -> list[Any]:
    """Call ``fn(*args)`` on ranks ``0..world_size-1`` in fresh processes; return results by rank.

    ``fn`` must be importable by name (a module-level function) and its arguments and result
    picklable. ``backend`` is ``"gloo"`` (CPU) or ``"nccl"`` (rank r uses ``cuda:r``). ``env`` is set
    in each rank before the process group starts (e.g. ``{"MOELORA_PLUGINS": "on"}``).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="moelora-dist-") as out_dir:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, tuple(args), rank, world_size, port, backend, dict(env or {}), out_dir),
                name=f"moelora-rank{rank}",
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        failures: dict[int, str] = {}
        for rank, proc in enumerate(procs):
            proc.join(timeout_s)
            if proc.is_alive():
                failures[rank] = f"rank {rank} did not finish within {timeout_s:.0f} s (killed)"
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        return _collect(Path(out_dir), world_size, procs, failures)


def _collect(out_dir: Path, world_size: int, procs: list[Any], failures: dict[int, str]) -> list[Any]:
    import torch

    results: list[Any] = []
    for rank in range(world_size):
        path = out_dir / f"rank{rank}.pt"
        if rank in failures:
            results.append(None)
            continue
        if not path.exists():
            failures[rank] = f"rank {rank} exited with code {procs[rank].exitcode} and wrote no result"
            results.append(None)
            continue
        payload = torch.load(path, weights_only=False)
        if payload["ok"]:
            results.append(payload["result"])
        else:
            failures[rank] = payload["error"]
            results.append(None)
    if failures:
        first = min(failures)
        raise DistributedRunError(
            f"{len(failures)} of {world_size} ranks failed (ranks {sorted(failures)}); rank {first}:\n"
            f"{failures[first]}",
            failures,
        )
    return results

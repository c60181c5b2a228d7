"""Shared fixtures of the vLLM lane: tiny checkpoints, in-process engines and a real trainer-sender helper.

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on vLLM's CPU backend, one per test
module. Trainer senders are separate Python processes that join a gloo group with the engine's
worker and send an adapter through ``moe_lora_plugins.sync``.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from . import tiny_models

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
SENDER = os.path.join(os.path.dirname(__file__), "sync_sender.py")
EXTENSION = "moe_lora_plugins.integrations.vllm_worker.MoeLoraWorkerExtension"
PROMPTS = [[1, 5, 9, 33, 7, 100, 20], [1, 200, 3, 4, 5]]
MAX_LORA_RANK = 8


@pytest.fixture(scope="session")
def dense_model(tmp_path_factory: pytest.TempPathFactory) -> tiny_models.TinyModel:
    return tiny_models.build_tiny_model(str(tmp_path_factory.mktemp("dense-qwen3")), moe=False)


@pytest.fixture(scope="session")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> tiny_models.TinyModel:
    return tiny_models.build_tiny_model(str(tmp_path_factory.mktemp("qwen3-moe")), moe=True)


def start_engine(model: tiny_models.TinyModel, max_loras: int = 3, **options: Any) -> Any:
    from vllm import LLM

    settings: dict[str, Any] = dict(
        model=model.path, enable_lora=True, max_lora_rank=MAX_LORA_RANK, max_loras=max_loras,
        max_cpu_loras=max_loras + 2, dtype="float32", max_model_len=128, enforce_eager=True, max_num_seqs=4,
        kv_cache_memory_bytes=64 << 20, worker_extension_cls=EXTENSION,
    )
    return LLM(**{**settings, **options})


def stop_engine(llm: Any) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@dataclass(frozen=True)
class Generation:
    tokens: list[list[int]]
    logprobs: list[list[float]]


def greedy(llm: Any, lora_request: Any = None, prompts: list[list[int]] = PROMPTS, max_tokens: int = 6) -> Generation:
    """Greedy continuations of ``prompts`` with the chosen token's logprob at every step."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, logprobs=0, temperature=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=lora_request,
                           use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)] for o in outputs]
    return Generation(tokens, logprobs)


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SyncOutcome:
    report: dict[str, Any] | None
    error: BaseException | None
    sender_outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def wire_bytes(self) -> int:
        return sum(out["payload_bytes"] for out in self.sender_outputs)


def sync_adapter(
    llm: Any, tmp_path: Any, name: str, lora_int_id: int, tensors: dict[str, Any], config: dict[str, Any], *,
    stages: list[list[int]] = ([0], [1]), version: int = 1, bucket_bytes: int = 8192, fault: str | None = None,
    sender_options: dict[str, Any] | None = None, receive: Any = None, sender_env: dict[str, str] | None = None,
    sender_path: str | None = None,
) -> SyncOutcome:
    """Send ``tensors`` from one real process per pipeline stage to the engine's worker over gloo.

    ``receive(name, lora_int_id, senders, version)`` runs the engine side (default: the bare
    ``moelora_receive_adapter`` RPC, first worker's report). ``sender_env`` / ``sender_path`` add
    environment variables / a ``sys.path`` entry (a plugin's site) to the sender processes."""
    from safetensors.torch import save_file

    adapter_file = os.path.join(str(tmp_path), f"{name}-v{version}.safetensors")
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, adapter_file)
    port = free_port()
    world = len(stages) + 1
    processes = []
    for sender, layers in enumerate(stages):
        job = dict(host="127.0.0.1", port=port, rank=sender + 1, world_size=world, sender=sender, receivers=[0],
                   adapter=adapter_file, layers=list(layers), bucket_bytes=bucket_bytes, version=version,
                   config=config, fault=fault if sender == 0 else None, timeout_s=30, **(sender_options or {}))
        job_file = os.path.join(str(tmp_path), f"job-{name}-v{version}-{sender}.json")
        with open(job_file, "w") as f:
            json.dump(job, f)
        processes.append(subprocess.Popen([sys.executable, SENDER, job_file], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env={**os.environ, **(sender_env or {}),
                                                                     "PYTHONPATH": os.pathsep.join(filter(None, [SRC, sender_path]))}))
    report, error = None, None
    try:
        llm.collective_rpc("moelora_init_sync_group", args=("127.0.0.1", port, 0, world, "gloo", 30))
        if receive is None:
            report = llm.collective_rpc("moelora_receive_adapter", args=(name, lora_int_id, list(range(1, world)),
                                                                         version))[0]
        else:
            report = receive(name, lora_int_id, list(range(1, world)), version)
    except Exception as exc:  # the test inspects it
        error = exc
    finally:
        llm.collective_rpc("moelora_close_sync_group")
    outputs = []
    for process in processes:
        try:
            stdout, _ = process.communicate(timeout=60 if error is None else 5)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, _ = process.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if lines:
            outputs.append(json.loads(lines[-1]))
    return SyncOutcome(report, error, outputs)


@pytest.fixture(scope="module")
def dense_engine(dense_model: tiny_models.TinyModel) -> Iterator[Any]:
    llm = start_engine(dense_model)
    yield llm
    stop_engine(llm)


@pytest.fixture(scope="module")
def moe_engine(moe_model: tiny_models.TinyModel) -> Iterator[Any]:
    llm = start_engine(moe_model)
    yield llm
    stop_engine(llm)

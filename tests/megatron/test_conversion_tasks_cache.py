"""Reused conversion tasks (plain and adapter merge tasks): repeated exports equal those of rebuilt tasks, and a
changed model is rebuilt.

The reference is the suite with only this patch reverted (upstream's own EP merged export is wrong,
which the other patches fix)."""

from __future__ import annotations

from typing import Any

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import ParallelLayout, tiny_qwen3_moe_config


def exports_and_task_reuse(hf_config: Any, layout: ParallelLayout, dtype_name: str = "float32") -> dict[str, Any]:
    import torch

    import moe_lora_plugins
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names, run_export

    built = build_lora_model(hf_config, layout, dtype=getattr(torch, dtype_name))
    fill_from_global_names(built)
    from megatron.bridge.models.conversion.utils import unwrap_model

    bridge = built.bridge._model_bridge
    models = unwrap_model(built.model)

    def same(a: list, b: list) -> bool:
        return [n for n, _ in a] == [n for n, _ in b] and all(
            torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True)
        )

    def step_values() -> None:  # what an optimizer step does: new values in the same tensors
        with torch.no_grad():
            for p in built.model[0].parameters():
                p.add_(0.01)

    from moe_lora_plugins.activation import get_registry

    cache_ids = ("megatron_bridge.conversion_tasks_cache", "megatron_bridge.adapter_conversion_tasks_cache")
    out: dict[str, Any] = {}
    moe_lora_plugins.activate(role="trainer")
    registry = get_registry()

    def revert() -> None:
        for cache_id in cache_ids:
            registry.revert(cache_id)

    def apply() -> None:
        for cache_id in cache_ids:
            registry.apply(cache_id)

    revert()
    upstream = {kind: run_export(built, kind) for kind in ("plain", "merged")}
    apply()
    first = bridge.build_conversion_tasks(built.bridge.hf_pretrained, models)
    second = bridge.build_conversion_tasks(built.bridge.hf_pretrained, models)
    out["reused"] = len(first) == len(second) and all(a is b for a, b in zip(first, second, strict=True))
    out["copy_returned"] = first is not second
    adapter_first = bridge.build_adapter_conversion_tasks(models)
    adapter_second = bridge.build_adapter_conversion_tasks(models)
    out["adapter_tasks"] = sum(len(v) for v in adapter_first.values())
    out["adapter_reused"] = list(adapter_first) == list(adapter_second) and all(
        a is b for k in adapter_first for a, b in zip(adapter_first[k], adapter_second[k], strict=True)
    )
    out["adapter_copy_returned"] = adapter_first is not adapter_second and all(
        adapter_first[k] is not adapter_second[k] for k in adapter_first
    )
    for kind in ("plain", "merged"):
        out[f"{kind}_equal_twice"] = same(run_export(built, kind), upstream[kind]) and same(
            run_export(built, kind), upstream[kind]
        )
    step_values()
    patched_after_step = {kind: run_export(built, kind) for kind in ("plain", "merged")}
    revert()
    upstream_after_step = {kind: run_export(built, kind) for kind in ("plain", "merged")}
    out["after_step_equal"] = all(same(patched_after_step[k], upstream_after_step[k]) for k in ("plain", "merged"))
    out["after_step_changed"] = not same(upstream_after_step["plain"], upstream["plain"]) and not same(
        upstream_after_step["merged"], upstream["merged"]
    )
    apply()
    # a parameter replaced by a new object: the cached tasks would point at the old one
    module = next(m for m in built.model[0].modules() if type(m).__name__ == "TopKRouter")
    module.weight = torch.nn.Parameter(module.weight.detach() * 2)
    rebuilt = bridge.build_conversion_tasks(built.bridge.hf_pretrained, models)
    out["rebuilt"] = not all(a is b for a, b in zip(first, rebuilt, strict=True))
    patched_replaced = run_export(built, "plain")
    revert()
    out["replaced_equal"] = same(patched_replaced, run_export(built, "plain"))
    apply()
    # an adapter parameter replaced by a new object with other values: the merge must use the new one
    adapter = next(m for n, m in built.model[0].named_modules() if n.endswith("linear_fc2.adapter.linear_in"))
    adapter.weight = torch.nn.Parameter(adapter.weight.detach() + 1)
    adapter_rebuilt = bridge.build_adapter_conversion_tasks(models)
    out["adapter_rebuilt"] = any(
        a is not b for k in adapter_first for a, b in zip(adapter_first[k], adapter_rebuilt.get(k, []), strict=False)
    )
    patched_merged = run_export(built, "merged")
    revert()
    upstream_merged = run_export(built, "merged")
    out["adapter_replaced_equal"] = same(patched_merged, upstream_merged)
    out["adapter_replaced_changed"] = not same(upstream_merged, upstream_after_step["merged"])
    apply()
    return out


@pytest.mark.parametrize(
    "layout,dtype",
    [(ParallelLayout(), "float32"), (ParallelLayout(), "bfloat16"), (ParallelLayout(ep=2), "float32"),
     (ParallelLayout(pp=2), "float32")],
    ids=["world1", "world1-bf16", "ep2", "pp2"],
)
def test_repeated_exports_reuse_tasks_and_stay_equal_to_upstream(layout, dtype):
    config = tiny_qwen3_moe_config(num_hidden_layers=2)
    results = run_distributed(exports_and_task_reuse, layout.world_size, (config, layout, dtype), timeout_s=600)
    for rank, r in enumerate(results):
        assert r["reused"] and r["copy_returned"], (rank, r)
        assert r["adapter_tasks"] > 0 and r["adapter_reused"] and r["adapter_copy_returned"], (rank, r)
        assert r["adapter_rebuilt"] and r["adapter_replaced_equal"] and r["adapter_replaced_changed"], (rank, r)
        assert r["plain_equal_twice"] and r["merged_equal_twice"], (rank, r)
        assert r["after_step_changed"] and r["after_step_equal"], (rank, r)
        assert r["rebuilt"] and r["replaced_equal"], (rank, r)

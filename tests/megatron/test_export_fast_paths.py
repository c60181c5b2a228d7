"""World-size-1 export fast paths: the QKV split without the pipeline-broadcast config copy gives upstream's
export bit for bit (names, order, dtypes, bytes), plain and merged, and really skips the copy.

The references: the suite with only ``megatron_bridge.qkv_export_local_config`` reverted, and (plain)
upstream with the whole suite off."""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import ParallelLayout, tiny_qwen3_moe_config

PATCH_ID = "megatron_bridge.qkv_export_local_config"


def exports_with_and_without(hf_config: Any, layout: ParallelLayout) -> dict[str, Any]:
    import torch

    import moe_lora_plugins
    from moe_lora_plugins.activation import get_registry
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names, run_export

    built = build_lora_model(hf_config, layout, dtype=torch.bfloat16)
    fill_from_global_names(built)
    from megatron.bridge.models.conversion import param_mapping  # after the build's import shims

    def prints(items: list) -> list:  # name, dtype, shape and the bytes of every tensor, in order
        return [(n, t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).flatten().tolist()) for n, t in items]

    copies = [0]
    original = param_mapping.remove_non_pickleables

    def counted(*args: Any, **kwargs: Any) -> Any:
        copies[0] += 1
        return original(*args, **kwargs)

    param_mapping.remove_non_pickleables = counted
    out: dict[str, Any] = {}
    try:
        moe_lora_plugins.deactivate()
        upstream_plain = prints(run_export(built, "plain"))
        moe_lora_plugins.activate(role="trainer")
        registry = get_registry()
        registry.revert(PATCH_ID)
        copies[0] = 0
        reverted = {kind: prints(run_export(built, kind)) for kind in ("plain", "merged")}
        out["copies_reverted"] = copies[0]
        registry.apply(PATCH_ID)
        copies[0] = 0
        patched = {kind: prints(run_export(built, kind)) for kind in ("plain", "merged")}
        out["copies_patched"] = copies[0]
    finally:
        param_mapping.remove_non_pickleables = original
    out["tensors"] = {kind: len(items) for kind, items in patched.items()}
    out["qkv_names"] = sum(".self_attn.q_proj." in n for n, *_ in patched["plain"])
    out["equal_reverted"] = {kind: patched[kind] == reverted[kind] for kind in patched}
    out["plain_equal_upstream"] = patched["plain"] == upstream_plain
    return out


def test_world_size_1_qkv_export_skips_the_config_copy_and_stays_bitwise_upstream():
    config = tiny_qwen3_moe_config(num_hidden_layers=2)
    (r,) = run_distributed(exports_with_and_without, 1, (config, ParallelLayout()), timeout_s=600)
    assert r["tensors"]["plain"] > 0 and r["qkv_names"] == 2, r
    assert r["equal_reverted"] == {"plain": True, "merged": True}, r
    assert r["plain_equal_upstream"], r
    assert r["copies_reverted"] > 0 and r["copies_patched"] == 0, r


def test_pipeline_parallel_qkv_export_goes_to_upstream():
    config = tiny_qwen3_moe_config(num_hidden_layers=2)
    results = run_distributed(exports_with_and_without, 2, (config, ParallelLayout(pp=2)), timeout_s=600)
    for rank, r in enumerate(results):
        assert r["equal_reverted"] == {"plain": True, "merged": True}, (rank, r)
        assert r["copies_patched"] == r["copies_reverted"] > 0, (rank, r)

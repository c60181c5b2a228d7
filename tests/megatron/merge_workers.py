"""Rank functions for the merge-on-export tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.testing.merge_memory import malloc_returns_memory_at_once, peak_during
from moe_lora_plugins.testing.tiny_models import (
    LoraSettings,
    ParallelLayout,
    build_lora_model,
    fill_from_global_names,
    run_export,
)


def _pairs(stream: Any) -> list[tuple[str, Any]]:
    return [(item[0], item[1].detach().cpu().clone()) for item in stream]


def merge_on_export_worker(
    hf_config: Any, layout: ParallelLayout, lora: LoraSettings, activate: bool = False, with_references: bool = False
) -> dict[str, Any]:
    """Build and fill the model, then export it merged our way; optionally also upstream's exports.

    Also reports whether the export left every parameter untouched (values and version counters).
    """
    import torch

    from moe_lora_plugins.merge.bridge_export import stream_merged_hf_weights

    if activate:
        import moe_lora_plugins

        moe_lora_plugins.activate(role="trainer")
    built = build_lora_model(hf_config, layout, lora)
    fill_from_global_names(built)
    params = [(f"chunk{i}.{n}", p) for i, chunk in enumerate(built.model) for n, p in chunk.named_parameters()]
    before = {n: (p.detach().clone(), p._version, p.data_ptr()) for n, p in params}
    out: dict[str, Any] = {
        "ours": _pairs(stream_merged_hf_weights(built.bridge, built.model, scale=lora.alpha / lora.dim))
    }
    out["changed"] = sorted(
        f"{n}: {'values' if not torch.equal(p, before[n][0]) else 'version' if p._version != before[n][1] else 'storage'}"
        for n, p in params
        if not (torch.equal(p, before[n][0]) and p._version == before[n][1] and p.data_ptr() == before[n][2])
    )
    if with_references:
        out["upstream_merged"] = run_export(built, "merged")
        out["plain"] = run_export(built, "plain")
        out["adapter"] = run_export(built, "adapter")
    return out


def export_memory_worker(hf_config: Any, lora: LoraSettings, approaches: tuple[str, ...]) -> dict[str, Any]:
    """Peak extra resident memory of each export approach on one rank, consuming the stream as an engine would.

    ``plain``: base weights only; ``merge_on_export``: ours; ``upstream_merge``: Megatron-Bridge's
    ``merge_adapter_weights=True``; ``backup_merge``: slime's approach (a full copy of every parameter,
    merge in place, export, restore from the copy).
    """
    import torch

    from moe_lora_plugins.merge.bridge_export import stream_merged_hf_weights

    malloc_returns_memory_at_once()
    built = build_lora_model(hf_config, ParallelLayout(), lora)
    fill_from_global_names(built)
    bridge, model = built.bridge, built.model
    scale = lora.alpha / lora.dim

    def consume(stream: Any) -> None:
        for item in stream:
            del item

    def plain() -> None:
        consume(bridge.export_hf_weights(model, cpu=True, show_progress=False, merge_adapter_weights=False))

    def merge_on_export() -> None:
        consume(stream_merged_hf_weights(bridge, model, scale))

    def upstream_merge() -> None:
        consume(bridge.export_hf_weights(model, cpu=True, show_progress=False, merge_adapter_weights=True))

    def backup_merge() -> None:
        backup = {n: p.detach().clone() for chunk in model for n, p in chunk.named_parameters()}
        consume(bridge.export_hf_weights(model, cpu=True, show_progress=False, merge_adapter_weights=True))
        with torch.no_grad():
            for chunk in model:
                for n, p in chunk.named_parameters():
                    p.copy_(backup[n])
        del backup

    runs = {"plain": plain, "merge_on_export": merge_on_export, "upstream_merge": upstream_merge,
            "backup_merge": backup_merge}
    plain()  # first export builds and caches conversion tasks; measure warm exports only
    merge_on_export()
    peaks = {name: peak_during(runs[name]) for name in approaches}
    param_bytes = sum(p.numel() * p.element_size() for chunk in model for p in chunk.parameters())
    largest = max(p.numel() * 4 for chunk in model for p in chunk.parameters())
    return {"peaks": peaks, "param_bytes": param_bytes, "largest_fp32_bytes": largest}


def actor_only_worker(hf_config: Any) -> dict[str, Any]:
    """Build the model once per role without LoRA, run the built-in hook, report what it did."""
    import logging

    from moe_lora_plugins.hooks.manager import new_plugin_manager
    from moe_lora_plugins.lora_config import LoraConfig, LoraConfigError
    from moe_lora_plugins.plugins.lora_actor import count_parameters, install_pre_wrap_hook

    pm = new_plugin_manager(autoload=False)
    config = LoraConfig(enabled=True, rank=4, alpha=8)
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    plugin_logger = logging.getLogger("moe_lora_plugins.lora_actor")
    plugin_logger.addHandler(handler)
    plugin_logger.setLevel(logging.INFO)

    def summary(chunks: list[Any]) -> dict[str, Any]:
        adapters = [n for c in chunks for n, m in c.named_modules() if n.endswith(".adapter")]
        trainable, total = count_parameters(chunks)
        adapter_params = sum(p.numel() for c in chunks for n, p in c.named_parameters() if ".adapter." in n)
        return {"adapters": len(adapters), "adapter_names": adapters, "trainable": trainable, "total": total,
                "adapter_params": adapter_params}

    built = build_lora_model(hf_config, ParallelLayout(), lora=None)
    out: dict[str, Any] = {}
    for role in ("reference", "critic", "actor"):
        chunks = built.provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True,
                                                          mixed_precision_wrapper=None)
        pm.hook.on_build_model(model_chunks=chunks, provider=built.provider, role=role, config=config)
        out[role] = summary(chunks)
    install_pre_wrap_hook(built.provider, "actor", config, plugin_manager=pm)
    out["via_pre_wrap_hook"] = summary(built.provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None))
    chunks = built.model
    try:
        pm.hook.on_build_model(model_chunks=chunks, provider=built.provider, role="actor",
                               config=LoraConfig(enabled=True, target_modules=("linear_q_down_proj",)))
        out["refusal"] = ""
    except LoraConfigError as exc:
        out["refusal"] = str(exc)
    out["after_refusal"] = summary(chunks)
    out["log"] = messages
    return out

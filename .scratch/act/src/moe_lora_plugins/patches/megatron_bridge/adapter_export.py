"""Patch: ``export_adapter_weights`` / ``save_hf_adapter`` emit every global expert on every rank.

Wraps ``MegatronPeftBridge.stream_adapter_weights_megatron_to_hf`` (both AutoBridge calls reach it).
With globally numbered adapter names (see ``name_globalization``) each EP rank's upstream stream
holds its own experts under their global names plus the tensors every rank holds; the wrapper
gathers the rank-owned ones over the expert-parallel group in one transfer, so every rank emits
experts ``0..E-1`` exactly once, then audits the stream and passes it through the plugins'
``on_export_weights`` chain (kind ``adapter``). 2- and 3-tuple items are both kept as they
come. Grouped (TEGroupedMLP) adapters that upstream already gathers are recognised as replicated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.stream_adapter_weights",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.peft_bridge",
        attribute="MegatronPeftBridge.stream_adapter_weights_megatron_to_hf",
        kind="wrap",
        implementation="moe_lora_plugins.patches.megatron_bridge.adapter_export:stream_adapter_weights",
        fingerprint="(self, megatron_model, cpu=, show_progress=, exclude_adapter_base_prefixes=)",
        why=(
            "Under EP > 1 each rank emits only its own SequentialMLP expert adapters, so a consumer of "
            "one rank's stream (the rollout sync, save_hf_adapter on rank 0) never sees the other "
            "experts. Also audits every adapter export."
        ),
        upstream="Megatron-Bridge 0.6.2 peft_bridge.MegatronPeftBridge.stream_adapter_weights_megatron_to_hf",
        remove_when="Megatron-Bridge gathers SequentialMLP expert adapters across EP ranks",
        verified="megatron-bridge 0.6.2: CPU gloo EP=2/4, PP=2xEP=2, PP=2xVPP=2, ETP=2; 2xH200 NCCL bf16. "
        "0.4.0 (read, not run): the method lacks exclude_adapter_base_prefixes (fingerprint differs); "
        "out of range.",
    ),
)


def stream_adapter_weights(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Any]:
    """The upstream adapter stream, gathered over EP, audited and hooked (lazy, like upstream's generator)."""
    from moe_lora_plugins.patches.megatron_bridge._export_common import (
        bind_call,
        clear_name_caches,
        ep_group,
        gather_expert_items,
        hooked,
        maybe_audited,
    )

    clear_name_caches(instance)
    call = bind_call(wrapped, args, kwargs)
    models = call["megatron_model"]

    def stream() -> Iterator[Any]:
        items = list(wrapped(*args, **kwargs))
        items = gather_expert_items(items, ep_group(models))
        yield from maybe_audited(items, "adapter", models)

    return hooked(stream(), "adapter", models, instance)

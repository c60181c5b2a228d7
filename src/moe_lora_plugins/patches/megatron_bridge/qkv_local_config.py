"""Patch: without pipeline parallelism, exporting a fused QKV weight reads the model config as it is.

Wraps ``QKVMapping.megatron_to_hf``. Upstream makes a pickle-safe shallow copy of the transformer
config on every call (``remove_non_pickleables``, a recursive walk of every config field three levels
deep) so that it can broadcast it over the pipeline group, and then only reads four head-count fields
from it to split Q, K and V. With one pipeline stage the broadcast returns its argument unchanged, so
the copy is thrown away after those reads: on the CPU proxy of the anchor model (8 layers) it was ~10 %
of a profiled plain export. With a pipeline group of one rank and a module at hand, the wrapper reads
the same fields from the live config (the copy's fields are the same objects) and does the rest as
upstream does (dequantize, the TP mapping's gather, the split); anything else goes to upstream.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.qkv_export_local_config",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.param_mapping",
        attribute="QKVMapping.megatron_to_hf",
        kind="wrap",
        implementation="moe_lora_plugins.patches.megatron_bridge.qkv_local_config:megatron_to_hf",
        fingerprint="(self, megatron_weights, megatron_module)",
        why=(
            "Every QKV export builds a pickle-safe copy of the whole transformer config to broadcast it over the "
            "pipeline group, also with one pipeline stage, where the broadcast hands it back unchanged: ~10 % of a "
            "profiled world-size-1 plain export on the anchor model's CPU proxy, paid at every weight sync."
        ),
        upstream="Megatron-Bridge 0.6.2 param_mapping.QKVMapping.megatron_to_hf (remove_non_pickleables before "
        "broadcast_obj_from_pp_rank)",
        remove_when="Megatron-Bridge skips the config copy when the pipeline group has one rank",
        verified="megatron-bridge 0.6.2: CPU world size 1 plain and merged exports bitwise equal to upstream's "
        "(names, order, dtypes, bytes); PP=2 goes to upstream (tests/megatron/test_export_fast_paths.py); "
        "1xH200: the anchor model's plain export bitwise upstream's at 0.035 s (benchmarks/RESULTS-export.md, run 5).",
        requires=(
            "megatron.bridge.models.conversion.param_mapping:split_qkv_weights",
            "megatron.bridge.models.conversion.param_mapping:split_qkv_biases",
            "megatron.bridge.models.conversion.param_mapping:MegatronParamMapping._get_config",
            "megatron.bridge.models.conversion.param_mapping:MegatronParamMapping.maybe_dequantize",
            "megatron.bridge.models.conversion.param_mapping:MegatronParamMapping.pp_size",
        ),
    ),
)


def _weights_and_module(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """``(megatron_weights, megatron_module)`` by upstream's parameter names, or None for another call form."""
    if len(args) == 2 and not kwargs:
        return args[0], args[1]
    names = ("megatron_weights", "megatron_module")
    if len(args) > 2:
        return None
    values = dict(zip(names[: len(args)], args, strict=True))
    if any(key not in names or key in values for key in kwargs):
        return None
    values.update(kwargs)
    if len(values) != 2:
        return None
    return values["megatron_weights"], values["megatron_module"]


def megatron_to_hf(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Upstream's Q, K, V split; with one pipeline stage the config is read where it is, not copied first."""
    call = _weights_and_module(args, kwargs)
    if call is None or call[1] is None or instance.pp_size != 1:
        return wrapped(*args, **kwargs)
    from megatron.bridge.models.conversion.param_mapping import split_qkv_biases, split_qkv_weights

    megatron_weights, megatron_module = call
    if megatron_weights is not None:
        megatron_weights = instance.maybe_dequantize(megatron_weights)
    config = instance._get_config(megatron_module)
    packed = instance._tp_mapping.megatron_to_hf(megatron_weights, megatron_module)
    if not packed:
        return {}
    qkv = next(iter(packed.values()))
    q, k, v = split_qkv_biases(config, qkv) if qkv.ndim == 1 else split_qkv_weights(config, qkv)
    return {instance.hf_param["q"]: q, instance.hf_param["k"]: k, instance.hf_param["v"]: v}

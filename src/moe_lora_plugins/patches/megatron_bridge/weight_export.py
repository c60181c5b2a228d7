"""Patch: ``export_hf_weights`` merges each expert's own LoRA delta, in every layout, and is audited.

Wraps ``MegatronModelBridge.stream_weights_megatron_to_hf``. Upstream merges under EP the local
adapter of EP rank 0 into the gathered experts of every rank. With ``merge_adapter_weights=True``
the wrapper instead streams the plain export (correct in every layout) and merges
``W + alpha / r * B @ A`` with the globally gathered adapters of the patched adapter export, in
float32 on the tensors' device and cast back, the same arithmetic upstream uses at world size 1, so
the result is bitwise the world-size-1 result. Plain exports pass through the audit only. Items keep
their tuple shape (upstream 2-tuples, the slime/miles 3-tuples).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.stream_weights_merge",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.model_bridge",
        attribute="MegatronModelBridge.stream_weights_megatron_to_hf",
        kind="wrap",
        implementation="moe_lora_plugins.patches.megatron_bridge.weight_export:stream_weights",
        fingerprint="(self, megatron_model, hf_pretrained, cpu=, show_progress=, conversion_tasks=, "
        "merge_adapter_weights=, weight_dtype=)",
        why=(
            "export_hf_weights(merge_adapter_weights=True) under EP > 1 merges EP rank 0's local expert "
            "delta into experts L and L+E/EP and nothing from other ranks; under expert-TP > 1 it mixes "
            "gate and up rows of LoRA B. Also audits every export."
        ),
        upstream="Megatron-Bridge 0.6.2 model_bridge.MegatronModelBridge.stream_weights_megatron_to_hf / "
        "peft_bridge._merge_lora_adapter_weights",
        remove_when="Megatron-Bridge merges per global expert across EP and expert-TP, with multi-rank tests",
        verified="megatron-bridge 0.6.2: CPU gloo EP=2/4, PP=2xEP=2, PP=2xVPP=2, ETP=2; 2xH200 NCCL bf16. "
        "0.4.x not verified.",
    ),
)


def _adapter_scale(instance: Any, models: list[Any]) -> tuple[float, int | None]:
    """(alpha, dim) shared by every adapter; dim ``None`` when it differs (then the rank of A is used)."""
    from moe_lora_plugins.errors import MoeLoraError

    infos = instance._megatron_global_adapters_info_all_pp_ranks(models)
    alphas = {info[5] for info in infos}
    dims = {info[6] for info in infos}
    if len(alphas) != 1:
        raise MoeLoraError(
            f"adapters of this model use different alphas {sorted(alphas)}; the layout-independent merge "
            "supports one alpha per model. Disable it with "
            "MOELORA_DISABLED_PATCHES=megatron_bridge.stream_weights_merge (EP must then be 1)."
        )
    return next(iter(alphas)), (next(iter(dims)) if len(dims) == 1 else None)


def _merged(base: Any, lora_a: Any, lora_b: Any, alpha: float, dim: int | None, name: str) -> Any:
    import torch

    from moe_lora_plugins.errors import MoeLoraError

    if lora_a.ndim != 2 or lora_b.ndim != 2:
        raise MoeLoraError(
            f"cannot merge packed expert adapter into {name}: lora_A {tuple(lora_a.shape)}, lora_B "
            f"{tuple(lora_b.shape)} (only 2-D per-expert adapters are merged). Disable the patch with "
            "MOELORA_DISABLED_PATCHES=megatron_bridge.stream_weights_merge."
        )
    rank = dim if dim is not None else lora_a.shape[0]
    scale = alpha / rank
    device = base.device
    delta = scale * (lora_b.to(device=device, dtype=torch.float32) @ lora_a.to(device=device, dtype=torch.float32))
    return (base.float() + delta).to(base.dtype)


def _unwrapped_name(hf_name: str) -> str:
    """The merged-export name of a plain-export name: upstream calls LoRA-wrapped bases ``X.base_layer.w``."""
    head, sep, tail = hf_name.rpartition(".base_layer.")
    return f"{head}.{tail}" if sep else hf_name


def stream_weights(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Any]:
    """Plain export, audited; with ``merge_adapter_weights`` the per-global-expert merge on top."""
    from moe_lora_plugins.patches.megatron_bridge._export_common import (
        bind_call,
        clear_name_caches,
        maybe_audited,
        model_list,
        rebuild_item,
    )

    clear_name_caches(instance)
    call = bind_call(wrapped, args, kwargs)
    models = model_list(call["megatron_model"])
    if not call.get("merge_adapter_weights"):
        return maybe_audited(wrapped(*args, **kwargs), "plain", models)

    def merged_stream() -> Iterator[Any]:
        from moe_lora_plugins.audit import ExportAuditError

        adapters = {
            item[0]: item[1]
            for item in instance.stream_adapter_weights_megatron_to_hf(models, cpu=False, show_progress=False)
        }
        inner = dict(call, merge_adapter_weights=False, cpu=False)
        inner.pop("self", None)
        if not adapters:
            for item in wrapped(**inner):
                yield rebuild_item(item, _unwrapped_name(item[0]), item[1].cpu() if call["cpu"] else item[1])
            return
        alpha, dim = _adapter_scale(instance, models)
        for item in wrapped(**inner):
            name, tensor = _unwrapped_name(item[0]), item[1]
            if name.endswith(".weight"):
                prefix = name[: -len(".weight")]
                lora_a = adapters.pop(f"{prefix}.lora_A.weight", None)
                lora_b = adapters.pop(f"{prefix}.lora_B.weight", None)
                if lora_a is not None and lora_b is not None:
                    tensor = _merged(tensor, lora_a, lora_b, alpha, dim, name)
            yield rebuild_item(item, name, tensor.cpu() if call["cpu"] else tensor)
        if adapters:
            shown = ", ".join(sorted(adapters)[:8])
            raise ExportAuditError(
                f"merged export: {len(adapters)} adapter tensors matched no exported base weight "
                f"(first: {shown}); the merged weights would silently miss their deltas."
            )

    return maybe_audited(merged_stream(), "merged", models)

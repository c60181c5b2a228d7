"""LoRA on the actor only: an ``on_build_model`` hook that applies Megatron-Bridge's LoRA to role "actor".

Reference and critic models (any role other than ``"actor"``) are left exactly as built. Before the
transform the settings are checked against the built model and the installed Megatron-Bridge
(:func:`~moe_lora_plugins.lora_config.validate_lora_config`); after it, this rank's trainable and total
parameter counts are logged. :func:`install_pre_wrap_hook` reaches the hook through Megatron-Bridge's
``register_pre_wrap_hook`` so it runs before DDP wrapping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from moe_lora_plugins.hooks import hookimpl
from moe_lora_plugins.lora_config import BridgeFacts, LoraConfig, ModelFacts, validate_lora_config

logger = logging.getLogger("moe_lora_plugins.lora_actor")

ACTOR_ROLE = "actor"
FC1_SPLIT_PATCH = "megatron_bridge.split_fused_fc1_lora_b"


def expert_tp_fc1_split_fixed() -> bool:
    """Whether this process splits expert fc1 LoRA B correctly under expert-TP > 1: the export patch that
    fixes Megatron-Bridge's split is applied (or pending, i.e. will land when the bridge is imported)."""
    from moe_lora_plugins.activation import get_registry, is_active
    from moe_lora_plugins.registry import PatchStatus

    if not is_active():
        return False
    registry = get_registry()
    if FC1_SPLIT_PATCH not in registry.ids():
        return False
    return registry.status(FC1_SPLIT_PATCH) in (PatchStatus.APPLIED, PatchStatus.PENDING)


def as_lora_config(config: Any) -> LoraConfig | None:
    """A :class:`LoraConfig` from what the host passes: the dataclass itself, a host seam's
    ``hooks.build.BuildConfig`` (its ``lora``), or the host's parsed argparse namespace."""
    if config is None or isinstance(config, LoraConfig):
        return config
    from moe_lora_plugins.hooks.build import BuildConfig

    if isinstance(config, BuildConfig):
        return config.lora
    if hasattr(config, "enable_lora"):
        return LoraConfig.from_args(config)
    return None


def count_parameters(model_chunks: Iterable[Any]) -> tuple[int, int]:
    """(trainable, total) parameter elements of this rank's chunks."""
    trainable = total = 0
    for chunk in model_chunks:
        for param in chunk.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
    return trainable, total


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _model_config(model_chunks: list[Any], provider: Any) -> Any:
    if provider is not None:
        return provider
    first = model_chunks[0]
    while hasattr(first, "module") and not hasattr(first, "config"):
        first = first.module
    return first.config


@hookimpl
def on_build_model(model_chunks: list[Any], provider: Any, role: str, config: Any) -> None:
    """Apply LoRA to the actor's chunks in place; any other role, LoRA off, or chunks the host already gave
    LoRA (miles' own ``--lora-rank`` path) change nothing."""
    lora = as_lora_config(config)
    if role != ACTOR_ROLE or lora is None or not lora.enabled:
        return
    module_names = [name for chunk in model_chunks for name, _ in chunk.named_modules()]
    if any(name.endswith(".adapter") for name in module_names):
        logger.info("moe-lora-plugins: the host applied LoRA to this actor already (rank %d); left as it is", _rank())
        return
    validate_lora_config(
        lora,
        model=ModelFacts.from_megatron_config(_model_config(model_chunks, provider)),
        model_module_names=module_names,
        bridge=BridgeFacts.installed(expert_tp_fc1_split_ok=expert_tp_fc1_split_fixed()),
    )
    lora.to_megatron_bridge()(model_chunks, training=True)
    trainable, total = count_parameters(model_chunks)
    logger.info(
        "moe-lora-plugins: LoRA on the actor, rank %d: %d trainable of %d parameters (%.4f%%), r=%d alpha=%g "
        "targets=%s expert adapters=%s",
        _rank(), trainable, total, 100.0 * trainable / max(total, 1), lora.rank, lora.alpha,
        ",".join(lora.megatron_targets()), lora.expert_adapters,
    )


def install_pre_wrap_hook(provider: Any, role: str, config: Any, plugin_manager: Any = None) -> None:
    """Make ``provider.provide_distributed_model`` call ``on_build_model`` (all plugins) before wrapping."""
    from moe_lora_plugins.hooks.manager import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()

    def pre_wrap(model_chunks: list[Any]) -> list[Any]:
        pm.hook.on_build_model(model_chunks=model_chunks, provider=provider, role=role, config=config)
        return model_chunks

    provider.register_pre_wrap_hook(pre_wrap)

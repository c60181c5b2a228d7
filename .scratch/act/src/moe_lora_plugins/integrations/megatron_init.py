"""slime / miles ``--custom-megatron-init-path moe_lora_plugins.integrations.megatron_init.init``.

The host calls the dotted path with its parsed ``args`` on every train rank after model-parallel
initialisation (miles: ``miles/backends/megatron_utils/initialize.py``, ``custom_init(args)`` at the
end of ``_initialize_megatron``; read at radixark/miles 31f1ca961). :func:`init`:

1. activates the suite as role ``trainer`` whatever ``MOELORA_PLUGINS`` says (naming the hook is the
   opt-in), so the Megatron-Bridge patches are in place before the first build and export;
2. reads the host's LoRA flags from ``args`` (:func:`lora_config_from_host_args`: slime's
   ``--enable-lora --lora-rank --lora-alpha --lora-dropout --lora-target-modules``, miles'
   ``--lora-rank N`` (0 = off) ``--target-modules`` ``--experts-shared-outer-loras``, and this suite's
   own flags) and refuses bad combinations before any model exists;
3. declares the build configuration (``hooks.build.set_build_config``), so every model this process
   builds with ``provide_distributed_model`` reaches the plugins' ``on_build_model`` before DDP
   wrapping: the built-in ``lora_actor`` plugin gives the actor LoRA (not a reference or critic
   model, and not an actor the host already gave LoRA, as miles' own ``--lora-rank`` path does);
4. reads the five MoE runtime flags (``--moe-token-dispatcher-type``, ``--moe-router-load-balancing-type``,
   ``--moe-grouped-gemm``, ``--moe-router-score-function``, ``--moe-router-enable-expert-bias``;
   Megatron-LM's arguments, which slime and miles parse) into a validated ``MoeRuntimeConfig``: the
   ``megatron_bridge.moe_runtime_finalize`` patch applies it to every MoE provider before its
   ``finalize()``. In bridge mode (``--megatron-to-hf-mode bridge``) neither host passes them to the
   provider it builds from the HF config: ``get_model_provider_func`` in
   ``slime/backends/megatron_utils/model_provider.py`` (THUDM/slime 13c3a7537c47) and in
   ``miles/backends/megatron_utils/model_provider.py`` (radixark/miles ef3bb705d981) set only the parallel
   sizes and precision before ``provider.finalize()``. A flag at Megatron-Core's default counts as not given;
5. registers a GLM-4.7-Flash bridge when the installed Megatron-Bridge lacks one.

Building a model for another role: ``with moe_lora_plugins.hooks.build.building("reference"): ...``
or set ``provider.moelora_role = "reference"`` before ``provide_distributed_model``.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.lora_config import LoraConfig


def lora_config_from_host_args(args: Any) -> LoraConfig:
    """A :class:`LoraConfig` from slime's, miles' or this suite's LoRA flags on a parsed namespace."""
    config = LoraConfig.from_args(args)
    rank = getattr(args, "lora_rank", None)
    enabled = bool(getattr(args, "enable_lora", False)) or (
        not hasattr(args, "enable_lora") and isinstance(rank, int) and rank > 0
    )
    targets = config.target_modules
    if getattr(args, "lora_target_modules", None) is None and getattr(args, "target_modules", None):
        targets = LoraConfig.from_args(_Targets(args.target_modules)).target_modules
    expert_adapters = config.expert_adapters
    if getattr(args, "experts_shared_outer_loras", False):
        expert_adapters = "shared-outer"
    return LoraConfig(
        enabled=enabled,
        target_modules=targets,
        rank=config.rank if isinstance(config.rank, int) and config.rank > 0 else LoraConfig().rank,
        alpha=config.alpha,
        dropout=config.dropout,
        expert_adapters=expert_adapters,
        sync_mode=config.sync_mode,
        # Ours (--true-on-policy) or miles' name for its true-on-policy switch.
        true_on_policy=config.true_on_policy or bool(getattr(args, "true_on_policy_mode", False)),
    )


class _Targets:
    def __init__(self, targets: Any) -> None:
        self.lora_target_modules = targets


def init(args: Any = None) -> None:
    """Activate, read the LoRA flags, and route every Megatron model this process builds through the plugins."""
    from moe_lora_plugins.activation import activate

    activate(role="trainer")
    if args is None:
        return
    from moe_lora_plugins.hooks.build import declare_build
    from moe_lora_plugins.lora_config import apply_true_on_policy, validate_lora_config
    from moe_lora_plugins.trainer.moe_runtime import MoeRuntimeConfig

    lora = lora_config_from_host_args(args)
    validate_lora_config(lora)
    moe_runtime = MoeRuntimeConfig.from_host_args(args)
    moe_runtime.validate()  # refused here, naming the flag and the accepted values, before any model exists
    apply_true_on_policy(lora)  # before any model is built: the patched ops read the switch at call time
    declare_build(lora, args=args, moe_runtime=None if moe_runtime.is_empty() else moe_runtime)
    if _megatron_bridge_importable():
        from moe_lora_plugins.trainer.glm_bridge import ensure_glm47_flash_bridge

        ensure_glm47_flash_bridge()


def _megatron_bridge_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.bridge") is not None

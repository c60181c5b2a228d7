"""Patch: ``provide_distributed_model`` runs the plugins' ``on_build_model`` before wrapping, once a host
seam declared its build configuration.

Wraps ``ModelProviderMixin.provide_distributed_model``. Without a declared configuration
(``hooks.build.set_build_config``, done by ``integrations.megatron_init.init(args)`` and the other
host integrations) the call is upstream's, untouched. With one, our pre-wrap hook runs after the
hooks the caller passed or registered (a host's own LoRA hook first), so a plugin sees the chunks
the host built, before DDP or FSDP wraps them.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.pre_wrap_build_hooks",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.model_provider",
        attribute="ModelProviderMixin.provide_distributed_model",
        kind="wrap",
        implementation="moe_lora_plugins.patches.megatron_bridge.build_hooks:provide_distributed_model",
        fingerprint="(self, ddp_config=, model_type=, overlap_param_gather_with_optimizer_step=, fp16=, bf16=, "
        "use_megatron_fsdp=, use_torch_fsdp2=, wrap_with_ddp=, data_parallel_random_init=, "
        "use_cpu_initialization=, init_model_with_meta_device=, pre_wrap_hook=, post_wrap_hook=, "
        "mixed_precision_wrapper=, pg_collection=)",
        why=(
            "Hosts build their Megatron models in their own code (slime / miles setup_model_and_optimizer, "
            "SkyRL's and verl's Megatron workers); the one point every build passes before DDP wrapping is "
            "provide_distributed_model's pre-wrap hook, and only the host can register one per provider. "
            "This lets a --custom-megatron-init-path (or another host seam) reach every build of the process."
        ),
        upstream="Megatron-Bridge 0.6.2 model_provider.ModelProviderMixin.provide_distributed_model "
        "(no process-wide pre-wrap hook registry upstream)",
        remove_when="never while hosts give no per-provider seam; upstream a process-wide pre-wrap hook registry "
        "would replace it",
        verified="megatron-bridge 0.6.2: CPU gloo, world 1 and EP=2; the actor gets LoRA, a model built inside "
        "hooks.build.building('reference') does not (tests/megatron/test_megatron_init.py)",
    ),
)


def provide_distributed_model(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Upstream's call with the plugins' ``on_build_model`` appended to the pre-wrap hooks."""
    from moe_lora_plugins.hooks.build import build_config, pre_wrap_hook
    from moe_lora_plugins.patches.megatron_bridge._export_common import bind_call

    config = build_config()
    if config is None:
        return wrapped(*args, **kwargs)
    call = bind_call(wrapped, args, kwargs)
    given = call.get("pre_wrap_hook")
    hooks = list(given) if isinstance(given, list) else [given or instance.pre_wrap_hook]
    call["pre_wrap_hook"] = [hook for hook in hooks if hook is not None] + [pre_wrap_hook(instance, config)]
    return wrapped(**call)

"""verl 0.9.1 (from PyPI, --no-deps): its own Megatron model construction gets LoRA through ``on_build_model``.

The worker does what verl's Megatron engine does: ``import_external_libs`` with our integration (the
``external_lib`` seam), then ``verl.utils.megatron_utils.make_megatron_module`` with a Megatron-Bridge
bridge and provider. With ``use_lora`` the actor verl builds gets exactly that LoRA; a model built as
the reference gets none; verl's own LoRA (``peft_cls``) is not doubled; without our integration
verl's build has no LoRA.
"""

from __future__ import annotations

from typing import Any

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import tiny_qwen3_moe_config

pytestmark = pytest.mark.verl


def _adapters(module: Any) -> list[str]:
    chunks = module if isinstance(module, list) else [module]
    return sorted(n for c in chunks for n, _ in c.named_modules() if n.endswith(".adapter"))


def _build_on_the_cpu(provider: Any) -> None:
    """verl's call leaves ``use_cpu_initialization`` unset, and Megatron then allocates on the GPU; on this
    CPU-only machine the provider's class passes it (test environment only, like the TE stand-in: the
    patched ``provide_distributed_model`` still runs)."""
    base = type(provider)

    def provide_distributed_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        return base.provide_distributed_model(self, *args, use_cpu_initialization=True, **kwargs)

    provider.__class__ = type(f"CpuBuilt{base.__name__}", (base,), {"provide_distributed_model": provide_distributed_model})


def verl_build_worker(hf_config: Any, with_integration: bool) -> dict[str, Any]:
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu
    from moe_lora_plugins.testing.tiny_models import _FUSIONS_OFF

    prepare_megatron_cpu()
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core import parallel_state
    from verl.utils.import_utils import import_external_libs
    from verl.utils.megatron_utils import McoreModuleWrapperConfig, make_megatron_module

    from moe_lora_plugins.hooks.build import building
    from moe_lora_plugins.lora_config import LoraConfig

    if with_integration:
        import_external_libs("moe_lora_plugins.integrations.verl")  # what verl does with external_lib
        from moe_lora_plugins.integrations.verl import use_lora

        use_lora(LoraConfig(enabled=True, rank=4, alpha=8, target_modules=("linear_qkv", "linear_fc1")))
    bridge = AutoBridge.from_hf_config(hf_config)
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.transformer_layer_spec = local_layer_spec
    provider.moe_token_dispatcher_type = "allgather"
    for name in _FUSIONS_OFF:
        if hasattr(provider, name):
            setattr(provider, name, False)
    provider.finalize()
    parallel_state.initialize_model_parallel()
    _build_on_the_cpu(provider)

    def build(peft_cls: Any = None) -> list[str]:
        module, _ = make_megatron_module(McoreModuleWrapperConfig(wrap_with_ddp=False), tf_config=provider,
                                         hf_config=hf_config, bridge=bridge, provider=provider, peft_cls=peft_cls,
                                         peft_config={} if peft_cls is not None else None)
        provider._pre_wrap_hooks = []  # verl registers its hooks on the provider for each build
        return _adapters(module)

    out = {"actor": build()}
    if with_integration:
        with building("reference"):
            out["reference"] = build()
        from megatron.bridge.peft.lora import LoRA

        out["verl_own_lora"] = build(LoRA(target_modules=["linear_qkv", "linear_fc1"], dim=4, alpha=8))
    return out


@pytest.fixture(scope="module")
def builds():
    config = tiny_qwen3_moe_config(num_experts=4)
    return {flag: run_distributed(verl_build_worker, 1, (config, flag), timeout_s=600)[0] for flag in (False, True)}


def test_without_the_integration_verls_build_has_no_lora(builds):
    assert builds[False]["actor"] == []


def test_with_the_integration_verls_actor_build_gets_the_declared_lora(builds):
    adapters = builds[True]["actor"]
    assert adapters and {name.rsplit(".", 2)[-2] for name in adapters} == {"linear_qkv", "linear_fc1"}
    assert any(".experts.local_experts." in name for name in adapters)


def test_a_reference_built_through_verl_gets_no_lora(builds):
    assert builds[True]["reference"] == []


def test_verls_own_lora_is_not_applied_twice(builds):
    assert builds[True]["verl_own_lora"] == builds[True]["actor"]

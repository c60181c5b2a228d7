"""The trainer kit against the real Megatron-Bridge: MoE runtime settings, the GLM-4.7-Flash bridge,
per-stage seeds and the loss-scale wiring."""

from __future__ import annotations

import pytest

from moe_lora_plugins.testing.tiny_models import tiny_qwen3_moe_config

pytestmark = pytest.mark.megatron


@pytest.fixture
def provider():
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    from megatron.bridge import AutoBridge

    from moe_lora_plugins.testing.tiny_models import _FUSIONS_OFF

    provider = AutoBridge.from_hf_config(tiny_qwen3_moe_config()).to_megatron_provider(load_weights=False)
    provider.use_cpu_initialization = True
    for name in _FUSIONS_OFF:  # the TE-only fusions, off on the CPU as in every megatron-lane build
        if hasattr(provider, name):
            setattr(provider, name, False)
    return provider


def test_the_five_moe_settings_reach_the_finalized_provider(provider):
    from moe_lora_plugins.trainer.moe_runtime import MoeRuntimeConfig

    config = MoeRuntimeConfig.from_mapping({"moe_token_dispatcher_type": "alltoall",
                                            "moe_router_load_balancing_type": "none", "moe_grouped_gemm": False,
                                            "moe_router_score_function": "sigmoid",
                                            "moe_router_enable_expert_bias": True})
    before = (provider.moe_token_dispatcher_type, provider.moe_router_score_function,
              provider.moe_router_enable_expert_bias)
    changed = config.apply(provider)
    provider.finalize()
    assert before != ("alltoall", "sigmoid", True)  # the bridge's defaults differ: applying them matters
    assert (provider.moe_token_dispatcher_type, provider.moe_router_load_balancing_type, provider.moe_grouped_gemm,
            provider.moe_router_score_function, provider.moe_router_enable_expert_bias) == (
        "alltoall", "none", False, "sigmoid", True)
    assert "moe_router_enable_expert_bias" in changed


def test_expert_bias_with_softmax_routing_is_refused_before_megatron_would_fail(provider):
    from moe_lora_plugins.trainer.moe_runtime import MoeRuntimeConfig, MoeRuntimeConfigError

    config = MoeRuntimeConfig(router_score_function="softmax", router_enable_expert_bias=True)
    with pytest.raises(MoeRuntimeConfigError, match="moe_router_enable_expert_bias=True with moe_router_score_function='softmax'"):
        config.apply(provider)
    provider.moe_router_score_function, provider.moe_router_enable_expert_bias = "softmax", True
    with pytest.raises(ValueError, match="Expert bias"):  # what Megatron-Core says, later, at finalize
        provider.finalize()


def test_an_unknown_dispatcher_is_refused_naming_the_accepted_values():
    from moe_lora_plugins.trainer.moe_runtime import MoeRuntimeConfig, MoeRuntimeConfigError

    with pytest.raises(MoeRuntimeConfigError, match=r"moe_token_dispatcher_type='all2all': use one of \['allgather'"):
        MoeRuntimeConfig(token_dispatcher_type="all2all").validate()


def test_the_glm47_flash_bridge_is_registered_only_where_megatron_bridge_has_none():
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    from megatron.bridge.models.conversion import model_bridge
    from megatron.bridge.models.deepseek.deepseek_v3_bridge import DeepSeekV3Bridge

    from moe_lora_plugins.trainer.glm_bridge import ARCHITECTURE, ensure_glm47_flash_bridge, registered_bridge

    native = registered_bridge()
    assert native is not None  # megatron-bridge 0.6.2 ships GLM47FlashBridge
    assert ensure_glm47_flash_bridge() is False
    assert registered_bridge() is native  # never overridden
    table = model_bridge.get_model_bridge._exact_types
    saved = table.pop(ARCHITECTURE)
    try:
        assert registered_bridge() is None  # an older Megatron-Bridge: no bridge answers
        assert ensure_glm47_flash_bridge() is True
        bridge = registered_bridge()(None)
        assert isinstance(bridge, DeepSeekV3Bridge) and type(bridge).__name__ == "MoeLoraGlm47FlashBridge"
    finally:
        table[ARCHITECTURE] = saved
        model_bridge.get_model_bridge._dispatch_cache.clear()


def test_pipeline_stages_get_distinct_seeds_and_the_same_stage_the_same_stream():
    import torch

    from moe_lora_plugins.trainer.seeding import pipeline_stage_seed

    assert [pipeline_stage_seed(1234, pp) for pp in range(3)] == [1234, 1334, 1434]
    streams = []
    for pp in (0, 1, 0):
        torch.manual_seed(pipeline_stage_seed(1234, pp))
        streams.append(torch.randn(4))
    assert torch.equal(streams[0], streams[2]) and not torch.equal(streams[0], streams[1])


def test_grad_scale_func_is_the_optimizers_loss_scale_on_every_chunks_config(provider):
    import torch

    from moe_lora_plugins.trainer.grad_scale import wire_grad_scale_func

    provider.finalize()

    class Chunk(torch.nn.Module):  # a wrapped chunk: the config sits one .module down, as under DDP
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Module()
            self.module.config = provider

    class LossScaledOptimizer:  # Megatron's optimizers put their scale on CUDA; the wiring is what is tested
        def scale_loss(self, loss):
            return loss * 1024.0

    chunks = [Chunk(), Chunk()]
    assert getattr(provider, "grad_scale_func", None) is None  # unset unless wired
    wire_grad_scale_func(chunks, LossScaledOptimizer())
    assert provider.grad_scale_func(torch.tensor(2.0)).item() == 2048.0
    with pytest.raises(TypeError, match="has no scale_loss"):
        wire_grad_scale_func(chunks, object())

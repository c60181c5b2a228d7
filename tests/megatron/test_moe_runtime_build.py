"""The five MoE runtime settings from slime's / miles' ``--moe-*`` flags reach the provider before ``finalize()``.

Real Megatron-Bridge on the CPU (gloo, world size 1): ``integrations.megatron_init.init(args)`` reads the
flags into a validated ``MoeRuntimeConfig``; the ``megatron_bridge.moe_runtime_finalize`` patch applies
it when the host's code calls ``provider.finalize()``, so the model built afterwards carries the settings
(in its config and in the modules Megatron-Core chose from them). A flag at Megatron-Core's default keeps
the provider's value; bad values are refused naming the value and the fix.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import WORLD_SIZE_1, tiny_qwen3_moe_config

pytestmark = pytest.mark.megatron

ALL_FIVE = dict(moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type=["seq_aux_loss"],
                moe_grouped_gemm=True, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
# A model is built on the CPU with the two settings that do not need CUDA at construction: Megatron-Core
# 0.19.2 makes a CUDA stream in the alltoall dispatcher's __init__ and allocates the expert bias on
# torch.cuda.current_device(), and grouped GEMM needs Transformer Engine. All five are checked on the
# finalized provider (upstream's finalize() ran on them).
BUILDABLE = dict(moe_router_load_balancing_type=["seq_aux_loss"], moe_router_score_function="sigmoid")


def _settings(chunks: list[Any]) -> dict[str, Any]:
    config = chunks[0].config
    moe = [m for c in chunks for m in c.modules() if type(m).__name__ == "MoELayer"]
    return {
        "dispatcher": config.moe_token_dispatcher_type,
        "load_balancing": config.moe_router_load_balancing_type,
        "grouped_gemm": config.moe_grouped_gemm,
        "score": config.moe_router_score_function,
        "expert_bias": config.moe_router_enable_expert_bias,
        "dispatcher_class": sorted({type(m.token_dispatcher).__name__ for m in moe}),
        "router_has_bias": sorted({getattr(m.router, "expert_bias", None) is not None for m in moe}),
    }


def build_worker(hf_config: Any) -> dict[str, Any]:
    from moe_lora_plugins.hooks.build import set_build_config
    from moe_lora_plugins.integrations.megatron_init import init
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu
    from moe_lora_plugins.testing.tiny_models import build_lora_model
    from moe_lora_plugins.trainer.moe_runtime import MoeRuntimeConfigError

    prepare_megatron_cpu()
    out: dict[str, Any] = {"before_init": _settings(build_lora_model(hf_config, WORLD_SIZE_1, lora=None).model)}
    init(Namespace(enable_lora=False, seed=1234, **BUILDABLE))
    out["after_init"] = _settings(build_lora_model(hf_config, WORLD_SIZE_1, lora=None).model)
    from megatron.bridge import AutoBridge

    init(Namespace(enable_lora=False, seed=1234, **ALL_FIVE))
    provider = AutoBridge.from_hf_config(hf_config).to_megatron_provider(load_weights=False)
    provider.moe_permute_fusion = False  # host code, like the tiny builder: fused permutation needs TE
    provider.finalize()  # what slime / miles do after setting the parallel sizes
    out["finalized"] = {name: getattr(provider, name) for name in ALL_FIVE}
    # Flags at Megatron-Core's defaults (what the parser leaves when they are not given) keep the provider's values.
    init(Namespace(enable_lora=False, seed=1234, moe_token_dispatcher_type="allgather",
                   moe_router_load_balancing_type=["aux_loss"], moe_grouped_gemm=False,
                   moe_router_score_function="softmax", moe_router_enable_expert_bias=False))
    out["defaults_only"] = _settings(build_lora_model(hf_config, WORLD_SIZE_1, lora=None).model)
    # Expert bias on a softmax-routed provider: refused at finalize, with the provider's value named.
    init(Namespace(enable_lora=False, seed=1234, moe_router_enable_expert_bias=True))
    try:
        build_lora_model(hf_config, WORLD_SIZE_1, lora=None)
        out["bias_on_softmax"] = None
    except MoeRuntimeConfigError as exc:
        out["bias_on_softmax"] = str(exc)
    set_build_config(None)
    return out


@pytest.fixture(scope="module")
def outcome():
    return run_distributed(build_worker, 1, (tiny_qwen3_moe_config(num_experts=4),), timeout_s=600)[0]


def test_without_the_flags_the_provider_keeps_megatron_bridges_values(outcome):
    assert outcome["before_init"]["dispatcher"] == "allgather"  # set by the host code (the tiny builder)
    assert outcome["before_init"]["score"] == "softmax"
    assert outcome["before_init"]["expert_bias"] is False


def test_the_hosts_moe_flags_are_applied_before_finalize_and_the_built_model_carries_them(outcome):
    after, before = outcome["after_init"], outcome["before_init"]
    assert after["load_balancing"] == "seq_aux_loss"  # the parser's one-element list, as Megatron-Core takes it
    assert after["score"] == "sigmoid"
    assert before["load_balancing"] == "aux_loss" and before["score"] == "softmax"
    # the rest is the provider's: the host code's allgather, no expert bias, no grouped GEMM
    assert after["dispatcher"] == "allgather" and after["dispatcher_class"] == ["MoEAllGatherTokenDispatcher"]
    assert after["expert_bias"] is False and after["router_has_bias"] == [False]
    assert after["grouped_gemm"] is False


def test_all_five_flags_are_on_the_finalized_provider(outcome):
    assert outcome["finalized"] == {"moe_token_dispatcher_type": "alltoall",
                                    "moe_router_load_balancing_type": "seq_aux_loss", "moe_grouped_gemm": True,
                                    "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True}


def test_flags_at_megatrons_defaults_keep_the_providers_values(outcome):
    assert outcome["defaults_only"] == outcome["before_init"]


def test_expert_bias_on_a_softmax_provider_is_refused_at_finalize_naming_the_fix(outcome):
    message = outcome["bias_on_softmax"]
    assert message is not None
    assert "moe_router_score_function='softmax'" in message and "sigmoid" in message


@pytest.mark.parametrize(("flags", "named"), [
    ({"moe_token_dispatcher_type": "all2all"}, ["'all2all'", "alltoall"]),
    ({"moe_router_load_balancing_type": ["aux-loss"]}, ["'aux-loss'", "seq_aux_loss"]),
    ({"moe_router_score_function": "tanh"}, ["'tanh'", "sigmoid"]),
])
def test_bad_flags_are_refused_by_init_naming_the_value_and_the_choices(flags, named):
    from moe_lora_plugins.hooks.build import set_build_config
    from moe_lora_plugins.integrations.megatron_init import init
    from moe_lora_plugins.trainer.moe_runtime import MoeRuntimeConfigError

    try:
        with pytest.raises(MoeRuntimeConfigError) as info:
            init(Namespace(enable_lora=False, **flags))
        for text in named:
            assert text in str(info.value)
    finally:
        set_build_config(None)

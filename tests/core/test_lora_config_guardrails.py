"""validate_lora_config: every combination that cannot work is refused with the flag and the reason."""

from __future__ import annotations

import argparse

import pytest

from moe_lora_plugins.lora_config import (
    BridgeFacts,
    EngineFacts,
    LoraConfig,
    LoraConfigError,
    ModelFacts,
    add_lora_arguments,
    validate_lora_config,
)

MOE = ModelFacts(family="moe", num_moe_experts=8, moe_grouped_gemm=False, expert_tensor_parallel_size=1)
BRIDGE_062 = BridgeFacts(frozenset({"target_modules", "dim", "alpha", "share_expert_adapters", "experts_shared_outer_loras"}))


def _refusal(config: LoraConfig, **facts) -> str:
    with pytest.raises(LoraConfigError) as info:
        validate_lora_config(config, **facts)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


def test_a_sound_moe_configuration_passes_every_check():
    validate_lora_config(
        LoraConfig(enabled=True, target_modules=("linear_qkv", "linear_fc1", "router"), sync_mode="merged"),
        model=MOE,
        bridge=BRIDGE_062,
        engine=EngineFacts("sglang", serves_lora=False),
    )


def test_nothing_is_checked_when_lora_is_off():
    validate_lora_config(LoraConfig(enabled=False, rank=0, alpha=-1))


@pytest.mark.parametrize("rank", [0, -4])
def test_rank_must_be_positive(rank):
    message = _refusal(LoraConfig(enabled=True, rank=rank))
    assert message.startswith("--lora-rank must be a positive integer")
    assert repr(rank) in message


@pytest.mark.parametrize("alpha", [0.0, -16.0])
def test_alpha_must_be_positive(alpha):
    message = _refusal(LoraConfig(enabled=True, alpha=alpha))
    assert message.startswith("--lora-alpha must be > 0")
    assert repr(alpha) in message


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_dropout_must_be_a_probability_below_one(dropout):
    assert _refusal(LoraConfig(enabled=True, dropout=dropout)).startswith("--lora-dropout must be in [0, 1)")


def test_empty_target_list_is_refused():
    assert "--lora-target-modules is empty" in _refusal(LoraConfig(enabled=True, target_modules=()))


def test_unknown_choice_values_are_refused_when_the_dataclass_is_built_by_hand():
    problems = pytest.raises(LoraConfigError, validate_lora_config,
                             LoraConfig(enabled=True, expert_adapters="each", sync_mode="full")).value.problems
    assert any(p.startswith("--lora-expert-adapters must be one of") for p in problems)
    assert any(p.startswith("--lora-sync-mode must be one of") for p in problems)


def test_a_target_unknown_for_the_model_family_is_refused():
    message = _refusal(LoraConfig(enabled=True, target_modules=("router",)), model=ModelFacts(family="gpt"))
    assert message.startswith("--lora-target-modules 'router' is not a LoRA target of a gpt model")


def test_a_target_absent_from_the_built_model_is_refused():
    names = ["decoder.layers.0.self_attention.linear_qkv", "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1"]
    message = _refusal(LoraConfig(enabled=True, target_modules=("linear_qkv", "router")), model=MOE, model_module_names=names)
    assert "'router' is not a LoRA target" in message
    assert "in this model: linear_fc1, linear_qkv" in message


def test_a_wildcard_that_matches_no_module_is_refused():
    names = ["decoder.layers.0.self_attention.linear_qkv"]
    message = _refusal(LoraConfig(enabled=True, target_modules=("*.layers.7.*.linear_qkv",)), model=MOE, model_module_names=names)
    assert "pattern '*.layers.7.*.linear_qkv' matches no module" in message


def test_hf_names_for_part_of_a_fused_projection_are_refused():
    message = _refusal(LoraConfig(enabled=True, target_modules=("q_proj", "v_proj")))
    assert message.startswith("--lora-target-modules names q_proj, v_proj without k_proj")
    assert "fused linear_qkv" in message


def test_hf_aliases_and_all_linear_resolve_to_megatron_names():
    assert LoraConfig(target_modules=("q_proj", "k_proj", "v_proj", "down_proj")).megatron_targets() == [
        "linear_qkv", "linear_fc2"
    ]
    assert LoraConfig(target_modules=("all-linear",)).megatron_targets() == [
        "linear_fc1", "linear_fc2", "linear_proj", "linear_qkv"
    ]


@pytest.mark.parametrize("mode", ["shared", "shared-outer"])
def test_shared_expert_adapters_need_grouped_gemm_experts(mode):
    message = _refusal(LoraConfig(enabled=True, expert_adapters=mode), model=MOE)
    assert message.startswith(f"--lora-expert-adapters {mode} needs grouped-GEMM experts")


def test_expert_tp_with_expert_fc1_is_refused_when_the_bridge_splits_gate_up_wrongly():
    model = ModelFacts(family="moe", num_moe_experts=8, moe_grouped_gemm=True, expert_tensor_parallel_size=2)
    message = _refusal(LoraConfig(enabled=True), model=model, bridge=BRIDGE_062)
    assert message.startswith("--lora-target-modules includes expert linear_fc1 with expert-TP 2")
    fixed = BridgeFacts(BRIDGE_062.lora_fields, expert_tp_fc1_split_ok=True)
    validate_lora_config(LoraConfig(enabled=True), model=model, bridge=fixed)
    validate_lora_config(LoraConfig(enabled=True, target_modules=("linear_qkv", "linear_fc2")), model=model, bridge=BRIDGE_062)


@pytest.mark.parametrize(("mode", "field"), [("per-expert", "share_expert_adapters"), ("shared-outer", "experts_shared_outer_loras")])
def test_expert_adapter_modes_the_installed_bridge_lacks_are_refused(mode, field):
    old_bridge = BridgeFacts(frozenset({"target_modules", "dim", "alpha"}))
    model = ModelFacts(family="moe", num_moe_experts=8, moe_grouped_gemm=True)
    message = _refusal(LoraConfig(enabled=True, expert_adapters=mode), model=model, bridge=old_bridge)
    assert message.startswith(f"--lora-expert-adapters {mode} needs Megatron-Bridge's LoRA.{field}")


def test_a_merged_weight_engine_with_the_adapter_sync_mode_is_refused():
    message = _refusal(LoraConfig(enabled=True, sync_mode="adapter"), engine=EngineFacts("sglang", serves_lora=False))
    assert message.startswith("--lora-sync-mode adapter sends LoRA tensors, but the sglang engine serves merged weights")


def test_router_adapters_cannot_be_synced_as_adapters():
    message = _refusal(LoraConfig(enabled=True, target_modules=("router",), sync_mode="adapter"), engine=EngineFacts("vllm"))
    assert message.startswith("--lora-target-modules includes router, but vllm cannot serve LoRA on the MoE router")


def test_rank_above_the_engine_max_lora_rank_is_refused():
    message = _refusal(LoraConfig(enabled=True, rank=64), engine=EngineFacts("vllm", max_lora_rank=32))
    assert message.startswith("--lora-rank 64 exceeds the vllm engine's max LoRA rank 32")


def test_all_problems_are_reported_together():
    with pytest.raises(LoraConfigError) as info:
        validate_lora_config(LoraConfig(enabled=True, rank=0, alpha=0.0))
    assert len(info.value.problems) == 2
    assert "--lora-rank" in str(info.value) and "--lora-alpha" in str(info.value)


def test_flags_parse_into_the_dataclass():
    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    args = parser.parse_args(
        ["--enable-lora", "--lora-target-modules", "linear_qkv,linear_proj", "router", "--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0.05", "--lora-expert-adapters", "shared-outer", "--lora-sync-mode", "merged"]
    )
    config = LoraConfig.from_args(args)
    assert config == LoraConfig(
        enabled=True, target_modules=("linear_qkv", "linear_proj", "router"), rank=8, alpha=16.0, dropout=0.05,
        expert_adapters="shared-outer", sync_mode="merged",
    )
    assert config.scale == 2.0


def test_defaults_without_flags_are_the_dataclass_defaults():
    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    assert LoraConfig.from_args(parser.parse_args([])) == LoraConfig()


def test_flags_a_host_already_defines_are_left_to_the_host():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-rank", type=int, default=4)
    add_lora_arguments(parser)
    assert LoraConfig.from_args(parser.parse_args(["--enable-lora"])).rank == 4


def test_a_bad_choice_on_the_command_line_is_refused_by_argparse(capsys):
    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-expert-adapters", "each"])
    assert "--lora-expert-adapters" in capsys.readouterr().err

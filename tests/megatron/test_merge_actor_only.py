"""The built-in on_build_model hook puts LoRA on the actor only and validates against the built model."""

from __future__ import annotations

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import tiny_qwen3_moe_config

from .merge_workers import actor_only_worker

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def outcome():
    [result] = run_distributed(actor_only_worker, 1, (tiny_qwen3_moe_config(),))
    return result


def test_reference_and_critic_models_are_left_without_lora_and_fully_trainable(outcome):
    for role in ("reference", "critic"):
        assert outcome[role]["adapters"] == 0
        assert outcome[role]["trainable"] == outcome[role]["total"]


def test_the_actor_gets_adapters_on_dense_and_expert_linears_and_a_frozen_base(outcome):
    actor = outcome["actor"]
    assert actor["adapters"] > 0
    assert any(".mlp.experts.local_experts." in name for name in actor["adapter_names"])
    assert 0 < actor["trainable"] < actor["total"]
    assert actor["trainable"] == actor["adapter_params"]


def test_the_pre_wrap_hook_applies_it_when_the_provider_builds_the_actor(outcome):
    assert outcome["via_pre_wrap_hook"]["adapters"] == outcome["actor"]["adapters"]


def test_a_target_missing_from_the_built_model_is_refused_before_any_change(outcome):
    assert "--lora-target-modules 'linear_q_down_proj' is not a LoRA target of a moe model" in outcome["refusal"]
    assert outcome["after_refusal"]["adapters"] == 0


def test_trainable_and_total_counts_are_logged_per_rank_once_per_actor_build(outcome):
    actor = outcome["actor"]
    expected = f"rank 0: {actor['trainable']} trainable of {actor['total']} parameters"
    assert sum(expected in message for message in outcome["log"]) == 2  # direct call + pre-wrap hook

"""Merge-on-export adds no persistent memory: its peak is the plain export's plus one working buffer,
while slime's backup approach holds a full copy of the model."""

from __future__ import annotations

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import LoraSettings, tiny_qwen3_moe_config

from .merge_workers import export_memory_worker

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

MIB = 1 << 20


@pytest.fixture(scope="module")
def peaks():
    config = tiny_qwen3_moe_config(hidden_size=256, moe_intermediate_size=256, intermediate_size=512, num_experts=8,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512)
    [result] = run_distributed(export_memory_worker, 1, (config, LoraSettings(dim=8, alpha=16, share_expert_adapters=False),
                                                         ("plain", "merge_on_export", "backup_merge")))
    return result


def test_merge_on_export_peak_is_the_plain_peak_plus_at_most_a_few_weight_buffers(peaks):
    extra = peaks["peaks"]["merge_on_export"] - peaks["peaks"]["plain"]
    assert extra <= 3 * peaks["largest_fp32_bytes"] + 4 * MIB, peaks


def test_merge_on_export_keeps_far_less_than_a_model_copy(peaks):
    assert peaks["peaks"]["merge_on_export"] < 0.25 * peaks["param_bytes"], peaks


def test_the_backup_approach_measurably_holds_a_full_copy(peaks):
    assert peaks["peaks"]["backup_merge"] >= 0.9 * peaks["param_bytes"], peaks

"""The demo's toy task: the reward is computed from the completion, advantages are centred per group."""

from __future__ import annotations

import pytest

from moe_lora_plugins.demo.task import FIRST_SYMBOL, CopyTask, group_advantages


def test_a_perfect_copy_earns_the_full_reward_and_noise_earns_nothing():
    task = CopyTask(length=4, alphabet=8)
    prompt = task.prompts(1, seed=3)[0]
    assert task.reward(prompt, task.target(prompt)) == pytest.approx(1.0)
    assert task.reward(prompt, [60, 61, 62, 63]) == 0.0


def test_symbols_in_the_wrong_places_earn_only_the_format_term():
    task = CopyTask(length=4, alphabet=8)
    prompt = [1, FIRST_SYMBOL, FIRST_SYMBOL, FIRST_SYMBOL, FIRST_SYMBOL, 3]
    assert task.reward(prompt, [FIRST_SYMBOL + 1] * 4) == pytest.approx(0.2)


def test_prompts_are_reproducible_from_the_seed():
    task = CopyTask()
    assert task.prompts(3, seed=7) == task.prompts(3, seed=7) != task.prompts(3, seed=8)


def test_group_advantages_are_centred_within_each_group_and_zero_for_equal_rewards():
    advantages = group_advantages([1.0, 0.0, 0.5, 0.5], group_size=2)
    assert advantages[0] == pytest.approx(1.0, abs=1e-5) and advantages[1] == pytest.approx(-1.0, abs=1e-5)
    assert advantages[2:] == [0.0, 0.0]

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


def test_echo_task_rewards_repeating_the_last_prompt_symbol():
    from moe_lora_plugins.demo.task import EchoTask

    task = EchoTask(length=2, alphabet=8)
    prompt = task.prompts(1, seed=5)[0]
    assert len(prompt) == task.prompt_len and task.target(prompt) == [prompt[-1]] * 2
    assert task.reward(prompt, task.target(prompt)) == pytest.approx(1.0)
    other = FIRST_SYMBOL if prompt[-1] != FIRST_SYMBOL else FIRST_SYMBOL + 1
    assert task.reward(prompt, [other, other]) == 0.0
    assert task.reward(prompt, [prompt[-1], other]) == pytest.approx(0.5)
    assert task.allowed_tokens() == list(range(FIRST_SYMBOL, FIRST_SYMBOL + 8)), "sampling is among the symbols"
    assert CopyTask().allowed_tokens() is None


def test_make_task_names_the_choices():
    from moe_lora_plugins.demo.task import make_task

    assert make_task("echo", 2, 16).completion_length == 2
    with pytest.raises(ValueError, match="choose from"):
        make_task("sort", 2, 16)


def test_the_reward_png_is_a_valid_image_of_the_curve(tmp_path):
    import struct
    import zlib

    from moe_lora_plugins.demo.plot import HEIGHT, WIDTH, write_reward_png

    path = write_reward_png(tmp_path / "curve.png", [0.1, 0.4, 0.9])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (WIDTH, HEIGHT)
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == HEIGHT * (1 + 3 * WIDTH)
    assert bytes((31, 119, 180)) in raw, "the curve's colour is drawn"
    assert not list(tmp_path.glob(".*.tmp")), "written atomically"

"""Support for the multi-LoRA megatron-lane tests: the tiny model, adapter specs, a seeded rollout sampler.

The sampler stands in for the rollout engine in trainer-only tests (the engine side has its own tests):
completions are token ids drawn from the adapter's own ``random.Random``, so a resumed run must restore
that RNG to draw the same completions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from moe_lora_plugins.demo.task import CopyTask
from moe_lora_plugins.multilora.controller import AdapterSpec, PromptCycle
from moe_lora_plugins.multilora.driver import GroupRequest

VOCAB = 64
COMPLETION = 4
TASK = CopyTask(length=COMPLETION)

SPEC_A = AdapterSpec("copy-a", rank=2, alpha=4.0, learning_rate=0.05, seed=1)  # every target, experts included
SPEC_B = AdapterSpec("copy-b", rank=4, alpha=2.0, targets=("linear_qkv", "linear_fc1", "linear_fc2"),
                     learning_rate=0.03, seed=2)
SPEC_C = AdapterSpec("late-c", rank=8, alpha=8.0, targets=("linear_proj", "linear_fc2"), experts=False,
                     learning_rate=0.04, seed=3)
SPEC_D = AdapterSpec("late-d", rank=1, alpha=1.0, targets=("linear_qkv",), learning_rate=0.02, seed=4)


def sample_rollout(requests: Sequence[GroupRequest], group_size: int) -> list[list[list[int]]]:
    """Each group's completions from its own seed (drawn by the driver from the adapter's RNG)."""
    out = []
    for request in requests:
        rng = random.Random(request.seed)
        out.append([[rng.randrange(3, VOCAB) for _ in range(COMPLETION)] for _ in range(group_size)])
    return out


def prompts_for(spec: AdapterSpec) -> PromptCycle:
    return PromptCycle(TASK.prompts(6, seed=100 + spec.seed), seed=spec.seed)


def reward(prompt: Sequence[int], completion: Sequence[int]) -> float:
    return TASK.reward(list(prompt), list(completion))

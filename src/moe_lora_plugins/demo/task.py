"""The demo's verifiable toy tasks; the reward is computed from the completion.

``EchoTask`` (the default): a prompt is ``<s> a b c``; every completion token should be the prompt's last
symbol ``c``. The reward is ``0.7 x`` the fraction of completion tokens equal to it ``+ 0.3 x`` the fraction
that are task symbols at all. A policy that only learned to emit symbols earns at most
``0.3 + 0.7 / alphabet``; more needs the prompt. ``CopyTask``, below, repeats the whole sequence.

A prompt is ``<s> a b c d =``; the completion should repeat ``a b c d``. The reward is
``0.8 * (fraction of positions copied right) + 0.2 * (fraction of completion tokens that are task
symbols at all)``: the small format term gives the policy gradient a signal even from a random
model, whose samples rarely hit an exact position. GRPO-style advantages are rewards centred (and
scaled) within each prompt's group.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lora_plugins.demo.model import BOS

SEPARATOR = 3  # the "=" token between the sequence and its copy
FIRST_SYMBOL = 4


@dataclass(frozen=True)
class EchoTask:
    """``symbols`` random symbols from ``alphabet`` tokens; the completion repeats the last one ``length`` times."""

    length: int = 2
    alphabet: int = 16
    symbols: int = 3

    @property
    def prompt_len(self) -> int:
        return self.symbols + 1

    @property
    def completion_length(self) -> int:
        return self.length

    def prompts(self, count: int, seed: int) -> list[list[int]]:
        import torch

        generator = torch.Generator().manual_seed(seed)
        drawn = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + self.alphabet, (count, self.symbols), generator=generator)
        return [[BOS, *row.tolist()] for row in drawn]

    def target(self, prompt: list[int]) -> list[int]:
        return [prompt[-1]] * self.length

    def is_symbol(self, token: int) -> bool:
        return FIRST_SYMBOL <= token < FIRST_SYMBOL + self.alphabet

    def reward(self, prompt: list[int], completion: list[int]) -> float:
        """0.7 x the fraction of completion tokens equal to the last prompt symbol + 0.3 x the fraction of symbols."""
        tokens = completion[: self.length]
        echoed = sum(int(t == prompt[-1]) for t in tokens) / self.length
        symbols = sum(int(self.is_symbol(t)) for t in tokens) / self.length
        return 0.7 * echoed + 0.3 * symbols


@dataclass(frozen=True)
class CopyTask:
    """``length`` symbols drawn from ``alphabet`` tokens (ids ``FIRST_SYMBOL ..``)."""

    length: int = 4
    alphabet: int = 8

    @property
    def prompt_len(self) -> int:
        return self.length + 2

    @property
    def completion_length(self) -> int:
        return self.length

    def prompts(self, count: int, seed: int) -> list[list[int]]:
        import torch

        generator = torch.Generator().manual_seed(seed)
        symbols = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + self.alphabet, (count, self.length), generator=generator)
        return [[BOS, *row.tolist(), SEPARATOR] for row in symbols]

    def target(self, prompt: list[int]) -> list[int]:
        return list(prompt[1 : 1 + self.length])

    def is_symbol(self, token: int) -> bool:
        return FIRST_SYMBOL <= token < FIRST_SYMBOL + self.alphabet

    def reward(self, prompt: list[int], completion: list[int]) -> float:
        """0.8 x the fraction of positions that repeat the prompt's symbol + 0.2 x the fraction of symbols."""
        target = self.target(prompt)
        copied = sum(int(a == b) for a, b in zip(completion, target, strict=False)) / len(target)
        symbols = sum(int(self.is_symbol(t)) for t in completion[: len(target)]) / len(target)
        return 0.8 * copied + 0.2 * symbols


TASKS = {"echo": EchoTask, "copy": CopyTask}


def make_task(name: str, length: int, alphabet: int) -> EchoTask | CopyTask:
    if name not in TASKS:
        raise ValueError(f"unknown demo task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](length=length, alphabet=alphabet)


def group_advantages(rewards: list[float], group_size: int) -> list[float]:
    """GRPO: each reward minus its group's mean, divided by the group's standard deviation (+ 1e-6)."""
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        std = (sum((r - mean) ** 2 for r in group) / len(group)) ** 0.5
        out += [(r - mean) / (std + 1e-6) for r in group]
    return out

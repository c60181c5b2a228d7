"""The demo's verifiable toy tasks; the reward is computed from the completion.

``EchoTask`` (the default): a prompt is ``<s> a b c``; every completion token should be the prompt's last
symbol ``c``; the engine samples among the task symbols only (vLLM's ``allowed_token_ids``: constrained
decoding, so a random model starts at chance, ``1 / alphabet``, instead of never emitting a symbol). The
reward is the fraction of completion tokens equal to ``c``. Log-probs on both sides are the model's
full-vocabulary log-softmax (vLLM's raw log-probs), so the on-policy comparison is unaffected.
``CopyTask`` repeats the whole sequence after ``=`` and samples from the whole vocabulary, with a format
term in its reward.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lora_plugins.demo.model import BOS

SEPARATOR = 3  # the "=" token between the sequence and its copy
FIRST_SYMBOL = 4


@dataclass(frozen=True)
class EchoTask:
    """``symbols`` random symbols from ``alphabet`` tokens; the completion repeats the last one ``length`` times."""

    length: int = 1
    alphabet: int = 4
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

    def allowed_tokens(self) -> list[int] | None:
        """The tokens the engine may sample: the task symbols."""
        return list(range(FIRST_SYMBOL, FIRST_SYMBOL + self.alphabet))

    def reward(self, prompt: list[int], completion: list[int]) -> float:
        """The fraction of completion tokens equal to the last prompt symbol."""
        tokens = completion[: self.length]
        return sum(int(t == prompt[-1]) for t in tokens) / self.length


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

    def allowed_tokens(self) -> list[int] | None:
        """Any token (the reward's format term teaches the symbols)."""
        return None

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

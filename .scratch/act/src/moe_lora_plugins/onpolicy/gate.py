"""The on-policy metric and gate: how far the trainer's log-probs are from the engine's, and what to do about it.

:func:`logprob_diff` is ``train_rollout_logprob_abs_diff`` (the masked mean of ``|train - rollout|``
over response tokens, miles' name and definition) plus what a report needs: the max, the count of
bitwise-equal tokens and the first differing (sequence, token). :func:`check_step` applies
``MOELORA_ONPOLICY_GATE``: ``exact`` fails any step whose diff is not 0.0, a tolerance fails above
it, ``off`` reports only. With ``locate_layer`` (a host callback that re-runs both sides layer by
layer for one sequence) the failure also names the first differing layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from moe_lora_plugins.errors import MoeLoraError


class OnPolicyGateError(MoeLoraError, AssertionError):
    """A step's train/rollout log-prob diff broke ``MOELORA_ONPOLICY_GATE``."""


@dataclass(frozen=True)
class LogprobDiff:
    """One step's comparison of the trainer's log-probs with the engine's."""

    train_rollout_logprob_abs_diff: float  # masked mean |train - rollout|
    max_abs_diff: float
    tokens: int
    bitwise_equal_tokens: int
    first_difference: tuple[int, int] | None  # (sequence, token) of the first token that differs

    @property
    def exact(self) -> bool:
        return self.bitwise_equal_tokens == self.tokens

    def as_dict(self) -> dict[str, Any]:
        return {"train_rollout_logprob_abs_diff": self.train_rollout_logprob_abs_diff,
                "max_abs_diff": self.max_abs_diff, "tokens": self.tokens,
                "bitwise_equal_tokens": self.bitwise_equal_tokens,
                "first_difference": list(self.first_difference) if self.first_difference else None}


def logprob_diff(train: Any, rollout: Any, mask: Any | None = None) -> LogprobDiff:
    """Compare ``[sequences, tokens]`` log-probs; ``mask`` (same shape, 1 = response token) selects what counts."""
    import torch

    train_t = torch.as_tensor(train, dtype=torch.float32)
    rollout_t = torch.as_tensor(rollout, dtype=torch.float32)
    if train_t.shape != rollout_t.shape:
        raise ValueError(f"trainer log-probs {tuple(train_t.shape)} and rollout log-probs {tuple(rollout_t.shape)} "
                         "differ in shape; pass one value per response token on both sides")
    keep = torch.ones_like(train_t, dtype=torch.bool) if mask is None else torch.as_tensor(mask).to(torch.bool)
    if keep.shape != train_t.shape:
        raise ValueError(f"mask {tuple(keep.shape)} does not match the log-probs {tuple(train_t.shape)}")
    if torch.isnan(train_t[keep]).any() or torch.isnan(rollout_t[keep]).any():
        raise ValueError("a response token's log-prob is NaN on one side: the comparison is meaningless")
    diff = (train_t - rollout_t).abs()
    differs = (train_t != rollout_t) & keep
    tokens = int(keep.sum())
    first = None
    if differs.any():
        seq, tok = (int(v) for v in differs.nonzero()[0])
        first = (seq, tok)
    return LogprobDiff(
        train_rollout_logprob_abs_diff=float(diff[keep].mean()) if tokens else 0.0,
        max_abs_diff=float(diff[keep].max()) if tokens else 0.0,
        tokens=tokens,
        bitwise_equal_tokens=tokens - int(differs.sum()),
        first_difference=first,
    )


def gate_setting(environ: Mapping[str, str] | None = None) -> str:
    from moe_lora_plugins.envs import parse_gate

    env = os.environ if environ is None else environ
    return parse_gate(env.get("MOELORA_ONPOLICY_GATE"))


def check_step(report: LogprobDiff, gate: str | None = None, step: int | None = None,
               locate_layer: Callable[[int], str | None] | None = None) -> LogprobDiff:
    """Apply the gate (``gate`` or ``MOELORA_ONPOLICY_GATE``) to one step's report; returns it when it passes."""
    gate = gate_setting() if gate is None else gate
    if gate == "off":
        return report
    if gate == "exact":
        failed = not report.exact
        limit = "exact (0.0)"
    else:
        tolerance = float(gate)
        failed = report.max_abs_diff > tolerance
        limit = f"tolerance {tolerance:g}"
    if not failed:
        return report
    where = ""
    if report.first_difference is not None:
        seq, tok = report.first_difference
        where = f"; first differing token: sequence {seq}, response token {tok}"
        if locate_layer is not None:
            layer = locate_layer(seq)
            where += f", first differing layer: {layer}" if layer else ", no layer differs (the head or sampler does)"
    label = f"step {step}: " if step is not None else ""
    raise OnPolicyGateError(
        f"{label}train_rollout_logprob_abs_diff = {report.train_rollout_logprob_abs_diff:.3e} (max "
        f"{report.max_abs_diff:.3e}, {report.bitwise_equal_tokens}/{report.tokens} tokens bitwise equal) breaks "
        f"MOELORA_ONPOLICY_GATE={gate} ({limit}){where}. Turn on MOELORA_TRUE_ON_POLICY in the trainer and the "
        "engine, or loosen the gate."
    )

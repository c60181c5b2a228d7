"""True on-policy mode: the trainer's log-probs equal the rollout engine's, bit for bit.

``enabled()`` is the one place every patch and plugin asks whether the mode is on in this process
(``MOELORA_TRUE_ON_POLICY``, parsed by :mod:`moe_lora_plugins.envs`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["enabled", "token_logprobs"]


def token_logprobs(logits, tokens):  # noqa: ANN001, ANN201 - thin re-export, typed in ops
    """The trainer-side log-probs hosts compute in true-on-policy mode (:func:`ops.token_logprobs`)."""
    from moe_lora_plugins.onpolicy import ops

    return ops.token_logprobs(logits, tokens)


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``MOELORA_TRUE_ON_POLICY`` is on in this process (a malformed value is an error)."""
    from moe_lora_plugins.envs import parse_bool

    env = os.environ if environ is None else environ
    return parse_bool("MOELORA_TRUE_ON_POLICY", env.get("MOELORA_TRUE_ON_POLICY"))

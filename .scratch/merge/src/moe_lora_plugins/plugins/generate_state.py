"""The built-in rollout lifecycle listener: :class:`~moe_lora_plugins.hooks.lifecycle.RolloutCounters`
(groups submitted / selected / completed / aborted per rollout, as a metrics dict).

Multi-LoRA routing and the true-on-policy gate plug in the same way, as listeners returned from
``moelora_generate_state_listeners``; a plugin that must replace the whole dispatch answers
``on_generate_state`` instead.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.hooks import hookimpl
from moe_lora_plugins.hooks.lifecycle import RolloutCounters


@hookimpl
def moelora_generate_state_listeners(args: Any) -> list[Any]:
    return [RolloutCounters()]

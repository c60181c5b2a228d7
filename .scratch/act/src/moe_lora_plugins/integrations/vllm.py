"""vLLM's ``vllm.general_plugins`` entry point: activates the suite in every vLLM process.

vLLM calls ``load_general_plugins()`` in the API server, the engine core and every worker, so this is
how patches reach worker processes that vLLM spawns. It honours ``MOELORA_PLUGINS``: installed but
switched off, it does nothing.
"""

from __future__ import annotations


def load_general_plugin() -> None:
    from moe_lora_plugins.envs import is_switched_on

    if not is_switched_on():
        return
    from moe_lora_plugins.activation import activate

    activate(role="vllm")

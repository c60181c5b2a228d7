"""SGLang's ``sglang.srt.plugins`` entry point: activates the suite in SGLang processes.

Present in recent SGLang releases only; on older ones use the ``.pth`` bootstrap
(``MOELORA_PLUGINS=on``). Honours ``MOELORA_PLUGINS`` like the vLLM entry point.
"""

from __future__ import annotations


def load_plugin() -> None:
    from moe_lora_plugins.envs import is_switched_on

    if not is_switched_on():
        return
    from moe_lora_plugins.activation import activate

    activate(role="sglang")

"""Ray: a ``runtime_env`` that switches the suite on in every actor and task of a job.

``runtime_env(...)`` returns a dict for ``ray.init(runtime_env=...)`` or ``.options(runtime_env=...)``:
it sets ``MOELORA_PLUGINS=on`` (the ``.pth`` bootstrap then activates in the worker), forwards the
other ``MOELORA_*`` switches of this process, and names ``setup_worker`` as the
``worker_process_setup_hook`` so a worker whose environment lacks the ``.pth`` still activates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from moe_lora_plugins.envs import SWITCH_NAMES

SETUP_HOOK = "moe_lora_plugins.integrations.ray.setup_worker"


def runtime_env(
    base: Mapping[str, Any] | None = None, *, role: str | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A copy of ``base`` with the switches and the setup hook added (``base``'s own values win)."""
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = dict(base or {})
    env_vars = {name: env[name] for name in SWITCH_NAMES if name in env}
    env_vars["MOELORA_PLUGINS"] = "on"
    if role is not None:
        env_vars["MOELORA_ROLE"] = role
    env_vars.update(dict(merged.get("env_vars") or {}))
    merged["env_vars"] = env_vars
    if "worker_process_setup_hook" in merged and merged["worker_process_setup_hook"] != SETUP_HOOK:
        raise ValueError(
            f"runtime_env already has worker_process_setup_hook={merged['worker_process_setup_hook']!r}; "
            f"call {SETUP_HOOK} from it instead, or drop it here."
        )
    merged["worker_process_setup_hook"] = SETUP_HOOK
    return merged


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: activate in this worker with the role from the env."""
    from moe_lora_plugins.activation import activate

    activate(role=os.environ.get("MOELORA_ROLE") or "ray-worker")

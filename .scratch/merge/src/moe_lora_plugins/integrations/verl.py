"""verl: ``actor_rollout_ref.model.external_lib=moe_lora_plugins.integrations.verl``.

verl imports every module named in ``external_lib`` in each worker that builds a model config
(``HFModelConfig.__post_init__`` -> ``verl.utils.import_utils.import_external_libs``, verl 0.9.1), before
its Megatron engine builds the model with ``verl.utils.megatron_utils.make_megatron_module``, which ends
in Megatron-Bridge's ``provide_distributed_model``. Importing this module there:

- activates the suite as role ``trainer`` (the export patches, the build seam);
- declares a build configuration without LoRA, so every model verl builds reaches the plugins'
  ``on_build_model`` before DDP wrapping (verl's own ``model.lora`` LoRA, if on, is applied first and
  left alone).

To have this suite's LoRA (validated, actor only, per-expert / shared / shared-outer expert adapters)
instead of verl's, leave verl's ``model.lora.rank`` at 0 and name a module of your own in
``external_lib`` that calls :func:`use_lora`::

    # my_lora.py
    from moe_lora_plugins.integrations.verl import use_lora
    from moe_lora_plugins.lora_config import LoraConfig
    use_lora(LoraConfig(enabled=True, rank=16, alpha=32, expert_adapters="per-expert"))

verl builds the reference policy of a LoRA run inside the actor (``ref_in_actor``: adapters
disabled); a separately built reference model must be built inside
``moe_lora_plugins.hooks.build.building("reference")`` to stay without LoRA.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.activation import activate
from moe_lora_plugins.hooks.build import build_config, declare_build

activate(role="trainer")
if build_config() is None:
    declare_build()


def use_lora(lora: Any) -> None:
    """Give every actor verl builds in this process ``lora`` (a ``LoraConfig``) through ``on_build_model``."""
    from moe_lora_plugins.lora_config import validate_lora_config

    validate_lora_config(lora)
    declare_build(lora)

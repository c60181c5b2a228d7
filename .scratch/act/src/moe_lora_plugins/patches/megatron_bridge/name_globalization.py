"""Patch: Megatron-Bridge's local -> global parameter naming, adapters included, EP independent of PP.

Replaces ``megatron.bridge.models.conversion.model_bridge._megatron_local_name_to_global``. Upstream
never renumbers ``.adapter.`` parameters across EP ranks, so SequentialMLP expert adapters of every
EP rank carry the numbers ``0..E/EP-1``. Ours numbers them like their base weights, computes the EP
part whatever the PP size (upstream PR #4592 binds the layer module only under PP > 1), and leaves
grouped adapters and legacy ``experts.weight1/2`` alone (they carry no expert number). The naming
math is :func:`moe_lora_plugins.topology.globalize_megatron_name`.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from moe_lora_plugins.registry import PatchSpec

_LAYER_PREFIX = re.compile(r"^(.+?\.layers\.\d+)")

SPECS = (
    PatchSpec(
        id="megatron_bridge.local_name_to_global",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.model_bridge",
        attribute="_megatron_local_name_to_global",
        kind="replace",
        implementation="moe_lora_plugins.patches.megatron_bridge.name_globalization:local_name_to_global",
        fingerprint="(models, config, param_name, vp_stage=)",
        why=(
            "LoRA adapters of SequentialMLP experts keep their EP-local expert number, so under EP > 1 "
            "export_adapter_weights emits experts 0..E/EP-1 only and merged exports merge the wrong "
            "expert's delta."
        ),
        upstream="Megatron-Bridge 0.6.2 model_bridge._megatron_local_name_to_global; PR #4592 (open) would "
        "tie EP renumbering to PP > 1",
        remove_when="Megatron-Bridge renumbers .adapter. expert parameters across EP ranks, with a test "
        "for EP > 1 at PP = 1",
        aliases=(),
        roles=None,
        verified="megatron-bridge 0.6.2: CPU gloo EP=2/4, PP=2xEP=2, PP=2xVPP=2, ETP=2; 2xH200 NCCL bf16. "
        "0.4.0 (read, not run): same signature, but renumbers only grouped weight{e} under EP and never "
        "local_experts.{e}; left out of the range until run there.",
        requires=(
            "megatron.bridge.models.conversion.model_bridge:_get_pp_group",
            "megatron.bridge.models.conversion.utils:get_module_and_param_from_name",
            "megatron.core.utils:get_pg_size",
            "megatron.core.transformer.module:MegatronModule",
        ),
    ),
)


# Per model (weakly held first chunk): {(chunk count, vp_stage, local name): global name}. A live
# model's layout never changes, and the bridge asks for every name again on every export.
_cache: weakref.WeakKeyDictionary[Any, dict[tuple[int, int | None, str], str]] = weakref.WeakKeyDictionary()


def local_name_to_global(models: Any, config: Any, param_name: str, vp_stage: int | None = None) -> str:
    """World-size-1 name of ``param_name`` (local to this rank and VPP stage ``vp_stage``), cached per model."""
    chunks = models if isinstance(models, list) else [models]
    try:
        per_model = _cache.setdefault(chunks[0], {})
    except TypeError:  # not weak-referenceable: compute every time
        return _local_name_to_global(models, config, param_name, vp_stage)
    key = (len(chunks), vp_stage, param_name)
    name = per_model.get(key)
    if name is None:
        name = per_model[key] = _local_name_to_global(models, config, param_name, vp_stage)
    return name


def _local_name_to_global(models: Any, config: Any, param_name: str, vp_stage: int | None) -> str:
    from megatron.bridge.models.conversion import model_bridge
    from megatron.bridge.models.conversion.utils import get_module_and_param_from_name
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.utils import get_pg_size

    from moe_lora_plugins.patches.megatron_bridge._export_common import ep_group, group_size_rank
    from moe_lora_plugins.topology.naming import globalize_megatron_name

    global_layer = None
    if "layers." in param_name and get_pg_size(model_bridge._get_pp_group(models)) > 1:
        match = _LAYER_PREFIX.match(param_name)
        if match is not None:
            _, layer_module = get_module_and_param_from_name(
                models=models, param_name=match.group(1), vp_stage=vp_stage
            )
            if isinstance(layer_module, MegatronModule) and hasattr(layer_module, "layer_number"):
                global_layer = layer_module.layer_number - 1
    ep_size, ep_rank = 1, 0
    if ".experts." in param_name:
        ep_size, ep_rank = group_size_rank(ep_group(models))
    return globalize_megatron_name(
        param_name,
        global_layer=global_layer,
        ep_rank=ep_rank,
        ep_size=ep_size,
        num_experts=getattr(config, "num_moe_experts", None),
    )

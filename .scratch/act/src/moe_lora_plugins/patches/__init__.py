"""The patch modules, one per upstream symbol, grouped by target package.

Each module listed in ``SPEC_MODULES`` declares ``SPECS`` (a tuple of PatchSpec) at top level and
imports nothing heavy there: the implementations import their upstream package inside the function
bodies. Collecting the specs therefore costs only the import of these small modules.
"""

from __future__ import annotations

import importlib

from moe_lora_plugins.registry import PatchSpec

SPEC_MODULES: tuple[str, ...] = (
    "moe_lora_plugins.patches.megatron_bridge.name_globalization",
    "moe_lora_plugins.patches.megatron_bridge.fc1_split",
    "moe_lora_plugins.patches.megatron_bridge.adapter_export",
    "moe_lora_plugins.patches.megatron_bridge.merge_adapter",
    "moe_lora_plugins.patches.megatron_bridge.weight_export",
    "moe_lora_plugins.patches.megatron_bridge.build_hooks",
    "moe_lora_plugins.patches.megatron_bridge.moe_runtime_finalize",
    "moe_lora_plugins.patches.megatron_bridge.qwen3_moe_dense_layers",
    "moe_lora_plugins.patches.megatron_bridge.modelopt_probe",
    "moe_lora_plugins.patches.megatron_bridge.onpolicy_lora",
    "moe_lora_plugins.patches.megatron_core.onpolicy",
    "moe_lora_plugins.patches.megatron_bridge.grouped_expert_lora",
    "moe_lora_plugins.patches.megatron_bridge.conversion_tasks_cache",
    "moe_lora_plugins.patches.vllm.tensor_lora",
    "moe_lora_plugins.patches.vllm.cpu_moe_lora",
    "moe_lora_plugins.patches.vllm.punica_index",
    "moe_lora_plugins.patches.vllm.onpolicy",
)


def all_specs() -> list[PatchSpec]:
    specs: list[PatchSpec] = []
    for module_name in SPEC_MODULES:
        specs.extend(importlib.import_module(module_name).SPECS)
    return specs

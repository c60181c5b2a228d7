"""Our model-family tables agree with Megatron-Bridge's own weight mappings, module by module.

For every rule of a family, the bridge's mapping registry must send the Megatron base weight of
that module to exactly the HF weights our table names (in the same q/k/v or gate/up order).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.megatron


def _hf_config(model_type: str):
    import transformers

    classes = {
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
        "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    }
    config_cls, arch = classes[model_type]
    # A Qwen3-MoE with a dense layer 0, so the table's dense-MLP rules have a bridge mapping to meet.
    extra = {"mlp_only_layers": [0]} if model_type == "qwen3_moe" else {}
    return getattr(transformers, config_cls)(num_hidden_layers=2, architectures=[arch], **extra)


def _mapping_registry(model_type: str):
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_config(_hf_config(model_type))._model_bridge
    if model_type == "qwen3_moe":  # Megatron-Bridge 0.6 has no dense-layer mappings for it; our patch adds them
        from moe_lora_plugins.patches.megatron_bridge.qwen3_moe_dense_layers import mappings_with_dense_mlp

        return mappings_with_dense_mlp(bridge.mapping_registry, bridge, (), {})
    return bridge.mapping_registry()


def _bridge_hf_names(registry, megatron_name: str) -> list[str] | None:
    mapping = registry.megatron_to_hf_lookup(megatron_name)
    if mapping is None:
        return None
    hf = mapping.hf_param
    return list(hf.values()) if isinstance(hf, dict) else [hf]


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe", "glm4_moe", "deepseek_v3"])
def test_family_table_matches_the_bridge_mapping(model_type):
    from moe_lora_plugins.lora.families import get_family
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    registry = _mapping_registry(model_type)
    family = get_family(model_type)
    mismatches = []
    rules = [(rule.megatron, rule.hf) for rule in family.modules]
    if family.experts is not None:
        rules += [("mlp.experts.linear_fc1", family.experts.fc1_rule(3).hf)]
        rules += [("mlp.experts.linear_fc2", family.experts.fc2_rule(3).hf)]
    checked = 0
    for megatron, hf in rules:
        want = [f"{family.hf_layer_prefix}.1.{name}.weight" for name in hf]
        candidates = [f"decoder.layers.1.{megatron}.weight"]
        if megatron.startswith("mlp.experts."):
            fc = megatron.rsplit(".", 1)[-1]
            candidates = [
                f"decoder.layers.1.mlp.experts.{fc}.weight3",
                f"decoder.layers.1.mlp.experts.local_experts.3.{fc}.weight",
            ]
        found = [names for names in (_bridge_hf_names(registry, c) for c in candidates) if names is not None]
        if not found:
            mismatches.append(f"{megatron}: the bridge maps no weight of it")
        elif any(names != want for names in found):
            mismatches.append(f"{megatron}: bridge {found}, table {want}")
        checked += 1
    assert not mismatches, "\n".join(mismatches)
    assert checked == len(rules)

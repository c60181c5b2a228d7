"""A real Megatron-Bridge adapter export, fed to the sync sender, passes the engine's sync validation.

The path a launcher takes: ``bridge.export_adapter_weights(model)`` on a trainer rank ->
``moe_lora_plugins.sync.sender.tensors_from_export`` (PEFT names) -> the receiver's
``check_adapter`` against what the served model needs (every layer, expert and projection, shape
and dtype). At EP=2 with the patches every rank's export passes; unpatched upstream's is refused,
naming the experts it lacks.
"""

from __future__ import annotations

from typing import Any

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import ParallelLayout, tiny_qwen3_moe_config

PEFT_CONFIG = {"r": 4, "lora_alpha": 8,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def validate_export(hf_config: Any, layout: ParallelLayout, activate: bool) -> dict[str, Any]:
    import torch

    from moe_lora_plugins.sync.errors import AdapterValidationError
    from moe_lora_plugins.sync.sender import tensors_from_export
    from moe_lora_plugins.sync.validation import check_adapter, expected_adapter
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names

    if activate:
        import moe_lora_plugins

        moe_lora_plugins.activate(role="trainer")
    built = build_lora_model(hf_config, layout, dtype=torch.float32)
    fill_from_global_names(built)
    tensors = tensors_from_export(built.bridge.export_adapter_weights(built.model, cpu=True, show_progress=False))
    try:
        check_adapter(tensors, expected_adapter(hf_config.to_dict(), PEFT_CONFIG, torch.float32), "export")
    except AdapterValidationError as exc:
        return {"tensors": len(tensors), "error": str(exc)}
    return {"tensors": len(tensors), "error": None}


@pytest.mark.parametrize("activate", [True, False], ids=["patched", "upstream"])
def test_an_ep2_adapter_export_passes_sync_validation_only_when_patched(activate):
    config = tiny_qwen3_moe_config(num_experts=4)
    results = run_distributed(validate_export, 2, (config, ParallelLayout(ep=2), activate), timeout_s=600)
    if activate:
        assert [r["error"] for r in results] == [None, None]
        assert results[0]["tensors"] == results[1]["tensors"] == 2 * config.num_hidden_layers * (4 + 3 * 4)
    else:
        for rank, result in enumerate(results):
            assert result["error"] is not None and "experts.2" in result["error"], (rank, result)

"""Without modelopt installed, upstream retries a failed ``import modelopt`` on every conversion task of
every export; with the patch an export looks it up no more, and every answer stays the same."""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import ParallelLayout, tiny_qwen3_moe_config


class _ModeloptLookups:
    """A meta-path finder that finds nothing and counts the lookups of ``modelopt`` modules."""

    def __init__(self) -> None:
        self.count = 0

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "modelopt" or fullname.startswith("modelopt."):
            self.count += 1


def count_lookups(hf_config: Any) -> dict[str, Any]:
    import importlib.util
    import sys

    import torch

    import moe_lora_plugins
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names, run_export

    assert importlib.util.find_spec("modelopt") is None, "this lane must not have modelopt installed"
    built = build_lora_model(hf_config, ParallelLayout(), dtype=torch.float32)
    fill_from_global_names(built)
    from megatron.bridge.models.conversion import param_mapping, utils

    upstream_fn = utils.is_modelopt_dynamic_module
    lookups = _ModeloptLookups()
    sys.meta_path.insert(0, lookups)
    counts, exports = {}, {}
    for phase in ("upstream", "patched"):
        if phase == "patched":
            moe_lora_plugins.activate(role="trainer")
            run_export(built, "plain")  # the first call may look once
        lookups.count = 0
        exports[phase] = run_export(built, "plain")
        counts[phase] = lookups.count
    modules = [m for chunk in built.model for m in chunk.modules()]
    return {
        "counts": counts,
        "same_export": [n for n, _ in exports["upstream"]] == [n for n, _ in exports["patched"]]
        and all(torch.equal(a, b) for (_, a), (_, b) in zip(exports["upstream"], exports["patched"], strict=True)),
        "same_answers": [upstream_fn(m) for m in modules] == [utils.is_modelopt_dynamic_module(m) for m in modules],
        "copy_rebound": param_mapping.is_modelopt_dynamic_module is utils.is_modelopt_dynamic_module
        and utils.is_modelopt_dynamic_module is not upstream_fn,
    }


def test_an_export_stops_retrying_the_missing_modelopt_import_and_answers_the_same():
    result = run_distributed(count_lookups, 1, (tiny_qwen3_moe_config(num_experts=4),), timeout_s=600)[0]
    assert result["counts"]["upstream"] >= 10, result["counts"]  # 47 on this model: one per auto-mapped task
    assert result["counts"]["patched"] == 0, result["counts"]
    assert result["same_export"] and result["same_answers"] and result["copy_rebound"]

"""Merge-on-export from a real Megatron-Bridge model: equal to the world-size-1 merge in every layout,
equal to W + (alpha/r) B A in float64 within float32 rounding, and leaving the model untouched."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.merge.stream import LORA_A_SUFFIX, module_key, plain_name
from moe_lora_plugins.testing.distributed import DistributedRunError, run_distributed
from moe_lora_plugins.testing.tiny_models import (
    LoraSettings,
    ParallelLayout,
    compare_exports,
    tiny_qwen3_config,
    tiny_qwen3_moe_config,
)

from .merge_workers import merge_on_export_worker

pytestmark = pytest.mark.megatron

MOE_LORA = LoraSettings(dim=4, alpha=8, share_expert_adapters=False)
DENSE_LORA = LoraSettings(dim=4, alpha=8)


@pytest.fixture(scope="module")
def moe_world1():
    [result] = run_distributed(merge_on_export_worker, 1, (tiny_qwen3_moe_config(), ParallelLayout(), MOE_LORA, False, True))
    return result


@pytest.fixture(scope="module")
def dense_world1():
    [result] = run_distributed(merge_on_export_worker, 1, (tiny_qwen3_config(), ParallelLayout(), DENSE_LORA, False, True))
    return result


def test_world1_merge_on_export_is_bitwise_megatron_bridges_own_merge(moe_world1):
    compare_exports(moe_world1["upstream_merged"], moe_world1["ours"], "world1").assert_equal()


def test_merge_on_export_changes_every_lora_target_and_nothing_else(moe_world1):
    plain = {plain_name(name): tensor for name, tensor in moe_world1["plain"]}
    targeted = {module_key(name) for name, _ in moe_world1["adapter"]}
    for name, merged in moe_world1["ours"]:
        if module_key(name) in targeted:
            assert not torch.equal(merged, plain[name]), f"{name} left the export unmerged"
        else:
            assert torch.equal(merged, plain[name]), f"{name} changed though it has no adapter"
    assert any(name.endswith(".mlp.experts.3.down_proj") for name in targeted)


def _float64_merge(plain: list, adapters: list, scale: float) -> dict[str, torch.Tensor]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapters:
        side = "a" if name.endswith(LORA_A_SUFFIX) else "b"
        factors.setdefault(module_key(name), {})[side] = tensor.double()
    out = {}
    for name, tensor in plain:
        f = factors.get(module_key(name))
        if f is not None:
            out[plain_name(name)] = (tensor.double() + scale * (f["b"] @ f["a"]), f["a"], f["b"], tensor.double())
    return out


@pytest.mark.parametrize("model", ["moe_world1", "dense_world1"])
def test_merged_weights_equal_the_float64_formula_within_float32_rounding(model, request):
    result = request.getfixturevalue(model)
    scale = MOE_LORA.alpha / MOE_LORA.dim
    references = _float64_merge(result["plain"], result["adapter"], scale)
    ours = dict(result["ours"])
    assert references, "no LoRA-targeted weight in the export"
    eps = torch.finfo(torch.float32).eps
    for name, (exact, a, b, w) in references.items():
        bound = eps * ((a.shape[0] + 2) * scale * (b.abs() @ a.abs()) + w.abs())
        error = (ours[name].double() - exact).abs()
        assert torch.all(error <= bound), f"{name}: max error {error.max():.3e} above the float32 bound"


def test_the_export_leaves_every_parameter_untouched(moe_world1):
    assert moe_world1["changed"] == []


@pytest.mark.parametrize(
    "layout", [ParallelLayout(pp=2, vpp=2)], ids=lambda layout: layout.label
)
def test_moe_merge_on_export_in_pipeline_layouts_equals_world1(moe_world1, layout):
    results = run_distributed(merge_on_export_worker, layout.world_size, (tiny_qwen3_moe_config(), layout, MOE_LORA))
    for rank, result in enumerate(results):
        compare_exports(moe_world1["ours"], result["ours"], f"{layout.label} rank {rank}").assert_equal()
        assert result["changed"] == [], f"{layout.label} rank {rank}"


def test_without_the_export_patches_ep2_is_refused_rather_than_served_unmerged():
    """Megatron-Bridge 0.6.2 exports only experts 0..E/EP-1 as adapters on every EP rank; merge-on-export
    notices the LoRA-wrapped experts that have no adapter and fails the sync."""
    layout = ParallelLayout(ep=2)
    with pytest.raises(DistributedRunError, match="is a LoRA-wrapped weight but the adapter export has no factors"):
        run_distributed(merge_on_export_worker, 2, (tiny_qwen3_moe_config(), layout, MOE_LORA, False))


@pytest.mark.parametrize(
    "layout", [ParallelLayout(ep=2), ParallelLayout(pp=2, ep=2), ParallelLayout(etp=2)], ids=lambda layout: layout.label
)
def test_with_the_export_patches_expert_parallel_merge_on_export_equals_world1(moe_world1, layout):
    results = run_distributed(merge_on_export_worker, layout.world_size, (tiny_qwen3_moe_config(), layout, MOE_LORA, True))
    for rank, result in enumerate(results):
        compare_exports(moe_world1["ours"], result["ours"], f"{layout.label} rank {rank}").assert_equal()

"""The patched exports keep the slime/miles fork's 3-tuple items and are still the world-size-1 export.

slime and miles pin a fork of Megatron-Bridge whose export streams yield ``(hf_name, tensor,
megatron_name)`` where upstream yields ``(hf_name, tensor)``. That fork is not installable here, so
each rank gives the real Megatron-Bridge 0.6.2 streams the fork's item shape *before* activation:
``stream_weights_megatron_to_hf`` and ``stream_adapter_weights_megatron_to_hf`` are wrapped to append
a third element naming the rank and the item's position, the way the fork appends the Megatron name.
Then ``moe_lora_plugins.activate()`` patches on top of that, as it would on top of the fork, and the
EP=2 exports (plain, merged, adapter) must (a) be 3-tuples whose third element is the one the
producing rank attached (experts gathered from the other EP rank keep their owner's), and (b) hold,
name by name and bitwise, the unpatched world-size-1 2-tuple export.
"""

from __future__ import annotations

from typing import Any

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import (
    ParallelLayout,
    compare_exports,
    export_worker,
    tiny_qwen3_moe_config,
)

KINDS = ("plain", "merged", "adapter")


def _fork_shaped(method: Any, rank: int) -> Any:
    """``method``'s stream with a third element per item, as the fork yields (signature kept)."""
    import functools

    @functools.wraps(method)
    def stream(*args: Any, **kwargs: Any) -> Any:
        for position, item in enumerate(method(*args, **kwargs)):
            assert len(item) == 2, "upstream 0.6.2 yields 2-tuples"
            yield (item[0], item[1], f"megatron-name/rank{rank}/{position}")

    return stream


def fork_worker(hf_config: Any, layout: ParallelLayout) -> dict[str, list[tuple[str, Any, Any]]]:
    """One rank: give the bridge streams the fork's item shape, activate, export, keep every item whole."""
    import torch
    import torch.distributed as dist

    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
    from megatron.bridge.models.conversion.peft_bridge import MegatronPeftBridge

    import moe_lora_plugins
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names

    rank = dist.get_rank()
    for owner, name in ((MegatronModelBridge, "stream_weights_megatron_to_hf"),
                        (MegatronPeftBridge, "stream_adapter_weights_megatron_to_hf")):
        setattr(owner, name, _fork_shaped(vars(owner)[name], rank))
    moe_lora_plugins.activate(role="trainer")
    registry = moe_lora_plugins.get_registry()
    built = build_lora_model(hf_config, layout, dtype=torch.float32)
    fill_from_global_names(built)
    statuses = {patch_id: registry.status(patch_id).value for patch_id in registry.ids()
                if patch_id.startswith("megatron_bridge.")}
    out: dict[str, Any] = {"statuses": statuses}
    bridge, model = built.bridge, built.model
    streams = {
        "plain": lambda: bridge.export_hf_weights(model, cpu=True, show_progress=False, merge_adapter_weights=False),
        "merged": lambda: bridge.export_hf_weights(model, cpu=True, show_progress=False, merge_adapter_weights=True),
        "adapter": lambda: bridge.export_adapter_weights(model, cpu=True, show_progress=False),
    }
    for kind in KINDS:
        out[kind] = [(item[0], item[1].detach().clone(), *item[2:]) for item in streams[kind]()]
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    config = tiny_qwen3_moe_config(num_experts=4)
    reference = run_distributed(export_worker, 1, (config, ParallelLayout(), KINDS), timeout_s=600)[0]
    fork = run_distributed(fork_worker, 2, (config, ParallelLayout(ep=2)), timeout_s=600)
    return {"reference": reference, "fork": fork}


def test_every_patch_lands_on_the_fork_shaped_streams(runs):
    for result in runs["fork"]:
        assert set(result["statuses"].values()) == {"applied"}, result["statuses"]


@pytest.mark.parametrize("kind", KINDS)
def test_fork_items_stay_three_tuples_and_equal_world_size_1(runs, kind):
    for rank, result in enumerate(runs["fork"]):
        items = result[kind]
        assert items and all(len(item) == 3 for item in items)
        compare_exports(runs["reference"][kind], [(n, t) for n, t, _ in items], f"{kind} rank {rank}").assert_equal()
        tags = [tag for _, _, tag in items]
        assert len(set(tags)) == len(tags), "an item's third element was duplicated or replaced"
        owners = {tag.split("/")[1] for tag in tags}
        # The adapter stream gathers the other rank's experts with the third element their owner attached;
        # the weight streams are each rank's own (upstream already gathers expert weights over EP).
        assert owners == ({"rank0", "rank1"} if kind == "adapter" else {f"rank{rank}"})


def test_gathered_adapter_items_carry_the_owner_rank_tag_for_the_owner_experts(runs):
    """Experts 2-3 live on EP rank 1: both ranks must emit them with rank 1's third element."""
    for result in runs["fork"]:
        for name, _, tag in result["adapter"]:
            if ".experts." not in name:
                continue
            expert = int(name.split(".experts.")[1].split(".")[0])
            assert tag.split("/")[1] == ("rank0" if expert < 2 else "rank1"), (name, tag)

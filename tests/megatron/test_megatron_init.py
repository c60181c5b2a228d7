"""slime / miles ``--custom-megatron-init-path moe_lora_plugins.integrations.megatron_init.init``.

Real Megatron-Bridge on the CPU: before ``init(args)`` a build gets no LoRA; after it, with the
host's LoRA flags on the namespace, every ``provide_distributed_model`` of the actor gets LoRA with
exactly those settings before wrapping, a model built as the reference gets none, and an actor the
host already gave LoRA (miles' own ``--lora-rank`` path) is not given a second one.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import ParallelLayout, tiny_qwen3_moe_config

pytestmark = pytest.mark.megatron


def _summary(chunks: list[Any]) -> dict[str, Any]:
    adapters = sorted(n for c in chunks for n, m in c.named_modules() if n.endswith(".adapter"))
    ranks = sorted({tuple(p.shape)[0] for c in chunks for n, p in c.named_parameters()
                    if n.endswith(".adapter.linear_in.weight")})
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    total = sum(p.numel() for c in chunks for p in c.parameters())
    return {"adapters": adapters, "ranks": ranks, "trainable": trainable, "total": total}


def init_worker(hf_config: Any, ep: int) -> dict[str, Any]:
    from moe_lora_plugins.hooks.build import building, set_build_config
    from moe_lora_plugins.integrations.megatron_init import init
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu
    from moe_lora_plugins.testing.tiny_models import build_lora_model

    prepare_megatron_cpu()
    built = build_lora_model(hf_config, ParallelLayout(ep=ep), lora=None)
    provider = built.provider

    def build() -> list[Any]:
        return list(provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True,
                                                       mixed_precision_wrapper=None))

    out: dict[str, Any] = {"before_init": _summary(built.model)}
    slime_args = Namespace(enable_lora=True, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                           lora_target_modules=["linear_qkv", "linear_fc1"], seed=1234)
    init(slime_args)
    out["actor"] = _summary(build())
    with building("reference"):
        out["reference"] = _summary(build())

    miles_args = Namespace(lora_rank=2, lora_alpha=4, lora_dropout=0.0, target_modules="linear_proj,linear_fc2")
    init(miles_args)
    out["miles_ours_only"] = _summary(build())
    from megatron.bridge.peft.lora import LoRA

    host_lora = LoRA(target_modules=["linear_proj", "linear_fc2"], dim=2, alpha=4)
    provider.register_pre_wrap_hook(lambda chunks: host_lora(chunks, training=True))
    out["miles_host_and_ours"] = _summary(build())
    set_build_config(None)
    provider._pre_wrap_hooks.clear()
    out["after_withdraw"] = _summary(build())
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["world1", "ep2"])
def outcome(request):
    return run_distributed(init_worker, request.param, (tiny_qwen3_moe_config(num_experts=4), request.param),
                           timeout_s=600)


def test_before_init_a_build_gets_no_lora(outcome):
    for rank in outcome:
        assert rank["before_init"]["adapters"] == []


def test_init_reads_the_hosts_lora_flags_and_the_actor_gets_exactly_that_lora(outcome):
    for rank in outcome:
        actor = rank["actor"]
        assert actor["ranks"] == [4]
        kinds = {name.rsplit(".", 2)[-2] for name in actor["adapters"]}
        assert kinds == {"linear_qkv", "linear_fc1"}
        assert any(".experts.local_experts." in name for name in actor["adapters"])
        assert 0 < actor["trainable"] < actor["total"]


def test_the_reference_model_gets_no_lora_and_stays_fully_trainable(outcome):
    for rank in outcome:
        reference = rank["reference"]
        assert reference["adapters"] == []
        assert reference["trainable"] == reference["total"]


def test_miles_lora_rank_flag_turns_lora_on_with_its_target_modules(outcome):
    for rank in outcome:
        ours = rank["miles_ours_only"]
        assert ours["ranks"] == [2]
        assert {name.rsplit(".", 2)[-2] for name in ours["adapters"]} == {"linear_proj", "linear_fc2"}


def test_an_actor_the_host_already_gave_lora_is_not_given_a_second_one(outcome):
    for rank in outcome:
        assert rank["miles_host_and_ours"]["adapters"] == rank["miles_ours_only"]["adapters"]
        assert rank["miles_host_and_ours"]["trainable"] == rank["miles_ours_only"]["trainable"]


def test_withdrawing_the_build_config_leaves_builds_untouched(outcome):
    for rank in outcome:
        assert rank["after_withdraw"]["adapters"] == []


def test_init_refuses_bad_lora_flags_before_any_model_exists():
    from moe_lora_plugins.integrations.megatron_init import init
    from moe_lora_plugins.lora_config import LoraConfigError

    with pytest.raises(LoraConfigError, match="--lora-alpha"):
        init(Namespace(enable_lora=True, lora_rank=4, lora_alpha=-1.0))

"""``save_peft_adapter`` writes, under EP, PP and expert-TP, the bitwise same PEFT adapter as world size 1.

Each layout builds the same tiny Qwen3-MoE (every parameter filled from its global name) in real gloo
processes; rank 0's PEFT directory is compared tensor by tensor with the world-size-1 one. TP > 1
with MoE is not built: Megatron needs sequence parallelism there and the local (non-TE) spec refuses
it. TP=2 is checked on the dense Qwen3 with sequence parallelism off.
"""

from __future__ import annotations

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import ParallelLayout

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


def _write_adapter(layout: ParallelLayout, out_dir: str, dense: bool = False) -> dict:
    from moe_lora_plugins.lora.export import save_peft_adapter
    from moe_lora_plugins.lora.formats import read_peft_dir
    from moe_lora_plugins.testing.tiny_models import (
        build_lora_model,
        fill_from_global_names,
        tiny_qwen3_config,
        tiny_qwen3_moe_config,
    )

    if dense:
        from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

        prepare_megatron_cpu()
        from megatron.bridge import AutoBridge

        # A dense model needs no sequence parallelism under TP, and the local spec refuses it:
        # keep it off in this process although the test builder turns it on for TP > 1.
        provider = AutoBridge.from_hf_config(tiny_qwen3_config()).to_megatron_provider(load_weights=False)
        type(provider).sequence_parallel = property(lambda self: False, lambda self, value: None)
    built = build_lora_model(tiny_qwen3_config() if dense else tiny_qwen3_moe_config(), layout)
    fill_from_global_names(built)
    save_peft_adapter(built.model, out_dir, bridge=built.bridge)
    tensors, config = read_peft_dir(out_dir)
    return {"tensors": tensors, "config": config}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    (out,) = run_distributed(
        _write_adapter, 1, args=(ParallelLayout(), str(tmp_path_factory.mktemp("world1")))
    )
    return out


@pytest.mark.parametrize(
    "layout", [ParallelLayout(ep=2), ParallelLayout(pp=2), ParallelLayout(etp=2)], ids=lambda v: v.label
)
def test_adapter_equals_world_size_1(reference, tmp_path, layout):
    results = run_distributed(_write_adapter, layout.world_size, args=(layout, str(tmp_path)))
    want, got = reference, results[0]
    assert got["config"] == want["config"]
    assert sorted(got["tensors"]) == sorted(want["tensors"])
    different = [n for n, t in want["tensors"].items() if not got["tensors"][n].equal(t)]
    assert not different, f"{layout.label}: {len(different)} tensors differ, e.g. {different[:4]}"


def test_dense_tp2_adapter_equals_world_size_1(tmp_path):
    (want,) = run_distributed(_write_adapter, 1, args=(ParallelLayout(), str(tmp_path / "world1"), True))
    layout = ParallelLayout(tp=2)
    got = run_distributed(_write_adapter, 2, args=(layout, str(tmp_path / "tp2"), True))[0]
    assert got["config"] == want["config"]
    assert sorted(got["tensors"]) == sorted(want["tensors"])
    different = [n for n, t in want["tensors"].items() if not got["tensors"][n].equal(t)]
    assert not different, f"tp2: {len(different)} tensors differ, e.g. {different[:4]}"

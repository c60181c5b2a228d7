"""Our in-memory vLLM adapters, loaded with ``LoRAModel.from_lora_tensors``, pack to the same tensors as
the PEFT directory of the same adapter loaded through vLLM's own worker loader.

A real (in-process, CPU) vLLM engine for a tiny Qwen3-MoE provides the LoRA model manager, so the
packing (``pack_moe`` for 2-D experts, the mixed-format 3-D -> 2-D conversion for 3-D experts) is
vLLM's. No forward pass runs: vLLM's CPU MoE-LoRA kernel needs Triton (see docs/upstream-notes.md).
"""

from __future__ import annotations

import os

import pytest
import torch

from moe_lora_plugins.lora.convert import megatron_to_peft
from moe_lora_plugins.lora.families import ModelDims
from moe_lora_plugins.lora.formats import render, write_peft_dir
from moe_lora_plugins.lora.wire import decode, encode

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, MOE_INTER, LAYERS, RANK = 64, 2, 1, 32, 4, 32, 2, 8


def _megatron_adapter(shared_outer: bool = False) -> dict[str, torch.Tensor]:
    """Random Megatron LoRA tensors (attention + experts) with non-zero B.

    Experts are SequentialMLP adapters (one 2-D pair per expert), or with ``shared_outer`` grouped
    adapters in Megatron-Bridge's shared-outer layout: fc1 LoRA A and fc2 LoRA B 2-D (shared by all
    experts), fc1 LoRA B and fc2 LoRA A 3-D per expert.
    """
    g = torch.Generator().manual_seed(7)
    qkv_out = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    out = {}
    for layer in range(LAYERS):
        p = f"decoder.layers.{layer}"
        shapes = {
            "self_attention.linear_qkv": ((RANK, HIDDEN), (qkv_out, RANK)),
            "self_attention.linear_proj": ((RANK, HEADS * HEAD_DIM), (HIDDEN, RANK)),
        }
        if shared_outer:
            shapes["mlp.experts.linear_fc1"] = ((RANK, HIDDEN), (EXPERTS, 2 * MOE_INTER, RANK))
            shapes["mlp.experts.linear_fc2"] = ((EXPERTS, RANK, MOE_INTER), (HIDDEN, RANK))
        for e in range(0 if shared_outer else EXPERTS):
            shapes[f"mlp.experts.local_experts.{e}.linear_fc1"] = ((RANK, HIDDEN), (2 * MOE_INTER, RANK))
            shapes[f"mlp.experts.local_experts.{e}.linear_fc2"] = ((RANK, MOE_INTER), (HIDDEN, RANK))
        for module, (a_shape, b_shape) in shapes.items():
            out[f"{p}.{module}.adapter.linear_in.weight"] = torch.randn(*a_shape, generator=g) * 0.1
            out[f"{p}.{module}.adapter.linear_out.weight"] = torch.randn(*b_shape, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm.lora.lora_model as lora_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    lora_model.PIN_MEMORY = False
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=64,
        moe_intermediate_size=MOE_INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    return path, ModelDims.from_hf_config(config)


def _engine(model_dir, **lora_options):
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        enable_lora=True,
        max_lora_rank=RANK,
        max_loras=2,
        max_cpu_loras=4,
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=64,
        dtype="float32",
        max_num_seqs=2,
        max_num_batched_tokens=64,
        gpu_memory_utilization=0.05,
        kv_cache_memory_bytes=64 << 20,
        **lora_options,
    )


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    path, dims = model_dir
    llm = _engine(path, enable_mixed_moe_lora_format=True)
    adapter = megatron_to_peft(_megatron_adapter(), "qwen3_moe", dims, alpha=16)
    peft_dir = write_peft_dir(adapter, tmp_path_factory.mktemp("peft"))
    yield llm, adapter, str(peft_dir)
    del llm


def _flat(model) -> dict:
    """A packed LoRAModel as ``{module.lora_a.i: tensor}`` (lists of w1/w2/w3 tensors numbered)."""
    out = {}
    for module, weights in model.loras.items():
        for side in ("lora_a", "lora_b"):
            value = getattr(weights, side)
            for i, t in enumerate(value if isinstance(value, list) else [value]):
                out[f"{module}.{side}.{i}"] = None if t is None else t.clone()
    return out


def _packed_from_dir(worker, peft_dir: str) -> dict:
    """In the worker: vLLM's own loader and packing of a PEFT directory."""
    from vllm.lora.request import LoRARequest

    manager = worker.model_runner.lora_manager
    manager.remove_all_adapters()
    reference = manager._load_adapter(LoRARequest("reference", 1, peft_dir))
    manager._adapter_manager.add_adapter(reference)
    return _flat(reference)


def _packed_from_tensors(worker, tensors: dict, config: dict, is_3d: bool) -> dict:
    """In the worker: ``LoRAModel.from_lora_tensors`` on our tensors, then vLLM's packing."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    adapters = manager._adapter_manager
    manager.remove_all_adapters()
    mapper = getattr(adapters.model, "hf_to_vllm_mapper", None)
    # vLLM folds the scaling into lora_B in place (LoRALayerWeights.optimize): hand it tensors it may own.
    owned = {name: t.clone() for name, t in tensors.items()}
    ours = LoRAModel.from_lora_tensors(
        2,
        owned,
        PEFTHelper.from_dict(config),
        device="cpu",
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
    )
    ours.is_3d_lora_weight = is_3d
    adapters.add_adapter(ours)
    return _flat(ours)


def _assert_same_packing(ours: dict, reference: dict) -> None:
    assert any(".experts." in name for name in reference), "the reference packed no MoE experts"
    assert sorted(ours) == sorted(reference)
    for name, want in reference.items():
        got = ours[name]
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.shape == want.shape and torch.equal(got, want), name


@pytest.mark.parametrize(("fmt", "via_wire"), [("vllm_2d", False), ("vllm_3d", False), ("vllm_2d", True)])
def test_from_lora_tensors_packs_like_vllms_own_loader(engine, fmt, via_wire):
    llm, adapter, peft_dir = engine
    tensors, config = render(adapter, fmt)
    if via_wire:
        payload = encode(tensors)
        assert payload.wire_bytes < payload.expanded_bytes  # fused LoRA A travels once
        tensors = decode(payload)
    reference = llm.collective_rpc(_packed_from_dir, args=(peft_dir,))[0]
    ours = llm.collective_rpc(_packed_from_tensors, args=(tensors, config, fmt == "vllm_3d"))[0]
    _assert_same_packing(ours, reference)


def test_shared_outer_packs_like_the_per_expert_adapter(engine, model_dir, tmp_path):
    """An engine with ``enable_moe_shared_loras`` packs our shared-outer tensors (shared factors stored
    once, expert dim 1) into what the 2-D engine's own loader packs from the per-expert PEFT directory."""
    llm, _, _ = engine
    path, dims = model_dir
    adapter = megatron_to_peft(_megatron_adapter(shared_outer=True), "qwen3_moe", dims, alpha=16)
    reference = llm.collective_rpc(_packed_from_dir, args=(str(write_peft_dir(adapter, tmp_path)),))[0]
    tensors, config = render(adapter, "vllm_shared_outer")
    shared_llm = _engine(path, enable_moe_shared_loras=True)
    ours = shared_llm.collective_rpc(_packed_from_tensors, args=(tensors, config, False))[0]
    del shared_llm
    shared = [n for n, t in ours.items() if t is not None and ".experts." in n and t.shape[0] == 1]
    assert len(shared) == 3 * LAYERS, (
        f"expected w1/w3 lora_a and w2 lora_b stored once per layer, got {shared}"
    )
    expanded = {
        name: t.expand(EXPERTS, *t.shape[1:])
        if t is not None and ".experts." in name and t.shape[0] == 1
        else t
        for name, t in ours.items()
    }
    _assert_same_packing(expanded, reference)

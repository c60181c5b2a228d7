"""The summary's LoRA module kinds, counted from PEFT tensor names and from vLLM's module names."""

from __future__ import annotations

from moe_lora_plugins.demo.report import SyncFigures, describe_lora_kinds, lora_kinds

P = "base_model.model.model.layers"


def _peft_names() -> list[str]:
    names = []
    for layer in range(3):
        names += [f"{P}.{layer}.self_attn.{p}.lora_{ab}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                  for ab in "AB"]
    names += [f"{P}.0.mlp.{p}.lora_{ab}.weight" for p in ("gate_proj", "up_proj", "down_proj") for ab in "AB"]
    names += [f"{P}.{layer}.mlp.experts.{e}.{p}.lora_{ab}.weight" for layer in (1, 2) for e in range(4)
              for p in ("gate_proj", "up_proj", "down_proj") for ab in "AB"]
    names += [f"{P}.2.mlp.gate.lora_A.weight", f"{P}.2.mlp.gate.lora_B.weight"]
    return names


def test_peft_tensor_names_count_once_per_module_by_kind():
    assert lora_kinds(_peft_names()) == {
        "attention": {"modules": 12, "layers": [0, 1, 2]},
        "dense_mlp": {"modules": 3, "layers": [0]},
        "experts": {"modules": 24, "layers": [1, 2]},
        "router": {"modules": 1, "layers": [2]},
    }


def test_vllm_packed_module_names_fall_into_the_same_kinds():
    vllm = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_up_proj",
            "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.qkv_proj", "model.layers.1.mlp.experts"]
    kinds = lora_kinds(vllm)
    assert kinds == {"attention": {"modules": 3, "layers": [0, 1]}, "dense_mlp": {"modules": 2, "layers": [0]},
                     "experts": {"modules": 1, "layers": [1]}}
    assert describe_lora_kinds(kinds) == ("attention 3 modules (layers 0,1); dense MLP 2 modules (layer 0); "
                                          "experts 1 modules (layer 1)")


def test_engine_must_hold_every_kind_in_every_layer_the_adapter_carries():
    adapter = {"dense_mlp": {"modules": 3, "layers": [0]}, "experts": {"modules": 24, "layers": [1, 2]}}
    sync = SyncFigures(0, 1, 1, 1, 1, 1, 1, 0.0, 0.0, True, True, 0.0, False, True, adapter_lora_kinds=adapter,
                       engine_lora_kinds={"dense_mlp": {"modules": 2, "layers": [0]},
                                          "experts": {"modules": 2, "layers": [1, 2]}})
    assert sync.engine_serves_every_kind
    sync.engine_lora_kinds = {"experts": {"modules": 2, "layers": [1, 2]}}  # the dense MLP's LoRA was dropped
    assert not sync.engine_serves_every_kind

"""A Qwen3-MoE with dense layers (``mlp_only_layers=[0]``) through Megatron-Bridge, with and without the patch.

Real megatron-core + megatron-bridge on the CPU (local spec, gloo). The references are independent of
the code under test: the checkpoint transformers wrote (round trip), HF transformers + peft logits
(LoRA), and the world-size-1 export (parallel layouts). Unpatched Megatron-Bridge 0.6.2 builds layer 0
as MoE, loads it with random experts (warnings only), exports experts it never had and writes
``decoder_sparse_step=1`` without ``mlp_only_layers``: the tests pin that down too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import (
    LoraSettings,
    ParallelLayout,
    compare_exports,
    export_worker,
    tiny_qwen3_moe_config,
)

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

DENSE = [0]
DENSE_MLP = tuple(f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
TOLERANCE = 1e-5


def _config(**overrides):
    return tiny_qwen3_moe_config(mlp_only_layers=DENSE, **overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny Qwen3-MoE written by transformers: the round trip's reference."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    path = tmp_path_factory.mktemp("qwen3-moe-dense")
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(_config()).save_pretrained(path)
    return path


def _load_and_export(path: str, patched: bool) -> dict:
    """One rank (world 1): build from the checkpoint's config, load its weights, export them and the config."""
    import moe_lora_plugins

    if patched:
        moe_lora_plugins.activate(role="trainer")
    from transformers import AutoConfig

    from moe_lora_plugins.testing.tiny_models import build_lora_model, run_export

    built = build_lora_model(AutoConfig.from_pretrained(path), lora=None)
    built.bridge.load_hf_weights(built.model, hf_path=path)
    hf_config = built.bridge._model_bridge.megatron_to_hf_config(built.provider)
    return {
        "mlp_kinds": [type(layer.mlp).__name__ for layer in built.model[0].decoder.layers],
        "weights": run_export(built, "plain"),
        "hf_config": {k: hf_config.get(k) for k in ("decoder_sparse_step", "mlp_only_layers", "intermediate_size")},
    }


@pytest.fixture(scope="module")
def round_trips(checkpoint) -> dict:
    return {phase: run_distributed(_load_and_export, 1, (str(checkpoint), phase == "patched"))[0]
            for phase in ("upstream", "patched")}


def _checkpoint_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_patched_round_trip_hf_megatron_hf_is_bitwise(round_trips, checkpoint):
    reference = sorted(_checkpoint_tensors(checkpoint).items())
    patched = round_trips["patched"]
    assert patched["mlp_kinds"] == ["MLP", "MoELayer", "MoELayer", "MoELayer"]
    assert set(DENSE_MLP) <= {name for name, _ in reference}
    compare_exports(reference, patched["weights"], "HF -> Megatron -> HF").assert_equal()
    assert patched["hf_config"] == {"decoder_sparse_step": 1, "mlp_only_layers": DENSE, "intermediate_size": 128}


def test_unpatched_upstream_makes_the_dense_layer_moe(round_trips, checkpoint):
    upstream = round_trips["upstream"]
    assert upstream["mlp_kinds"] == ["MoELayer"] * 4
    comparison = compare_exports(sorted(_checkpoint_tensors(checkpoint).items()), upstream["weights"])
    assert comparison.missing == sorted(DENSE_MLP)
    assert "model.layers.0.mlp.gate.weight" in comparison.unexpected
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in comparison.unexpected
    assert upstream["hf_config"]["decoder_sparse_step"] == 1 and not upstream["hf_config"]["mlp_only_layers"]


def _untouched_without_dense_layers() -> dict:
    """One rank: an all-MoE config gives the same provider, mappings and HF config with the patch as without."""
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    from megatron.bridge import AutoBridge

    import moe_lora_plugins

    def snapshot():
        bridge = AutoBridge.from_hf_config(tiny_qwen3_moe_config())
        provider = bridge.to_megatron_provider(load_weights=False)
        registry = bridge._model_bridge.mapping_registry()
        mappings = [(type(m).__name__, m.megatron_param, m.hf_param) for m in registry.get_all_mappings()]
        return provider.moe_layer_freq, mappings, bridge._model_bridge.megatron_to_hf_config(provider)

    before = snapshot()
    moe_lora_plugins.activate(role="trainer")
    status = {row["id"]: row["status"] for row in moe_lora_plugins.get_registry().rows()}
    return {"before": before, "after": snapshot(), "status": status}


def test_config_without_dense_layers_is_unchanged_by_the_patch():
    (result,) = run_distributed(_untouched_without_dense_layers, 1)
    assert result["status"]["megatron_bridge.qwen3_moe_dense_layer_provider"] == "applied"
    assert result["status"]["megatron_bridge.mixed_dense_moe_block_spec"] == "applied"
    assert result["before"] == result["after"]
    assert result["after"][0] == 1


SPARSE_CASES = {  # HF config overrides -> (Megatron moe_layer_freq, HF decoder_sparse_step, mlp_only_layers back)
    "mlp_only_layers=[0]": ({"mlp_only_layers": [0]}, [0, 1, 1, 1], 1, [0]),
    "decoder_sparse_step=2": ({"decoder_sparse_step": 2}, [0, 1, 0, 1], 2, []),
    "step 2 and mlp_only_layers=[3]": ({"decoder_sparse_step": 2, "mlp_only_layers": [3]}, [0, 1, 0, 0], 2, [3]),
}


def _provider_and_hf_config_fields() -> dict:
    """One rank, patched: each HF config's provider moe_layer_freq and the HF fields written back from it."""
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    from megatron.bridge import AutoBridge

    import moe_lora_plugins

    moe_lora_plugins.activate(role="trainer")
    out = {}
    for label, (overrides, *_) in SPARSE_CASES.items():
        bridge = AutoBridge.from_hf_config(tiny_qwen3_moe_config(**overrides))
        provider = bridge.to_megatron_provider(load_weights=False)
        hf = bridge._model_bridge.megatron_to_hf_config(provider)
        out[label] = (provider.moe_layer_freq, hf["decoder_sparse_step"], hf.get("mlp_only_layers"))
    return out


def test_sparse_step_and_mlp_only_layers_reach_megatron_and_come_back():
    (got,) = run_distributed(_provider_and_hf_config_fields, 1)
    assert got == {label: tuple(case[1:]) for label, case in SPARSE_CASES.items()}


def _module_name(spec) -> str:
    """The class a ModuleSpec (or a functools.partial building one) stands for."""
    target = getattr(spec, "module", None) or getattr(spec, "func", spec)
    return getattr(target, "__self__", target).__name__


def _block_specs() -> dict:
    """One rank: what the patch builds for each of upstream's layer-spec functions.

    The local block spec is built for real. Transformer Engine is not installed here, so for the TE
    functions only the call into Megatron-Core's ``get_gpt_decoder_block_spec`` is recorded.
    """
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    from megatron.bridge import AutoBridge
    from megatron.bridge.models import gpt_provider
    from megatron.core import parallel_state
    from megatron.core.models.gpt import gpt_layer_specs

    import moe_lora_plugins
    from moe_lora_plugins.patches.megatron_bridge.qwen3_moe_dense_layers import mixed_layer_block_spec

    moe_lora_plugins.activate(role="trainer")
    parallel_state.initialize_model_parallel()  # the block spec asks how many layers this stage builds
    provider = AutoBridge.from_hf_config(_config()).to_megatron_provider(load_weights=False)
    out: dict = {"moe_layer_freq": provider.moe_layer_freq}
    provider.transformer_layer_spec = gpt_provider.local_layer_spec
    out["local"] = [_module_name(layer.submodules.mlp) for layer in mixed_layer_block_spec(provider)(provider).layer_specs]

    calls = []
    gpt_layer_specs.get_gpt_decoder_block_spec = lambda config, **kwargs: calls.append(kwargs)
    for spec in (gpt_provider.transformer_engine_layer_spec, gpt_provider.default_layer_spec):
        provider.transformer_layer_spec = spec
        mixed_layer_block_spec(provider)(provider, vp_stage=1)
    out["te_calls"] = calls
    provider.use_transformer_engine_full_layer_spec = True
    out["full_te"] = mixed_layer_block_spec(provider)
    provider.transformer_layer_spec = gpt_provider.local_layer_spec(provider)  # a ModuleSpec of its own
    out["custom"] = mixed_layer_block_spec(provider)
    return out


def test_block_spec_builds_the_dense_layer_as_mlp_for_upstreams_layer_specs():
    (specs,) = run_distributed(_block_specs, 1)
    assert specs["moe_layer_freq"] == [0, 1, 1, 1]
    assert specs["local"] == ["MLP", "MoELayer", "MoELayer", "MoELayer"]
    te = {"use_transformer_engine": True, "normalization": "RMSNorm", "vp_stage": 1}
    assert specs["te_calls"] == [te, te]
    assert specs["full_te"] is None and specs["custom"] is None  # specs upstream did not make are left alone


# --- LoRA on the dense MLP: HF + PEFT logits equal Megatron + LoRA logits --------------------------


def _megatron_logits_and_peft_dirs(out: str) -> dict:
    """One rank (world 1), patched: the Megatron logits with LoRA everywhere, the base checkpoint, the adapter."""
    import moe_lora_plugins
    from moe_lora_plugins.testing.peft_reference import megatron_logits_and_peft_dirs

    moe_lora_plugins.activate(role="trainer")
    return megatron_logits_and_peft_dirs(_config(), LoraSettings(), out)


def _hf_peft_logits(base_dir: Path, adapter_dir: Path, tokens, dense_mlp_lora: bool = True):
    """Logits of HF transformers + peft with the adapter; with ``dense_mlp_lora`` also its LoRA on the dense
    MLPs, which peft 0.21 on transformers v5 drops on load (see ``load_hf_with_peft_and_dense_mlp_lora``)."""
    import torch

    from moe_lora_plugins.testing.peft_reference import (
        load_hf_with_peft,
        load_hf_with_peft_and_dense_mlp_lora,
    )

    _, model = (load_hf_with_peft_and_dense_mlp_lora if dense_mlp_lora else load_hf_with_peft)(base_dir, adapter_dir)
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_peft_logits_equal_megatron_lora_logits_with_lora_on_the_dense_mlp(tmp_path):
    (result,) = run_distributed(_megatron_logits_and_peft_dirs, 1, (str(tmp_path),))
    adapter_dir = tmp_path / "adapter"
    from safetensors.torch import load_file

    names = set(load_file(str(adapter_dir / "adapter_model.safetensors")))
    dense_lora = {n for n in names if ".layers.0.mlp." in n and ".experts." not in n}
    prefix = "base_model.model.model.layers.0.mlp"
    assert dense_lora == {f"{prefix}.{p}.lora_{ab}.weight" for p in ("gate_proj", "up_proj", "down_proj")
                          for ab in "AB"}
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4

    logits = _hf_peft_logits(tmp_path / "base", adapter_dir, result["tokens"])
    diff = (logits - result["logits"]).abs().max().item()
    without_dense = _hf_peft_logits(tmp_path / "base", adapter_dir, result["tokens"], dense_mlp_lora=False)
    dense_effect = (without_dense - result["logits"]).abs().max().item()
    print(f"max |HF+PEFT - Megatron+LoRA| = {diff:.3e}; dropping the dense-MLP LoRA moves it to {dense_effect:.3e}")
    assert dense_effect > 1e3 * TOLERANCE, "the dense-MLP LoRA barely matters: the comparison would prove nothing"
    assert diff <= TOLERANCE


# --- parallel exports with the dense layer equal world size 1 --------------------------------------

KINDS = ("plain", "merged", "adapter", "peft")
LAYOUTS = {"ep2": ParallelLayout(ep=2), "pp2-ep2": ParallelLayout(pp=2, ep=2),
           "pp2-vpp2": ParallelLayout(pp=2, vpp=2)}  # VPP: the block spec must pick each chunk's layers
_exports: dict[str, list[dict]] = {}


def _patched_exports(label: str, tmp_path_factory) -> list[dict]:
    if label not in _exports:
        layout = LAYOUTS.get(label, ParallelLayout())
        peft_dir = str(tmp_path_factory.mktemp(f"dense-peft-{label}"))
        _exports[label] = run_distributed(
            export_worker, layout.world_size, (_config(), layout, KINDS, LoraSettings(), True, "float32", "cpu", peft_dir),
            timeout_s=600,
        )
    return _exports[label]


@pytest.fixture(scope="module")
def world1(tmp_path_factory) -> dict:
    return _patched_exports("world1", tmp_path_factory)[0]


def test_world_size_1_export_has_the_dense_layer_and_its_lora(world1):
    plain = {name.replace(".base_layer.", ".") for name, _ in world1["plain"]}
    assert set(DENSE_MLP) <= plain and not any(n.startswith("model.layers.0.mlp.experts.") for n in plain)
    adapter = {name for name, _ in world1["peft"]}
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in adapter
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in adapter


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label", list(LAYOUTS))
def test_parallel_export_with_a_dense_layer_equals_world_size_1(world1, tmp_path_factory, label, kind):
    results = _patched_exports(label, tmp_path_factory)
    ranks = [0] if kind == "peft" else range(len(results))  # save_hf_adapter writes on rank 0 only
    for rank in ranks:
        compare_exports(world1[kind], results[rank][kind], f"{label} rank {rank} {kind}").assert_equal()

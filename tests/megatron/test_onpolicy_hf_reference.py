"""True-on-policy mode against an independent implementation: Megatron == HF transformers, bit for bit (CPU).

The demo's model shape (a dense layer 0, MoE layers 1-3; ``moe_lora_plugins.demo.model``) is built in
Megatron-Core through Megatron-Bridge with LoRA on attention, the dense MLP and every expert (one adapter
per expert, B random and large enough to matter), every weight filled from its global name. One rank
(world size 1, gloo) scores a batch with ``MOELORA_TRUE_ON_POLICY=on``, then with it off, and writes
Megatron-Bridge's plain HF export and this suite's PEFT adapter. The test process loads them into HF's
``Qwen3MoeForCausalLM`` and scores the same tokens through
:mod:`moe_lora_plugins.testing.hf_onpolicy` (HF's own modules and weights, the same onpolicy ops).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_lora_plugins.testing.distributed import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

ENV = {"MOELORA_PLUGINS": "on", "MOELORA_TRUE_ON_POLICY": "on", "OMP_NUM_THREADS": "1"}
BATCH, LENGTH = 4, 12
LORA_B_STD = 0.3


def _megatron_side(out: str, dtype_name: str) -> dict:
    """One rank: build, fill, score (mode on, then off), export base + adapter under ``out``."""
    import contextlib
    import os

    import torch
    from safetensors.torch import save_file

    import moe_lora_plugins
    from moe_lora_plugins.demo.model import TinyMoeSpec, hf_config
    from moe_lora_plugins.lora.export import save_peft_adapter
    from moe_lora_plugins.onpolicy import ops
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu
    from moe_lora_plugins.testing.tiny_models import LoraSettings, build_lora_model, fill_from_global_names

    moe_lora_plugins.activate(role="trainer")
    prepare_megatron_cpu()
    torch.cuda.current_device = lambda: "cpu"  # Megatron's rotary embedding asks for a CUDA device
    dtype = getattr(torch, dtype_name)
    config = hf_config(TinyMoeSpec())
    built = build_lora_model(config, lora=LoraSettings(dim=4, alpha=8, share_expert_adapters=False), dtype=dtype)
    fill_from_global_names(built)
    with torch.no_grad():  # LoRA B ~ N(0, 0.3): the adapter moves the log-probs far more than rounding does
        for chunk in built.model:
            for name, param in chunk.named_parameters():
                if ".adapter.linear_out." in name:
                    param.mul_(LORA_B_STD / 0.02)
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    model = built.model[0].eval()
    tokens = torch.randint(3, config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(5))
    causal = torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), diagonal=1)[None, None]

    def score() -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=tokens, position_ids=torch.arange(LENGTH)[None].expand(BATCH, -1),
                           attention_mask=causal)
        return ops.token_logprobs(logits[:, :-1].float(), tokens[:, 1:])

    norm_classes = {type(m).__name__ for m in model.modules() if "RMSNorm" in type(m).__name__}
    on = score()
    os.environ["MOELORA_TRUE_ON_POLICY"] = "off"
    for module in model.modules():  # the norms became invariant when built in the mode: back to torch's
        if type(module).__name__ == "InvariantRMSNorm":
            module.__class__ = torch.nn.RMSNorm
    off = score()

    base_dir, adapter_dir = Path(out) / "base", Path(out) / "adapter"
    base_dir.mkdir(parents=True)
    weights = built.bridge.export_hf_weights(built.model, cpu=True, show_progress=False, merge_adapter_weights=False)
    save_file({k.replace(".base_layer.", "."): v.contiguous() for k, v in weights}, str(base_dir / "model.safetensors"))
    config.save_pretrained(base_dir)
    save_peft_adapter(built.model, adapter_dir, bridge=built.bridge, base_model_name_or_path=str(base_dir))
    return {"tokens": tokens, "on": on, "off": off, "norm_classes": sorted(norm_classes)}


def _hf_reference(out: Path, dtype_name: str, tokens, adapter: bool = True):
    import torch
    from transformers import AutoModelForCausalLM

    from moe_lora_plugins.testing.hf_onpolicy import apply_onpolicy_forwards, hf_token_logprobs

    model, info = AutoModelForCausalLM.from_pretrained(out / "base", dtype=getattr(torch, dtype_name),
                                                       output_loading_info=True)
    assert not any(info.values()), f"the bridge's export does not load cleanly into HF: {info}"
    apply_onpolicy_forwards(model.eval(), out / "adapter" if adapter else None)
    return hf_token_logprobs(model, tokens)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def scored(request, tmp_path_factory) -> tuple[str, Path, dict]:
    out = tmp_path_factory.mktemp(f"hfref-{request.param}")
    (result,) = run_distributed(_megatron_side, 1, args=(str(out), request.param), env=ENV, timeout_s=900)
    return request.param, out, result


def test_megatron_in_the_mode_equals_the_hf_reference_bitwise(scored):
    import torch

    dtype_name, out, result = scored
    assert result["norm_classes"] == ["InvariantRMSNorm"], "the mode did not reach Megatron's norms"
    reference = _hf_reference(out, dtype_name, result["tokens"])
    equal = reference == result["on"]
    assert bool(equal.all()), (
        f"{dtype_name}: {int((~equal).sum())} of {equal.numel()} log-probs differ, max "
        f"{(reference - result['on']).abs().max().item():.3e}; first at {(~equal).nonzero()[0].tolist()}"
    )
    assert torch.isfinite(reference).all()


def test_the_comparison_can_fail(scored):
    """The adapter matters (dropping it moves the reference) and the default kernels do not match it."""
    dtype_name, out, result = scored
    with_adapter = _hf_reference(out, dtype_name, result["tokens"])
    without = _hf_reference(out, dtype_name, result["tokens"], adapter=False)
    effect = (with_adapter - without).abs().max().item()
    off_diff = (with_adapter - result["off"]).abs()
    print(f"{dtype_name}: adapter moves the log-probs by up to {effect:.3e}; mode off: Megatron vs reference "
          f"max {off_diff.max().item():.3e}, {int((off_diff == 0).sum())}/{off_diff.numel()} tokens equal")
    assert effect > 1e-2
    assert off_diff.max().item() > 0, "Megatron's default kernels gave the reference's bits: the check proves nothing"
    assert off_diff.max().item() < (5e-2 if dtype_name == "bfloat16" else 1e-4)


def _load(out: Path, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "base", dtype=getattr(torch, dtype_name)).eval()


def test_stock_kernel_references_agree_with_the_reference_to_rounding_only(scored):
    """The mode-off references of the GPU benchmark (adapter unmerged on HF's kernels, adapter merged)
    compute the same function: within rounding of the reference, and restore_forwards gives HF's own back."""
    import torch

    from moe_lora_plugins.testing import hf_onpolicy

    dtype_name, out, result = scored
    if dtype_name != "float32":
        pytest.skip("rounding-level agreement is checked in float32")
    tokens = result["tokens"]
    model = _load(out, dtype_name)

    def stock_logprobs():
        with torch.no_grad():
            logits = model(input_ids=tokens, use_cache=False).logits
        return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)

    base_only = stock_logprobs()
    hf_onpolicy.apply_onpolicy_forwards(model, out / "adapter")
    reference = hf_onpolicy.hf_token_logprobs(model, tokens)
    hf_onpolicy.restore_forwards(model)
    assert torch.equal(stock_logprobs(), base_only), "restore_forwards left a replaced forward behind"
    hf_onpolicy.apply_stock_lora_forwards(model, out / "adapter")
    unmerged = stock_logprobs()
    hf_onpolicy.restore_forwards(model)
    hf_onpolicy.merge_adapter(model, out / "adapter")
    merged = stock_logprobs()
    for label, other in (("unmerged", unmerged), ("merged", merged)):
        diff = (other - reference).abs().max().item()
        assert 0 < diff < 1e-4, f"{label} stock LoRA vs reference: {diff:.3e}"
    assert (base_only - reference).abs().max().item() > 1e-2  # the adapter is applied in each of them


def test_adapter_modules_the_reference_does_not_apply_are_refused(scored, tmp_path):
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from moe_lora_plugins.testing.hf_onpolicy import HfReferenceError, apply_onpolicy_forwards

    dtype_name, out, _ = scored
    adapter = tmp_path / "adapter"
    shutil.copytree(out / "adapter", adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    hidden, experts, rank = 64, 4, config["r"]
    prefix = "base_model.model.model.layers.1.mlp.gate"
    tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, hidden)
    tensors[f"{prefix}.lora_B.weight"] = torch.zeros(experts, rank)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(HfReferenceError, match=r"router LoRA on model\.layers\.1\.mlp\.gate"):
        apply_onpolicy_forwards(_load(out, dtype_name), adapter)
    tensors = {k.replace(prefix, "base_model.model.model.layers.1.mlp.shared_expert.up_proj"): v
               for k, v in tensors.items()}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(HfReferenceError, match=r"does not apply: \['model\.layers\.1\.mlp\.shared_expert\.up_proj'\]"):
        apply_onpolicy_forwards(_load(out, dtype_name), adapter)

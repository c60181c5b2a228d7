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

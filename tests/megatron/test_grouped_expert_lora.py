"""Grouped expert LoRA on SequentialMLP: the same logits and LoRA gradients as upstream's per-expert path.

Each rank builds a tiny Qwen3-MoE through Megatron-Bridge (local spec: SequentialMLP experts, LoRA on
attention and every expert), runs one forward + backward with upstream's per-expert adapters, then
activates the suite and runs it again, then once more with true on-policy mode on. The grouped path
must have run (its calls are counted: two per MoE layer) and give bitwise the same logits and
gradients on the CPU. In on-policy mode it must step aside (no grouped call): the batch-invariant
MoE path computes the same function with another summation order, so its numbers agree with
upstream's to rounding (the on-policy mode's own bitwise checks are in test_onpolicy_trainer.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import LoraSettings, ParallelLayout, tiny_qwen3_moe_config

TOKENS = (3, 17, 42, 99, 5, 64, 8, 120, 1, 77, 31, 2, 9, 14, 66, 101)
LORA = LoraSettings(dim=8, alpha=16)


def _model_and_batch(hf_config: Any, layout: ParallelLayout, dtype: Any) -> tuple[Any, Any, Any, Any]:
    """The tiny model every case here steps (LoRA on attention and every expert, filled from global
    names, in train mode), its token batch, causal mask and loss weights."""
    import torch

    from moe_lora_plugins.demo import cpu_training
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names

    built = build_lora_model(hf_config, layout, LORA, dtype=dtype)
    cpu_training.install()
    fill_from_global_names(built)
    model = built.model[0]
    model.train()
    tokens = torch.tensor([TOKENS])
    seq = tokens.shape[1]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    weights = torch.randn(1, seq, hf_config.vocab_size, generator=torch.Generator().manual_seed(7))
    return model, tokens, causal, weights


def _count_calls(owner: Any, name: str) -> tuple[dict[str, int], Any]:
    """Replace ``owner.<name>`` (a module-level function the patch calls through its module) with one
    that counts its calls in ``counter["n"]``; returns the counter and the original function."""
    original = getattr(owner, name)
    counter = {"n": 0}

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter["n"] += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    return counter, original


def forward_backward_three_ways(
    hf_config: Any, layout: ParallelLayout, dtype_name: str, expert_hooks: bool = False
) -> dict[str, Any]:
    import os

    import torch

    import moe_lora_plugins
    import moe_lora_plugins.lora.grouped as grouped
    import moe_lora_plugins.patches.megatron_bridge.grouped_expert_lora as patch

    model, tokens, causal, weights = _model_and_batch(hf_config, layout, getattr(torch, dtype_name))
    seq = tokens.shape[1]
    calls, _ = _count_calls(grouped, "grouped_lora_delta")
    one_activation, _ = _count_calls(patch, "_one_activation_forward")
    if expert_hooks:  # a hook on an expert module: the experts' activation must run per expert
        seen = []
        for module in model.modules():
            if type(module).__name__ == "SequentialMLP":
                for expert in module.local_experts:
                    expert.register_forward_pre_hook(lambda m, args: seen.append(1))

    def step() -> dict[str, Any]:
        for p in model.parameters():
            p.grad = None
        calls["n"] = 0
        one_activation["n"] = 0
        logits = model(input_ids=tokens, position_ids=torch.arange(seq)[None], attention_mask=causal)
        (logits.float() * weights).sum().backward()
        # the on-policy MoE path computes only the experts that received tokens, so an idle expert's
        # adapter gets no gradient at all where upstream gives it zeros
        grads = {
            n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        return {
            "logits": logits.detach().clone(),
            "grads": grads,
            "grouped_calls": calls["n"],
            "one_activation_calls": one_activation["n"],
        }

    upstream = step()
    moe_lora_plugins.activate(role="trainer")
    from moe_lora_plugins.activation import get_registry

    status = get_registry().status("megatron_bridge.grouped_expert_lora").name.lower()
    patched = step()
    os.environ["MOELORA_TRUE_ON_POLICY"] = "1"
    try:
        on_policy = step()
    finally:
        del os.environ["MOELORA_TRUE_ON_POLICY"]

    def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
        out = [] if torch.equal(a["logits"], b["logits"]) else ["logits"]
        return out + [n for n in a["grads"] if not torch.equal(a["grads"][n], b["grads"][n])]

    def worst_relative(a: dict[str, Any], b: dict[str, Any]) -> float:
        pairs = [(a["logits"], b["logits"])] + [(a["grads"][n], b["grads"][n]) for n in a["grads"]]
        worst = 0.0
        for x, y in pairs:
            scale = max(x.float().abs().max().item(), 1e-12)
            worst = max(worst, (x.float() - y.float()).abs().max().item() / scale)
        return worst

    expert_lora = [n for n in upstream["grads"] if ".experts." in n and ".adapter." in n]
    return {
        "status": status,
        "moe_layers": sum(1 for m in model.modules() if type(m).__name__ == "SequentialMLP"),
        "patched_calls": patched["grouped_calls"],
        "one_activation_calls": patched["one_activation_calls"],
        "on_policy_calls": on_policy["grouped_calls"],
        "patched_differs": diff(upstream, patched),
        "on_policy_relative": worst_relative(upstream, on_policy),
        "expert_lora_grads": len(expert_lora),
        "zero_expert_lora_grads": [n for n in expert_lora if torch.count_nonzero(upstream["grads"][n]) == 0],
    }


@pytest.mark.parametrize(
    "layout,dtype_name,expert_hooks",
    [
        (ParallelLayout(), "float32", False),
        (ParallelLayout(), "bfloat16", False),
        (ParallelLayout(ep=2), "float32", False),
        (ParallelLayout(), "float32", True),
    ],
    ids=["world1-fp32", "world1-bf16", "ep2-fp32", "world1-fp32-expert-hooks"],
)
def test_grouped_expert_lora_gives_upstreams_logits_and_gradients_bitwise(layout, dtype_name, expert_hooks):
    config = tiny_qwen3_moe_config(num_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    results = run_distributed(
        forward_backward_three_ways, layout.world_size, (config, layout, dtype_name, expert_hooks), timeout_s=600
    )
    for rank, r in enumerate(results):
        assert r["status"] == "applied", (rank, r["status"])
        assert r["moe_layers"] == 2
        # the experts' activation ran once per layer, or per expert where an expert module has hooks
        assert r["one_activation_calls"] == (0 if expert_hooks else r["moe_layers"]), (rank, r["one_activation_calls"])
        # experts that got no token keep zero gradients (upstream's too): most must have some
        assert len(r["zero_expert_lora_grads"]) < r["expert_lora_grads"] / 2, (rank, r)
        assert r["patched_calls"] == 2 * r["moe_layers"], (rank, r["patched_calls"])
        assert r["patched_differs"] == [], (rank, r["patched_differs"][:8])
        assert r["on_policy_calls"] == 0, (rank, r["on_policy_calls"])
        tolerance = 5e-2 if dtype_name == "bfloat16" else 1e-4
        print("on-policy vs upstream, worst relative", dtype_name, r["on_policy_relative"])
        assert r["on_policy_relative"] < tolerance, (rank, r["on_policy_relative"])


def grouped_follows_changes_between_calls(hf_config: Any, layout: ParallelLayout) -> dict[str, Any]:
    """One model, changed between steps the ways a user changes it; after each change a step upstream
    (suite off) and a step with the suite on must give bitwise the same logits and LoRA gradients, and
    the grouped calls per step say which layers ran grouped."""
    import torch

    import moe_lora_plugins
    import moe_lora_plugins.lora.grouped as grouped

    model, tokens, causal, weights = _model_and_batch(hf_config, layout, torch.float32)
    seq = tokens.shape[1]
    calls, plain_delta = _count_calls(grouped, "grouped_lora_delta")
    layers = [m for m in model.modules() if type(m).__name__ == "SequentialMLP"]
    first = layers[0].local_experts[1]
    seen: dict[str, list[Any]] = {"fc1_hook": [], "pre_hook": []}

    def step(suite_on: bool) -> tuple[Any, dict[str, Any], int]:
        if suite_on:
            moe_lora_plugins.activate(role="trainer")
        else:
            moe_lora_plugins.deactivate()
        for p in model.parameters():
            p.grad = None
        calls["n"] = 0
        seen["fc1_hook"].clear()
        logits = model(input_ids=tokens, position_ids=torch.arange(seq)[None], attention_mask=causal)
        (logits.float() * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        return logits.detach().clone(), grads, calls["n"]

    def compare(name: str) -> dict[str, Any]:
        up_logits, up_grads, _ = step(suite_on=False)
        up_hook = [t.clone() for t in seen["fc1_hook"]]
        logits, grads, n = step(suite_on=True)
        differs = [] if torch.equal(logits, up_logits) else ["logits"]
        differs += [k for k in up_grads if k not in grads or not torch.equal(grads[k], up_grads[k])]
        hook_equal = len(up_hook) == len(seen["fc1_hook"]) and all(
            torch.equal(a, b) for a, b in zip(up_hook, seen["fc1_hook"], strict=True)
        )
        return {"case": name, "grouped_calls": n, "differs": differs[:8], "fc1_hook_outputs_equal": hook_equal}

    out = [compare("as built")]
    wrapper = first.linear_fc1
    wrapper.disable_adapter_layers()
    out.append(compare("one fc1 adapter disabled"))
    wrapper.enable_adapter_layers()
    out.append(compare("enabled again"))
    lora_fc2 = first.linear_fc2
    first.linear_fc2 = lora_fc2.to_wrap
    out.append(compare("one fc2 LoRA swapped for its base layer"))
    first.linear_fc2 = lora_fc2
    out.append(compare("swapped back"))
    linear_in = wrapper.adapter.linear_in
    with torch.no_grad():
        replacement = torch.nn.Parameter(linear_in.weight.detach() * 2)
    linear_in.weight = replacement
    case = compare("one fc1 LoRA A replaced by a new parameter")
    case["new_parameter_has_grad"] = replacement.grad is not None and bool(replacement.grad.abs().sum() > 0)
    out.append(case)
    handles = [
        wrapper.register_forward_hook(lambda m, a, o: seen["fc1_hook"].append(o[0].detach())),
        wrapper.register_forward_pre_hook(lambda m, a: seen["pre_hook"].append(m)),
    ]
    case = compare("forward hook and pre-hook on an fc1 LoRA wrapper")
    case["pre_hook_module_is_wrapper"] = bool(seen["pre_hook"]) and all(m is wrapper for m in seen["pre_hook"])
    out.append(case)
    for handle in handles:
        handle.remove()
    handle = lora_fc2.register_forward_hook(lambda m, a, o: None)
    out.append(compare("forward hook on an fc2 LoRA wrapper"))
    handle.remove()
    out.append(compare("hooks removed"))
    grouped.grouped_lora_delta = plain_delta
    return {"moe_layers": len(layers), "cases": out}


def test_grouped_expert_lora_notices_a_disabled_adapter_a_swapped_module_and_hooks_between_calls():
    config = tiny_qwen3_moe_config(num_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    (result,) = run_distributed(grouped_follows_changes_between_calls, 1, (config, ParallelLayout()), timeout_s=600)
    every = 2 * result["moe_layers"]
    one_layer_aside = every - 2
    expected_calls = {
        "as built": every,
        "one fc1 adapter disabled": one_layer_aside,
        "enabled again": every,
        "one fc2 LoRA swapped for its base layer": one_layer_aside,
        "swapped back": every,
        "one fc1 LoRA A replaced by a new parameter": every,
        "forward hook and pre-hook on an fc1 LoRA wrapper": every,
        "forward hook on an fc2 LoRA wrapper": one_layer_aside,
        "hooks removed": every,
    }
    cases = {c["case"]: c for c in result["cases"]}
    assert list(cases) == list(expected_calls)
    for name, case in cases.items():
        assert case["differs"] == [], case
        assert case["grouped_calls"] == expected_calls[name], case
        assert case["fc1_hook_outputs_equal"], case
    assert cases["one fc1 LoRA A replaced by a new parameter"]["new_parameter_has_grad"]
    assert cases["forward hook and pre-hook on an fc1 LoRA wrapper"]["pre_hook_module_is_wrapper"]

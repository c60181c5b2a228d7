"""Benchmark: one training step (forward + backward) with LoRA on every expert, upstream vs grouped.

Issue 14's model: Qwen3-30B-A3B layer shapes (hidden 2048, 128 experts of 768, top-8, 32 heads x
128, 4 KV heads, vocab 32000), 8 layers, 5.1 B parameters, bf16, Megatron-Core local spec (experts
are ``SequentialMLP``), one GPU, one forward + backward over 4 x 2048 tokens, LoRA r=16 (alpha 32).
Modes, timed round by round in one process (interleaved, so drift favours none):

- ``forward``: forward only, no LoRA (``torch.no_grad``);
- ``full``: forward + backward, every parameter trainable, no LoRA;
- ``lora_attention``: LoRA on qkv / proj only, base frozen;
- ``lora_experts_upstream``: LoRA on qkv / proj / fc1 / fc2 of every expert, suite off;
- ``lora_experts_grouped``: the same model with the suite on (``megatron_bridge.grouped_expert_lora``);
- ``lora_experts_on_policy``: the suite on with ``MOELORA_TRUE_ON_POLICY=1`` (the grouped patch steps
  aside there, so this is upstream's per-expert path).

Before timing, the experts-LoRA model runs one step upstream and one grouped on the same tokens: the
logits and every LoRA gradient are compared (relative L2 error, max abs error), and layer 0's fc1 LoRA
output of the real routed tokens is computed three ways (upstream's per-expert bf16 matmuls, the
grouped kernel in bf16, per-expert in float32 as the reference) so both bf16 paths' errors against
float32 are reported side by side. Every timed round counts the grouped calls: the grouped rounds
must make two per MoE layer, the others none, or the script stops.

    python benchmarks/step_bench.py --out step.json [--rounds 5] [--warmup 2] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_lora_plugins.testing.tiny_models import LoraSettings  # noqa: E402

ATTENTION = ("linear_qkv", "linear_proj")
EVERY_LINEAR = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
MODES = (
    "forward",
    "full",
    "lora_attention",
    "lora_experts_upstream",
    "lora_experts_grouped",
    "lora_experts_on_policy",
)


def issue_config(layers: int = 8, experts: int = 128, tiny: bool = False) -> Any:
    from transformers import Qwen3MoeConfig

    if tiny:  # a CPU smoke run of this script
        from moe_lora_plugins.testing.tiny_models import tiny_qwen3_moe_config

        return tiny_qwen3_moe_config(num_hidden_layers=layers, num_experts=experts, torch_dtype="bfloat16")
    return Qwen3MoeConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=experts,
        num_experts_per_tok=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["Qwen3MoeForCausalLM"],
    )


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _build(config: Any, lora: LoraSettings | None) -> Any:
    import torch

    from moe_lora_plugins.testing.tiny_models import ParallelLayout, build_lora_model, fill_from_global_names

    device = _device()
    built = build_lora_model(config, ParallelLayout(), lora, dtype=torch.bfloat16, device=device)
    fill_from_global_names(built, generate_on=device)
    return built.model[0]


class _Inputs:
    def __init__(self, batch: int, seq: int, vocab: int) -> None:
        import torch

        device = _device()
        g = torch.Generator(device=device).manual_seed(0)
        self.tokens = torch.randint(0, vocab, (batch, seq), device=device, generator=g)
        self.labels = torch.randint(0, vocab, (batch, seq), device=device, generator=g)
        self.position_ids = torch.arange(seq, device=device)[None].expand(batch, seq)
        self.mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)[None, None]


def _step(model: Any, inputs: _Inputs, *, backward: bool) -> None:
    import torch

    if not backward:
        with torch.no_grad():
            model(input_ids=inputs.tokens, position_ids=inputs.position_ids, attention_mask=inputs.mask)
        return
    loss = model(
        input_ids=inputs.tokens, position_ids=inputs.position_ids, attention_mask=inputs.mask, labels=inputs.labels
    )
    loss.float().mean().backward()
    for p in _trainable(model):
        p.grad = None


_TRAINABLE: dict[int, list[Any]] = {}


def _trainable(model: Any) -> list[Any]:
    """The model's trainable parameters, listed once, as an optimizer holds them: the grad reset after a
    timed step walks this list, not ``model.parameters()`` (a walk of every module, ~16k with expert LoRA,
    ~3k with attention LoRA, which earlier runs timed inside the step)."""
    params = _TRAINABLE.get(id(model))
    if params is None:
        params = _TRAINABLE[id(model)] = [p for p in model.parameters() if p.requires_grad]
    return params


def _enter(mode: str) -> None:
    import moe_lora_plugins

    if mode.startswith("lora_experts") and mode != "lora_experts_upstream":
        moe_lora_plugins.activate(role="trainer")
    else:  # upstream, and the modes without expert LoRA (no patch check in their timed steps)
        moe_lora_plugins.deactivate()
    if mode == "lora_experts_on_policy":
        os.environ["MOELORA_TRUE_ON_POLICY"] = "1"
    else:
        os.environ.pop("MOELORA_TRUE_ON_POLICY", None)


def _rel(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _check_against_upstream(model: Any, inputs: _Inputs) -> dict[str, Any]:
    """Logits and every LoRA gradient, upstream vs grouped, on the same tokens."""
    import torch

    runs = {}
    for mode in ("lora_experts_upstream", "lora_experts_grouped", "lora_experts_upstream_again"):
        _enter(mode.removesuffix("_again"))
        for p in model.parameters():
            p.grad = None
        logits = model(input_ids=inputs.tokens, position_ids=inputs.position_ids, attention_mask=inputs.mask)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), inputs.labels.flatten())
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[mode] = (logits.detach(), grads)
        del logits, loss
    (lu, gu), (lg, gg) = runs["lora_experts_upstream"], runs["lora_experts_grouped"]
    la, ga = runs["lora_experts_upstream_again"]
    expert = [n for n in gu if ".experts." in n]
    other = [n for n in gu if ".experts." not in n]
    for p in model.parameters():
        p.grad = None

    def worst(grads: dict[str, Any], names: list[str]) -> dict[str, float]:
        rel = [_rel(grads[n], gu[n]) for n in names if gu[n].norm() > 0]
        return {"count": len(names), "rel_l2_max": max(rel), "rel_l2_median": statistics.median(rel)}

    # upstream against itself: Megatron's token unpermute adds with atomics on CUDA, so two upstream
    # steps differ too (and a token near a routing tie can change experts): the noise floor.
    return {
        "logits_rel_l2": _rel(lg, lu),
        "logits_max_abs": float((lg.float() - lu.float()).abs().max()),
        "logits_max_abs_reference": float(lu.float().abs().max()),
        "logits_bitwise_equal": bool(torch.equal(lg, lu)),
        "expert_lora_grads": worst(gg, expert),
        "attention_lora_grads": worst(gg, other),
        "upstream_again": {
            "logits_rel_l2": _rel(la, lu),
            "logits_bitwise_equal": bool(torch.equal(la, lu)),
            "expert_lora_grads": worst(ga, expert),
            "attention_lora_grads": worst(ga, other),
        },
    }


def _check_layer_against_float32(model: Any, inputs: _Inputs) -> dict[str, Any]:
    """Layer 0's fc1 LoRA output of its real routed tokens: bf16 per-expert and bf16 grouped vs float32."""
    import torch

    from moe_lora_plugins.lora.grouped import grouped_lora_delta, resolve_backend

    experts = next(m for m in model.modules() if type(m).__name__ == "SequentialMLP")
    captured: dict[str, Any] = {}

    def keep(module: Any, args: Any) -> None:
        captured.setdefault("hidden", args[0].detach().clone())
        captured.setdefault("counts", args[1].detach().clone())

    handle = experts.register_forward_pre_hook(keep)
    _enter("lora_experts_upstream")
    with torch.no_grad():
        model(input_ids=inputs.tokens, position_ids=inputs.position_ids, attention_mask=inputs.mask)
    handle.remove()
    adapters = [e.linear_fc1.adapter for e in experts.local_experts]
    lora_a = torch.stack([a.linear_in.weight.detach() for a in adapters])
    lora_b = torch.stack([a.linear_out.weight.detach() for a in adapters])
    scale = adapters[0].alpha / adapters[0].dim
    x, counts = captured["hidden"], captured["counts"].tolist()
    with torch.no_grad():
        reference = grouped_lora_delta(x.float(), lora_a.float(), lora_b.float(), counts, scale, backend="loop")
        per_expert = grouped_lora_delta(x, lora_a, lora_b, counts, scale, backend="loop")
        grouped = grouped_lora_delta(x, lora_a, lora_b, counts, scale, backend="auto")
    return {
        "tokens": int(x.shape[0]),
        "experts": len(counts),
        "backend": resolve_backend("auto", x, lora_a, lora_b),
        "per_expert_bf16_vs_fp32_rel_l2": _rel(per_expert, reference),
        "grouped_bf16_vs_fp32_rel_l2": _rel(grouped, reference),
        "grouped_vs_per_expert_rel_l2": _rel(grouped, per_expert),
        "grouped_equals_per_expert_bitwise": bool(torch.equal(grouped, per_expert)),
    }


def _timed(model: Any, inputs: _Inputs, mode: str, calls: dict[str, int]) -> tuple[float, int]:

    _enter(mode)
    _sync()
    calls["n"] = 0
    start = time.perf_counter()
    _step(model, inputs, backward=mode != "forward")
    _sync()
    return time.perf_counter() - start, calls["n"]


def run(
    rounds: int = 5,
    warmup: int = 2,
    layers: int = 8,
    experts: int = 128,
    batch: int = 4,
    seq: int = 2048,
    tiny: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    import torch

    import moe_lora_plugins.lora.grouped as grouped
    from moe_lora_plugins.testing.distributed import init_single_process_group

    cuda = init_single_process_group()
    if not cuda:
        from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

        prepare_megatron_cpu()
    from moe_lora_plugins.demo import cpu_training

    config = issue_config(layers, experts, tiny)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    result: dict[str, Any] = {"device": device_name, "batch": batch, "seq": seq, "layers": layers, "experts": experts}
    start = time.perf_counter()
    models = {"base": _build(config, None)}
    cpu_training.install()  # the CUDA RNG fork around attention dropout (0 here)
    models["attention"] = _build(config, LoraSettings(dim=16, alpha=32, target_modules=ATTENTION))
    models["experts"] = _build(config, LoraSettings(dim=16, alpha=32, target_modules=EVERY_LINEAR))
    result["build_seconds"] = time.perf_counter() - start
    result["params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    result["trainable"] = {
        k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()
    }
    moe_layers = sum(1 for m in models["experts"].modules() if type(m).__name__ == "SequentialMLP")
    inputs = _Inputs(batch, seq, config.vocab_size)
    result["check_whole_model"] = _check_against_upstream(models["experts"], inputs)
    result["check_layer0_fc1_lora"] = _check_layer_against_float32(models["experts"], inputs)

    calls = {"n": 0}
    plain_delta = grouped.grouped_lora_delta

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return plain_delta(*args, **kwargs)

    grouped.grouped_lora_delta = counted
    model_of = {"forward": "base", "full": "base", "lora_attention": "attention"}
    modes = [m for m in MODES if m in (only or MODES)]
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(warmup + rounds):
        for mode in modes:
            seconds, n = _timed(models[model_of.get(mode, "experts")], inputs, mode, calls)
            expected = 2 * moe_layers if mode == "lora_experts_grouped" else 0
            if n != expected:
                raise RuntimeError(f"{mode}: {n} grouped calls in a step, expected {expected}")
            if r >= warmup:
                samples[mode].append(seconds)
    grouped.grouped_lora_delta = plain_delta
    _enter("lora_experts_upstream")
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result["samples"] = samples
    result["timings"] = {
        m: {"median": statistics.median(v), "min": min(v), "max": max(v)} for m, v in samples.items()
    }
    med = {m: result["timings"][m]["median"] for m in modes}
    ratios = {
        "experts_grouped_over_attention": ("lora_experts_grouped", "lora_attention"),
        "experts_upstream_over_attention": ("lora_experts_upstream", "lora_attention"),
        "experts_on_policy_over_attention": ("lora_experts_on_policy", "lora_attention"),
        "experts_grouped_over_upstream": ("lora_experts_grouped", "lora_experts_upstream"),
    }
    result["ratios"] = {name: med[a] / med[b] for name, (a, b) in ratios.items() if a in med and b in med}
    return result


def diagnose(layers: int = 8, experts: int = 128, batch: int = 4, seq: int = 2048) -> dict[str, Any]:
    """Where the grouped step's time goes next to the attention-only step: forward-only and
    forward+backward times of each, and a cProfile of one step of each (top functions by own time)."""
    import cProfile
    import io
    import pstats

    import torch

    from moe_lora_plugins.testing.distributed import init_single_process_group

    init_single_process_group()
    config = issue_config(layers, experts, tiny=not torch.cuda.is_available())
    models = {"attention": _build(config, LoraSettings(dim=16, alpha=32, target_modules=ATTENTION))}
    from moe_lora_plugins.demo import cpu_training

    cpu_training.install()
    models["experts"] = _build(config, LoraSettings(dim=16, alpha=32, target_modules=EVERY_LINEAR))
    inputs = _Inputs(batch, seq, config.vocab_size)
    result: dict[str, Any] = {"check_whole_model": _check_against_upstream(models["experts"], inputs)}
    cases = {"lora_attention": "attention", "lora_experts_grouped": "experts", "lora_experts_upstream": "experts"}
    times: dict[str, dict[str, list[float]]] = {m: {"forward": [], "step": []} for m in cases}
    for _ in range(4):
        for mode, model in cases.items():
            for what in ("forward", "step"):
                _enter(mode)
                _sync()
                start = time.perf_counter()
                _step(models[model], inputs, backward=what == "step")
                _sync()
                times[mode][what].append(time.perf_counter() - start)
    result["times_median"] = {m: {w: statistics.median(v[1:]) for w, v in d.items()} for m, d in times.items()}
    result["profiles"] = {}
    for mode in ("lora_attention", "lora_experts_grouped"):
        _enter(mode)
        profiler = cProfile.Profile()
        _sync()
        profiler.enable()
        _step(models[cases[mode]], inputs, backward=True)
        _sync()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(22)
        result["profiles"][mode] = text.getvalue()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="tiny model (hidden 64): a CPU smoke run")
    parser.add_argument("--diagnose", action="store_true", help="time breakdown and profiles instead of the table")
    parser.add_argument("--modes", default="", help=f"comma-separated subset of {', '.join(MODES)} (default: all)")
    args = parser.parse_args()
    only = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(only) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    if args.diagnose:
        result = diagnose(args.layers, args.experts, args.batch, args.seq)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps({k: result[k] for k in ("check_whole_model", "times_median")}, indent=1))
        for name, text in result["profiles"].items():
            print(f"==== {name}\n{text}")
        return
    result = run(args.rounds, args.warmup, args.layers, args.experts, args.batch, args.seq, args.tiny, only)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("timings", "ratios", "check_whole_model", "check_layer0_fc1_lora")}, indent=1))


if __name__ == "__main__":
    main()

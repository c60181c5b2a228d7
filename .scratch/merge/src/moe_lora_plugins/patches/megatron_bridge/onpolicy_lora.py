"""Patch: Megatron-Bridge's LoRA adapter through the batch-invariant ops, in true-on-policy mode only.

``ParallelLinearAdapter.forward`` computes ``linear_out(linear_in(x)) * (alpha / dim)``; vLLM stores
``lora_b * scaling`` and computes ``(x A^T)(s B)^T``. In true-on-policy mode the adapter computes
:func:`moe_lora_plugins.onpolicy.ops.lora_delta`, the same order the engine's patched punica path
uses, so base + delta has the same bits on both sides.
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.onpolicy_lora_adapter",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.peft.utils",
        attribute="ParallelLinearAdapter.forward",
        kind="wrap",
        mode="true_on_policy",
        implementation="moe_lora_plugins.patches.megatron_bridge.onpolicy_lora:adapter_forward",
        fingerprint="(self, x, *args, **kwargs)",
        why="The LoRA delta is (B(Ax))*s on the trainer and (Ax)(sB) in vLLM, each with its own matmul; in "
        "true-on-policy mode the adapter computes onpolicy.ops.lora_delta, the engine's order.",
        upstream="none (a numerics contract between trainer and engine, not a bug)",
        remove_when="never while trainer and engine use different LoRA kernels",
        verified="megatron-bridge 0.6.2, CPU gloo, float32: part of the demo's bitwise train/rollout log-prob "
        "equality in every layout (tests/e2e)",
    ),
)


def adapter_forward(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    from moe_lora_plugins import onpolicy

    if not onpolicy.enabled():
        return wrapped(*args, **kwargs)
    import torch

    from moe_lora_plugins.onpolicy import ops
    from moe_lora_plugins.onpolicy.contract import OnPolicyUnsupported

    x = args[0] if args else kwargs["x"]
    dropout = getattr(instance, "dropout", None)
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and instance.training:
        raise OnPolicyUnsupported(
            f"true-on-policy mode (Megatron-Bridge LoRA): LoRA dropout {dropout.p} changes the scoring forward; "
            "set --lora-dropout 0"
        )
    if not isinstance(getattr(instance, "activation", None), torch.nn.Identity):
        raise OnPolicyUnsupported("true-on-policy mode (Megatron-Bridge LoRA): the adapter has an activation; "
                                  "the mode covers plain LoRA (identity activation)")
    scale = instance.alpha / instance.dim
    return ops.lora_delta(x, instance.linear_in.weight, instance.linear_out.weight, scale)

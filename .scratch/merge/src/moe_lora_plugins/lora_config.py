"""The LoRA settings every host exposes (``--enable-lora``, ``--lora-rank``, ...) and the one check of them.

:class:`LoraConfig` is the dataclass; :func:`add_lora_arguments` adds the flags to a host's argparse
parser and :meth:`LoraConfig.from_args` reads them back; :func:`validate_lora_config` refuses every
combination that cannot work, each refusal naming the flag, the values and what to do. The rules are
listed in docs/lora-config.md. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from moe_lora_plugins.errors import MoeLoraError

ExpertAdapters = Literal["per-expert", "shared", "shared-outer"]
SyncMode = Literal["adapter", "merged"]

EXPERT_ADAPTER_CHOICES: tuple[str, ...] = ("per-expert", "shared", "shared-outer")
SYNC_MODE_CHOICES: tuple[str, ...] = ("adapter", "merged")

DENSE_TARGETS = frozenset({"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"})
MLA_TARGETS = frozenset(
    {"linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj"}
)
# Megatron module names LoRA can wrap, per model family. In MoE models ``linear_fc1`` / ``linear_fc2``
# also name the routed experts (``mlp.experts...``) and the shared experts (``mlp.shared_experts``);
# ``router`` is the TopKRouter gate.
KNOWN_TARGETS: dict[str, frozenset[str]] = {
    "gpt": DENSE_TARGETS,
    "moe": DENSE_TARGETS | {"router"},
    "mla": (DENSE_TARGETS - {"linear_qkv"}) | MLA_TARGETS,
    "mla-moe": (DENSE_TARGETS - {"linear_qkv"}) | MLA_TARGETS | {"router"},
}
# HF projection names people write, and the fused Megatron module that holds them.
HF_ALIASES: dict[str, str] = {
    "q_proj": "linear_qkv",
    "k_proj": "linear_qkv",
    "v_proj": "linear_qkv",
    "o_proj": "linear_proj",
    "gate_proj": "linear_fc1",
    "up_proj": "linear_fc1",
    "down_proj": "linear_fc2",
    "gate": "router",
}
ALL_LINEAR = "all-linear"


class LoraConfigError(MoeLoraError, ValueError):
    """One or more LoRA settings cannot work together; ``problems`` holds one line per rule broken."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid LoRA configuration:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the actor: where, how large, and how its weights reach the rollout engine.

    ``expert_adapters``: ``per-expert`` (one adapter per routed expert, what vLLM / SGLang serve as
    ``experts.E.*_proj``), ``shared`` (one adapter for all local experts of a grouped-GEMM layer) or
    ``shared-outer`` (gate/up ``A`` and down ``B`` shared, the other factor per expert; SGLang's
    ``experts_shared_outer_loras``). ``sync_mode``: ``adapter`` sends LoRA tensors to an engine that
    serves LoRA; ``merged`` sends ``W + (alpha / r) B A`` to an engine that serves plain weights.
    """

    enabled: bool = False
    target_modules: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    expert_adapters: ExpertAdapters = "per-expert"
    sync_mode: SyncMode = "adapter"
    true_on_policy: bool = False

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on ``B @ A``."""
        return self.alpha / self.rank

    def megatron_targets(self) -> list[str]:
        """Target modules in Megatron names (``all-linear`` and HF aliases resolved; wildcards kept)."""
        resolved: list[str] = []
        for target in self.target_modules:
            names = sorted(DENSE_TARGETS) if target == ALL_LINEAR else [HF_ALIASES.get(target, target)]
            resolved.extend(name for name in names if name not in resolved)
        return resolved

    def to_megatron_bridge(self) -> Any:
        """The ``megatron.bridge.peft.lora.LoRA`` transform for these settings."""
        from megatron.bridge.peft.lora import LoRA

        return LoRA(
            target_modules=self.megatron_targets(),
            dim=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            share_expert_adapters=self.expert_adapters == "shared",
            experts_shared_outer_loras=self.expert_adapters == "shared-outer",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoraConfig:
        """Read the flags :func:`add_lora_arguments` added (missing ones keep their defaults)."""
        defaults = cls()
        targets = getattr(args, "lora_target_modules", None)
        return cls(
            enabled=bool(getattr(args, "enable_lora", defaults.enabled)),
            target_modules=_split_targets(targets) if targets else defaults.target_modules,
            rank=getattr(args, "lora_rank", defaults.rank),
            alpha=getattr(args, "lora_alpha", defaults.alpha),
            dropout=getattr(args, "lora_dropout", defaults.dropout),
            expert_adapters=getattr(args, "lora_expert_adapters", defaults.expert_adapters),
            sync_mode=getattr(args, "lora_sync_mode", defaults.sync_mode),
            true_on_policy=bool(getattr(args, "true_on_policy", defaults.true_on_policy)),
        )


def _split_targets(values: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def add_lora_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the LoRA flags as one argument group; flags the host already defines are left to the host.

    Hosts such as slime (PR #1865) may already own ``--enable-lora`` and friends: those keep the host's
    definition, and :meth:`LoraConfig.from_args` reads them by the same destination names.
    """
    group = parser.add_argument_group("LoRA (moe-lora-plugins)")
    existing = set(parser._option_string_actions)
    d = LoraConfig()

    def add(flag: str, **kwargs: Any) -> None:
        if flag not in existing:
            group.add_argument(flag, **kwargs)

    add("--enable-lora", action="store_true", default=d.enabled,
        help="Train LoRA adapters on the actor (reference and critic models stay without LoRA).")
    add("--lora-target-modules", nargs="+", default=None, metavar="MODULE",
        help=f"Megatron module names (or HF aliases, wildcards, '{ALL_LINEAR}'); space- or comma-separated. "
             f"Default: {' '.join(d.target_modules)}.")
    add("--lora-rank", type=int, default=d.rank, help="LoRA rank r (> 0).")
    add("--lora-alpha", type=float, default=d.alpha, help="LoRA alpha (> 0); the delta is scaled by alpha / r.")
    add("--lora-dropout", type=float, default=d.dropout, help="Dropout on the LoRA input, in [0, 1).")
    add("--lora-expert-adapters", choices=EXPERT_ADAPTER_CHOICES, default=d.expert_adapters,
        help="MoE expert adapters: one per expert, one shared by the experts of a grouped-GEMM layer, "
             "or shared-outer (gate/up A and down B shared).")
    add("--lora-sync-mode", choices=SYNC_MODE_CHOICES, default=d.sync_mode,
        help="What reaches the rollout engine: LoRA tensors (adapter) or merged W + (alpha/r) B A (merged).")
    add("--true-on-policy", action="store_true", default=d.true_on_policy,
        help="True-on-policy mode: the trainer's log-probs equal the engine's bit for bit. Sets "
             "MOELORA_TRUE_ON_POLICY=on in this process (apply_true_on_policy); set it in the engine too.")
    return group


def apply_true_on_policy(config: LoraConfig, environ: Any = None) -> None:
    """Make ``--true-on-policy`` and ``MOELORA_TRUE_ON_POLICY`` agree: the flag switches the mode on in this
    process (and in the processes it starts); a flag off with the variable on is left on (the variable wins)."""
    import os

    env = os.environ if environ is None else environ
    if config.true_on_policy:
        env["MOELORA_TRUE_ON_POLICY"] = "on"


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about the model (read from a Megatron TransformerConfig)."""

    family: str = "gpt"
    num_moe_experts: int = 0
    moe_grouped_gemm: bool = False
    expert_tensor_parallel_size: int = 1

    @classmethod
    def from_megatron_config(cls, config: Any) -> ModelFacts:
        experts = getattr(config, "num_moe_experts", None) or 0
        mla = bool(getattr(config, "multi_latent_attention", False))
        family = ("mla" if mla else "gpt") if not experts else ("mla-moe" if mla else "moe")
        return cls(
            family=family,
            num_moe_experts=experts,
            moe_grouped_gemm=bool(getattr(config, "moe_grouped_gemm", False)),
            expert_tensor_parallel_size=getattr(config, "expert_tensor_parallel_size", None) or 1,
        )


@dataclass(frozen=True)
class EngineFacts:
    """What validation needs to know about the rollout engine."""

    name: str = "vllm"
    serves_lora: bool = True
    max_lora_rank: int | None = None


@dataclass(frozen=True)
class BridgeFacts:
    """What the installed Megatron-Bridge can do."""

    lora_fields: frozenset[str] = frozenset()
    expert_tp_fc1_split_ok: bool = False

    @classmethod
    def installed(cls, expert_tp_fc1_split_ok: bool = False) -> BridgeFacts:
        """Read the fields of the installed ``megatron.bridge.peft.lora.LoRA`` (imports Megatron-Bridge).

        ``expert_tp_fc1_split_ok`` says whether the fused fc1 LoRA B of experts is split correctly under
        expert-TP > 1 (Megatron-Bridge <= 0.6.2 forces tp_size=1 there; a patch that fixes it sets True).
        """
        import dataclasses

        from megatron.bridge.peft.lora import LoRA

        return cls(frozenset(f.name for f in dataclasses.fields(LoRA)), expert_tp_fc1_split_ok)


def _expert_fc1_targeted(targets: list[str]) -> bool:
    return any(
        t == "linear_fc1" or (("*" in t or "?" in t) and fnmatch.fnmatch("decoder.layers.0.mlp.experts.linear_fc1", t))
        for t in targets
    )


def validate_lora_config(
    config: LoraConfig,
    *,
    model: ModelFacts | None = None,
    model_module_names: Iterable[str] | None = None,
    bridge: BridgeFacts | None = None,
    engine: EngineFacts | None = None,
) -> None:
    """Raise :class:`LoraConfigError` naming every flag whose value cannot work; return if all is well.

    Checks that need facts about the model, the installed Megatron-Bridge or the engine run only when
    those facts are given, so a launcher can validate early (flags only) and again once the model is
    built (``model_module_names``: the qualified module names of the built chunks).
    """
    if not config.enabled:
        return
    problems: list[str] = []
    if not isinstance(config.rank, int) or config.rank <= 0:
        problems.append(f"--lora-rank must be a positive integer, got {config.rank!r}: LoRA needs rank r >= 1.")
    if not config.alpha > 0:
        problems.append(
            f"--lora-alpha must be > 0, got {config.alpha!r}: the delta is scaled by alpha / r, and alpha <= 0 "
            "trains nothing or the opposite sign."
        )
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"--lora-dropout must be in [0, 1), got {config.dropout!r}.")
    elif config.true_on_policy and config.dropout > 0:
        problems.append(f"--true-on-policy with --lora-dropout {config.dropout!r}: dropout makes the scoring "
                        "forward random, so log-probs cannot equal the engine's; set --lora-dropout 0.")
    if config.true_on_policy and config.sync_mode == "merged":
        problems.append("--true-on-policy with --lora-sync-mode merged: the engine would compute W' x with "
                        "W' = W + (alpha/r) B A, the trainer W x + delta, which round differently; use "
                        "--lora-sync-mode adapter.")
    if config.expert_adapters not in EXPERT_ADAPTER_CHOICES:
        problems.append(f"--lora-expert-adapters must be one of {list(EXPERT_ADAPTER_CHOICES)}, got {config.expert_adapters!r}.")
    if config.sync_mode not in SYNC_MODE_CHOICES:
        problems.append(f"--lora-sync-mode must be one of {list(SYNC_MODE_CHOICES)}, got {config.sync_mode!r}.")
    if not config.target_modules:
        problems.append("--lora-target-modules is empty: name at least one module (e.g. linear_qkv) or all-linear.")
    problems.extend(_fused_alias_problems(config.target_modules))
    targets = config.megatron_targets()

    if model is not None:
        problems.extend(_unknown_target_problems(targets, model, model_module_names))
        has_experts = model.num_moe_experts > 0
        if has_experts and config.expert_adapters in ("shared", "shared-outer") and not model.moe_grouped_gemm:
            problems.append(
                f"--lora-expert-adapters {config.expert_adapters} needs grouped-GEMM experts (moe_grouped_gemm=True); "
                "this model has SequentialMLP experts, where every expert is its own linear and gets its own "
                "adapter. Use --lora-expert-adapters per-expert, or build the model with grouped GEMM."
            )
        if (
            has_experts
            and model.expert_tensor_parallel_size > 1
            and _expert_fc1_targeted(targets)
            and bridge is not None
            and not bridge.expert_tp_fc1_split_ok
        ):
            problems.append(
                f"--lora-target-modules includes expert linear_fc1 with expert-TP "
                f"{model.expert_tensor_parallel_size}, but the installed Megatron-Bridge splits the fused gate/up "
                "LoRA B of experts as if expert-TP were 1 (shards come as [g0;u0;g1;u1]), so exported gate/up "
                "adapters would be wrong. Use expert_tensor_parallel_size=1, leave linear_fc1 out, or enable "
                "the moe-lora-plugins export patches that fix the split."
            )

    if bridge is not None and bridge.lora_fields:
        needed = {"per-expert": "share_expert_adapters", "shared-outer": "experts_shared_outer_loras"}
        field_name = needed.get(config.expert_adapters)
        if field_name and field_name not in bridge.lora_fields and (model is None or model.num_moe_experts > 0):
            problems.append(
                f"--lora-expert-adapters {config.expert_adapters} needs Megatron-Bridge's LoRA.{field_name}, "
                "which the installed Megatron-Bridge does not have; install megatron-bridge >= 0.6 or choose "
                "another --lora-expert-adapters."
            )

    if engine is not None:
        if config.sync_mode == "adapter" and not engine.serves_lora:
            problems.append(
                f"--lora-sync-mode adapter sends LoRA tensors, but the {engine.name} engine serves merged weights "
                "(LoRA not enabled there). Use --lora-sync-mode merged, or start the engine with LoRA enabled."
            )
        if config.sync_mode == "adapter" and "router" in targets:
            problems.append(
                f"--lora-target-modules includes router, but {engine.name} cannot serve LoRA on the MoE router; "
                "the router adapter would be dropped. Use --lora-sync-mode merged, or leave router out."
            )
        if (
            config.sync_mode == "adapter"
            and engine.max_lora_rank is not None
            and isinstance(config.rank, int)
            and config.rank > engine.max_lora_rank
        ):
            problems.append(
                f"--lora-rank {config.rank} exceeds the {engine.name} engine's max LoRA rank {engine.max_lora_rank}; "
                "raise the engine's --max-lora-rank or lower --lora-rank."
            )
    if problems:
        raise LoraConfigError(problems)


def _fused_alias_problems(targets: Iterable[str]) -> list[str]:
    given = set(targets)
    problems = []
    for fused, parts in (("linear_qkv", ("q_proj", "k_proj", "v_proj")), ("linear_fc1", ("gate_proj", "up_proj"))):
        named = [p for p in parts if p in given]
        if named and len(named) != len(parts):
            problems.append(
                f"--lora-target-modules names {', '.join(named)} without {', '.join(p for p in parts if p not in given)}: "
                f"Megatron holds them in one fused {fused}, which takes one adapter for all of them. "
                f"Name all of {', '.join(parts)} (or {fused})."
            )
    return problems


def _unknown_target_problems(
    targets: list[str], model: ModelFacts, module_names: Iterable[str] | None
) -> list[str]:
    known = KNOWN_TARGETS.get(model.family, DENSE_TARGETS)
    names = list(module_names) if module_names is not None else None
    leaves = {name.rsplit(".", 1)[-1] for name in names} if names is not None else None
    problems = []
    for target in targets:
        if "*" in target or "?" in target:
            if names is not None and not any(fnmatch.fnmatch(name, target) for name in names):
                problems.append(f"--lora-target-modules pattern {target!r} matches no module of the model.")
            continue
        available = leaves if leaves is not None else known
        if target not in available or target not in known:
            problems.append(
                f"--lora-target-modules {target!r} is not a LoRA target of a {model.family} model; known: "
                f"{sorted(known)}" + (" (in this model: " + ", ".join(sorted(known & leaves)) + ")" if leaves else "")
                + "."
            )
    return problems

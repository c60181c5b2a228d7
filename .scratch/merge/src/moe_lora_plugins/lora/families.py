"""Per-model-family tables that say which Megatron LoRA module becomes which HF projection(s).

One table per family of HF architectures that share module names. The converter in
:mod:`moe_lora_plugins.lora.convert` is driven only by these tables: adding a family is adding data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from moe_lora_plugins.errors import MoeLoraError

Split = Literal["none", "qkv", "gate_up"]


class UnknownModelFamilyError(MoeLoraError, KeyError):
    """No family table covers the requested HF ``model_type`` or family name."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModuleRule:
    """One Megatron module inside a decoder layer and the HF module(s) its LoRA maps to.

    ``split`` says how LoRA B of a fused Megatron module is cut into the HF projections: ``"qkv"``
    (query-group interleaved q/k/v), ``"gate_up"`` (``[gate; up]`` per tensor-parallel shard) or
    ``"none"`` (one HF module). LoRA A is shared by every projection of a fused module.
    """

    megatron: str
    hf: tuple[str, ...]
    split: Split = "none"
    is_expert: bool = False

    def __post_init__(self) -> None:
        expected = {"none": 1, "qkv": 3, "gate_up": 2}[self.split]
        if len(self.hf) != expected:
            raise ValueError(
                f"rule {self.megatron}: split {self.split!r} needs {expected} HF names, got {self.hf}"
            )


@dataclass(frozen=True)
class ExpertsRule:
    """The routed experts of an MoE layer.

    Megatron names them ``<megatron>.local_experts.{e}.linear_fc{1,2}`` (SequentialMLP, one 2-D
    adapter per expert) or ``<megatron>.linear_fc{1,2}`` (grouped experts: one 2-D adapter shared by
    all experts, a 3-D ``(E, ...)`` per-expert adapter, or the shared-outer mix). HF names them
    ``<hf>.{e}.<gate>/<up>/<down>``.
    """

    megatron: str = "mlp.experts"
    hf: str = "mlp.experts"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up_interleaved: bool = False

    def fc1_rule(self, expert: int) -> ModuleRule:
        base = f"{self.hf}.{expert}"
        return ModuleRule(
            f"{self.megatron}.linear_fc1", (f"{base}.{self.gate}", f"{base}.{self.up}"), "gate_up", True
        )

    def fc2_rule(self, expert: int) -> ModuleRule:
        return ModuleRule(f"{self.megatron}.linear_fc2", (f"{self.hf}.{expert}.{self.down}",), "none", True)


@dataclass(frozen=True)
class ModelFamily:
    """Naming table of one family: HF layer prefix, per-layer module rules, routed experts."""

    name: str
    hf_model_types: tuple[str, ...]
    modules: tuple[ModuleRule, ...]
    experts: ExpertsRule | None = None
    hf_layer_prefix: str = "model.layers"
    megatron_layer_prefix: str = "decoder.layers"
    notes: str = ""
    _by_megatron: dict[str, ModuleRule] = field(init=False, repr=False, compare=False)
    _by_hf: dict[str, tuple[ModuleRule, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_megatron = {rule.megatron: rule for rule in self.modules}
        by_hf = {hf: (rule, i) for rule in self.modules for i, hf in enumerate(rule.hf)}
        object.__setattr__(self, "_by_megatron", by_megatron)
        object.__setattr__(self, "_by_hf", by_hf)

    def rule_for_megatron(self, module: str) -> ModuleRule | None:
        """The rule of a non-expert Megatron module path inside a layer (``self_attention.linear_qkv``)."""
        return self._by_megatron.get(module)

    def rule_for_hf(self, module: str) -> tuple[ModuleRule, int] | None:
        """The rule and projection index of a non-expert HF module path inside a layer."""
        return self._by_hf.get(module)

    @property
    def megatron_modules(self) -> tuple[str, ...]:
        names = tuple(rule.megatron for rule in self.modules)
        if self.experts is not None:
            names += (f"{self.experts.megatron}.linear_fc1", f"{self.experts.megatron}.linear_fc2")
        return names

    @property
    def hf_target_modules(self) -> tuple[str, ...]:
        """Leaf names PEFT's ``target_modules`` uses for every module this family can adapt."""
        leaves = [hf.rsplit(".", 1)[-1] for rule in self.modules for hf in rule.hf]
        if self.experts is not None:
            leaves += [self.experts.gate, self.experts.up, self.experts.down]
        return tuple(dict.fromkeys(leaves))


_GQA_ATTENTION = (
    ModuleRule(
        "self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"
    ),
    ModuleRule("self_attention.linear_proj", ("self_attn.o_proj",)),
)
_DENSE_MLP = (
    ModuleRule("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj"), "gate_up"),
    ModuleRule("mlp.linear_fc2", ("mlp.down_proj",)),
)
_ROUTER = (ModuleRule("mlp.router", ("mlp.gate",)),)
_MLA_ATTENTION = (
    ModuleRule("self_attention.linear_q_proj", ("self_attn.q_proj",)),
    ModuleRule("self_attention.linear_q_down_proj", ("self_attn.q_a_proj",)),
    ModuleRule("self_attention.linear_q_up_proj", ("self_attn.q_b_proj",)),
    ModuleRule("self_attention.linear_kv_down_proj", ("self_attn.kv_a_proj_with_mqa",)),
    ModuleRule("self_attention.linear_kv_up_proj", ("self_attn.kv_b_proj",)),
    ModuleRule("self_attention.linear_proj", ("self_attn.o_proj",)),
)


def _shared_experts(hf: str) -> tuple[ModuleRule, ...]:
    return (
        ModuleRule("mlp.shared_experts.linear_fc1", (f"{hf}.gate_proj", f"{hf}.up_proj"), "gate_up"),
        ModuleRule("mlp.shared_experts.linear_fc2", (f"{hf}.down_proj",)),
    )


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            "dense_gqa",
            ("qwen3", "qwen2", "llama", "mistral"),
            _GQA_ATTENTION + _DENSE_MLP,
            notes="dense decoder with GQA attention and a SwiGLU MLP",
        ),
        ModelFamily(
            "qwen3_moe",
            ("qwen3_moe",),
            _GQA_ATTENTION + _DENSE_MLP + _ROUTER,
            ExpertsRule(),
            notes="MoE layers, plus dense SwiGLU layers where mlp_only_layers / decoder_sparse_step say so; "
            "no shared expert",
        ),
        ModelFamily(
            "qwen2_moe",
            ("qwen2_moe",),
            _GQA_ATTENTION + _DENSE_MLP + _ROUTER + _shared_experts("mlp.shared_expert"),
            ExpertsRule(),
            notes="one shared expert under mlp.shared_expert (its sigmoid gate carries no LoRA)",
        ),
        ModelFamily(
            "glm4_moe",
            ("glm4_moe",),
            _GQA_ATTENTION + _DENSE_MLP + _ROUTER + _shared_experts("mlp.shared_experts"),
            ExpertsRule(),
            notes="GLM-4.5/4.6: GQA attention, first_k_dense_replace dense layers, shared experts",
        ),
        ModelFamily(
            "deepseek_v3",
            ("deepseek_v3", "deepseek_v2", "glm4_moe_lite"),
            _MLA_ATTENTION + _DENSE_MLP + _ROUTER + _shared_experts("mlp.shared_experts"),
            ExpertsRule(),
            notes="MLA attention (no fused projections), dense first layers, shared experts",
        ),
    )
}

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES.values() for model_type in family.hf_model_types}


def get_family(name_or_model_type: str | ModelFamily) -> ModelFamily:
    """The family table for a family name or an HF ``model_type`` (``"qwen3_moe"``, ``"glm4_moe"``...).

    Exact lookup only: a model type no table lists raises rather than falling back to a look-alike.
    """
    if isinstance(name_or_model_type, ModelFamily):
        return name_or_model_type
    family = FAMILIES.get(name_or_model_type) or _BY_MODEL_TYPE.get(name_or_model_type)
    if family is None:
        raise UnknownModelFamilyError(
            f"no LoRA naming table for {name_or_model_type!r}; known families {sorted(FAMILIES)} and HF "
            f"model types {sorted(_BY_MODEL_TYPE)}. Add a ModelFamily to moe_lora_plugins.lora.families."
        )
    return family


@dataclass(frozen=True)
class ModelDims:
    """The shapes the fused splits need: attention heads, query groups, head size, experts."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    num_experts: int = 0

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> ModelDims:
        """Read the dims from an HF config (a ``PretrainedConfig`` or its ``to_dict()``)."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        heads = int(get("num_attention_heads"))
        groups = int(get("num_key_value_heads", None) or heads)
        head_dim = get("head_dim", None) or int(get("hidden_size")) // heads
        experts = get("num_experts", None) or get("n_routed_experts", None) or get("num_local_experts", None)
        return cls(heads, groups, int(head_dim), int(experts or 0))

    @property
    def heads_per_group(self) -> int:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        return self.num_attention_heads // self.num_query_groups

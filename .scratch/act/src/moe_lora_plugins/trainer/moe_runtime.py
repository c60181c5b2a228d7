"""The five MoE runtime settings as one validated config, applied to a provider before ``finalize()``.

Hosts that build Megatron-Bridge providers from their own config (SkyRL, verl) otherwise leave
Megatron-Bridge's defaults in place (``allgather`` dispatch, ``aux_loss`` balancing, softmax routing),
which differ from what the HF checkpoint was trained with (GLM / DeepSeek-V3: sigmoid scores with an
expert bias). ``None`` means "keep the provider's value". :meth:`MoeRuntimeConfig.validate` refuses
values Megatron-Core would refuse later, naming the setting and the accepted values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from moe_lora_plugins.errors import MoeLoraError

TOKEN_DISPATCHERS = ("allgather", "alltoall", "flex")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "quantile_balancing", "none")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
EXPERT_BIAS_SCORE_FUNCTIONS = ("sigmoid", "sqrtsoftplus")

# MoeRuntimeConfig field -> Megatron TransformerConfig / provider attribute (and host flag name).
PROVIDER_FIELDS = {
    "token_dispatcher_type": "moe_token_dispatcher_type",
    "router_load_balancing_type": "moe_router_load_balancing_type",
    "grouped_gemm": "moe_grouped_gemm",
    "router_score_function": "moe_router_score_function",
    "router_enable_expert_bias": "moe_router_enable_expert_bias",
}


# Megatron-Core's TransformerConfig defaults, which Megatron-LM's argument parser (slime, miles) puts on
# the namespace when a flag is not given: read from host args, such a value means "not set".
MEGATRON_DEFAULTS = {
    "token_dispatcher_type": "allgather",
    "router_load_balancing_type": "aux_loss",
    "grouped_gemm": False,
    "router_score_function": "softmax",
    "router_enable_expert_bias": False,
}


def _lookup(values: Any, key: str) -> Any:
    """``values[key]`` of a mapping or an OmegaConf node, ``values.key`` of a namespace; else ``None``."""
    if isinstance(values, Mapping) or (hasattr(values, "get") and hasattr(values, "keys")):
        return values.get(key)
    return getattr(values, key, None)


class MoeRuntimeConfigError(MoeLoraError, ValueError):
    """A MoE runtime setting has a value Megatron-Core cannot run with."""


@dataclass(frozen=True)
class MoeRuntimeConfig:
    """Token dispatcher, load balancing, grouped GEMM, router score function, expert bias (None: keep)."""

    token_dispatcher_type: str | None = None
    router_load_balancing_type: str | None = None
    grouped_gemm: bool | None = None
    router_score_function: str | None = None
    router_enable_expert_bias: bool | None = None

    @classmethod
    def from_mapping(cls, values: Any) -> MoeRuntimeConfig:
        """Read from a host config: an argparse namespace, a dict or an OmegaConf node, by either our field
        names or Megatron's (``moe_token_dispatcher_type`` ...). Missing keys stay ``None``."""
        found: dict[str, Any] = {}
        for ours, megatron in PROVIDER_FIELDS.items():
            for key in (megatron, ours):
                value = _lookup(values, key)
                if value is not None:
                    found[ours] = value
                    break
        return cls(**found)

    @classmethod
    def from_host_args(cls, args: Any) -> MoeRuntimeConfig:
        """From a Megatron-LM namespace (slime / miles: ``--moe-token-dispatcher-type``,
        ``--moe-router-load-balancing-type``, ``--moe-grouped-gemm``, ``--moe-router-score-function``,
        ``--moe-router-enable-expert-bias``). A flag at Megatron-Core's default counts as not given, so
        the provider keeps what the HF config gave it (a GLM checkpoint's sigmoid scores and expert bias
        survive a launch line that does not mention them)."""
        found = cls.from_mapping(args)
        kept: dict[str, Any] = {}
        for name in PROVIDER_FIELDS:
            value = getattr(found, name)
            default = MEGATRON_DEFAULTS[name]
            if value is None or value == default or (isinstance(value, (list, tuple)) and list(value) == [default]):
                continue
            if isinstance(value, (list, tuple)):  # the parser's nargs='+': one type is given as the string
                value = value[0] if len(value) == 1 else list(value)
            kept[name] = value
        return cls(**kept)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def validate(self, provider: Any = None) -> None:
        """Raise :class:`MoeRuntimeConfigError` naming every bad setting. With ``provider``, a setting left
        ``None`` is checked with the provider's value (expert bias needs a sigmoid-like score function)."""
        problems = []
        if self.token_dispatcher_type is not None and self.token_dispatcher_type not in TOKEN_DISPATCHERS:
            problems.append(f"moe_token_dispatcher_type={self.token_dispatcher_type!r}: use one of {list(TOKEN_DISPATCHERS)}")
        lb = self.router_load_balancing_type
        for one in ([lb] if isinstance(lb, str) else list(lb or [])):
            if one not in LOAD_BALANCING_TYPES:
                problems.append(f"moe_router_load_balancing_type={one!r}: use one of {list(LOAD_BALANCING_TYPES)}")
        if self.router_score_function is not None and self.router_score_function not in SCORE_FUNCTIONS:
            problems.append(f"moe_router_score_function={self.router_score_function!r}: use one of {list(SCORE_FUNCTIONS)}")
        for name in ("grouped_gemm", "router_enable_expert_bias"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                problems.append(f"{PROVIDER_FIELDS[name]}={value!r}: use true or false")
        score = self.router_score_function or getattr(provider, "moe_router_score_function", None)
        bias = self.router_enable_expert_bias
        if bias is None and provider is not None:
            bias = getattr(provider, "moe_router_enable_expert_bias", False)
        if bias and score is not None and score not in EXPERT_BIAS_SCORE_FUNCTIONS:
            problems.append(
                f"moe_router_enable_expert_bias=True with moe_router_score_function={score!r}: expert bias "
                f"(aux-loss-free routing) needs one of {list(EXPERT_BIAS_SCORE_FUNCTIONS)}; set the score "
                "function or turn the bias off"
            )
        if problems:
            raise MoeRuntimeConfigError("invalid MoE runtime settings:\n  - " + "\n  - ".join(problems))

    def apply(self, provider: Any) -> dict[str, Any]:
        """Validate, then set every non-``None`` setting on ``provider`` (call before ``provider.finalize()``).

        Returns ``{megatron_field: (old, new)}`` of what changed. A provider without a field raises:
        it is not a MoE-capable Megatron provider.
        """
        self.validate(provider)
        changed: dict[str, Any] = {}
        for ours, megatron in PROVIDER_FIELDS.items():
            value = getattr(self, ours)
            if value is None:
                continue
            if not hasattr(provider, megatron):
                raise MoeRuntimeConfigError(
                    f"{type(provider).__name__} has no {megatron}: apply MoE runtime settings to a Megatron "
                    "(Bridge) model provider"
                )
            old = getattr(provider, megatron)
            if old != value:
                setattr(provider, megatron, value)
                changed[megatron] = (old, value)
        return changed

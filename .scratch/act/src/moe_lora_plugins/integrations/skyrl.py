"""SkyRL (0.4.0, Megatron backend): declare this suite's build from SkyRL's own trainer config, per worker.

Not run against SkyRL here: SkyRL 0.4.0's Megatron worker imports two functions no Megatron-Bridge
release has (examples/skyrl/README.md). What this module relies on was read in the ``skyrl`` 0.4.0
wheel from PyPI, ``skyrl/backends/skyrl_train/workers/megatron/megatron_worker.py``:

- ``MegatronPolicyWorkerBase.init_model`` / ``MegatronRefWorkerBase.init_model`` call
  ``init_configs(model_path, cfg.<policy|ref>.megatron_config, ..., transformer_config_kwargs, ...)``,
  which sets the five MoE runtime settings from ``megatron_config`` (lines 319-327: dispatcher, load
  balancing, grouped GEMM, and score function / expert bias only when not ``None``), then every key of
  ``transformer_config_kwargs`` (lines 330-332, these win; ``megatron_config.transformer_config_kwargs``), then ``provider.finalize()`` (line 413);
- then ``make_megatron_module`` (lines 504-555): for a LoRA policy (``cfg.policy.model.lora.rank > 0``,
  line 783) ``configure_lora`` builds ``megatron.bridge.peft.lora.LoRA`` from ``cfg.policy.model.lora``
  (``rank alpha dropout target_modules exclude_modules init_method share_expert_adapters``) and
  ``cfg.policy.megatron_config.lora_config`` (``lora_type experts_shared_outer_loras normalize_moe_lora``),
  registers a pre-wrap hook that applies it, and calls ``provider.provide_distributed_model(...)``. The
  reference worker calls it without LoRA (lines 1912-1916).

The config classes are in ``skyrl/train/config/config.py`` (``SkyRLLoraConfig`` lines 94-141,
``MegatronLoraConfig`` 430-476, ``MegatronConfig`` 478-...: ``moe_token_dispatcher_type="alltoall"``,
``moe_router_load_balancing_type="none"``, ``moe_grouped_gemm=True``, score function and expert bias
``None``). The workers receive the ``trainer`` section as ``self.cfg``.

:func:`declare_skyrl_build` reads that config (dataclasses, OmegaConf nodes or dicts alike), refuses
bad values naming the SkyRL key and the fix, activates the suite (role ``trainer``) and declares the
build: SkyRL's ``policy`` is our ``actor``, ``ref`` our ``reference``. At SkyRL's ``provider.finalize()``
the ``megatron_bridge.moe_runtime_finalize`` patch then applies the same MoE settings SkyRL's worker
resolves (validated; ``transformer_config_kwargs`` overrides included, so nothing of SkyRL's is
undone), and at ``provide_distributed_model`` the ``megatron_bridge.pre_wrap_build_hooks`` patch runs
the plugins' ``on_build_model`` after SkyRL's LoRA hook (the ``lora_actor`` plugin sees SkyRL's
adapters and adds none). :func:`moe_lora_worker` wraps a SkyRL worker class so that its
``init_model`` declares the build first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_lora_plugins.errors import MoeLoraError

# SkyRL's worker sections and the role each has here.
SKYRL_ROLES = {"policy": "actor", "ref": "reference", "critic": "critic"}
# SkyRL 0.4.0's worker base classes (skyrl/backends/skyrl_train/workers/worker.py; workers get
# ``cfg.trainer`` as ``self.cfg``, worker.py line 296, trainer.py ``build_models``) and their section.
_WORKER_BASES = {"PolicyWorkerBase": "policy", "RefWorkerBase": "ref", "CriticWorkerBase": "critic"}
_MOE_KEYS = ("moe_token_dispatcher_type", "moe_router_load_balancing_type", "moe_grouped_gemm",
             "moe_router_score_function", "moe_router_enable_expert_bias")


class SkyRLConfigError(MoeLoraError, ValueError):
    """SkyRL's trainer config has a value this suite cannot work with; the message names the key and the fix."""


_MISSING = object()


def _get(node: Any, key: str, default: Any = _MISSING, where: str = "") -> Any:
    """``node[key]`` of a mapping / OmegaConf node, ``node.key`` of a dataclass or namespace."""
    if isinstance(node, Mapping) or (hasattr(node, "keys") and hasattr(node, "get")):
        value = node.get(key, _MISSING) if key in node else _MISSING
    else:
        value = getattr(node, key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise SkyRLConfigError(f"SkyRL config has no {where}{key}: pass SkyRL's trainer config (a worker's "
                                   "self.cfg, or cfg.trainer) as SkyRL 0.4.0 builds it")
        return default
    return value


def _trainer_section(cfg: Any) -> Any:
    """The ``trainer`` section, from it or from the whole ``SkyRLTrainConfig``."""
    if _get(cfg, "policy", None) is None and _get(cfg, "trainer", None) is not None:
        return _get(cfg, "trainer")
    return cfg


def _targets(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        parts = tuple(p.strip() for p in value.split(",") if p.strip())
    elif isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, Mapping)):
        parts = tuple(str(p).strip() for p in value if str(p).strip())
    else:
        raise SkyRLConfigError(f"{where}={value!r}: use 'all-linear' or a list of Megatron module names "
                               "(e.g. [linear_qkv, linear_fc1])")
    if not parts:
        raise SkyRLConfigError(f"{where}={value!r} is empty: use 'all-linear' or name at least one module")
    return parts


# Our LoraConfig's flag names -> the SkyRL keys they were read from (for messages).
_FLAG_KEYS = {
    "--lora-rank": "trainer.policy.model.lora.rank",
    "--lora-alpha": "trainer.policy.model.lora.alpha",
    "--lora-dropout": "trainer.policy.model.lora.dropout",
    "--lora-target-modules": "trainer.policy.model.lora.target_modules",
    "--lora-expert-adapters": "trainer.policy.model.lora.share_expert_adapters / "
                              "trainer.policy.megatron_config.lora_config.experts_shared_outer_loras",
    "--lora-sync-mode": "trainer.policy.megatron_config.lora_config.merge_lora",
}


def lora_config_from_skyrl(cfg: Any) -> Any:
    """A validated ``LoraConfig`` from SkyRL's ``trainer.policy`` LoRA settings (``enabled`` iff rank > 0)."""
    from moe_lora_plugins.lora_config import LoraConfig, LoraConfigError, validate_lora_config

    policy = _get(_trainer_section(cfg), "policy", where="trainer.")
    lora = _get(_get(policy, "model", where="trainer.policy."), "lora", where="trainer.policy.model.")
    megatron = _get(policy, "megatron_config", where="trainer.policy.")
    mlora = _get(megatron, "lora_config", {}, "trainer.policy.megatron_config.")
    rank = _get(lora, "rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise SkyRLConfigError(f"trainer.policy.model.lora.rank={rank!r}: use 0 (LoRA off) or a positive integer")
    lora_type = _get(mlora, "lora_type", "lora")
    if rank > 0 and lora_type != "lora":
        raise SkyRLConfigError(
            f"trainer.policy.megatron_config.lora_config.lora_type={lora_type!r}: moe-lora-plugins' export and "
            "sync patches are verified for Megatron-Bridge's LoRA only; set lora_type=lora"
        )
    where = "trainer.policy.model.lora.target_modules"
    targets = _targets(_get(lora, "target_modules", "all-linear"), where)
    excluded = _get(lora, "exclude_modules", None)
    if excluded:
        drop = set(_targets(excluded, "trainer.policy.model.lora.exclude_modules"))
        if any(ch in name for name in drop for ch in "*?[."):
            raise SkyRLConfigError(
                f"trainer.policy.model.lora.exclude_modules={excluded!r}: only plain module names (linear_fc2) "
                "can be excluded here; name the targets in target_modules instead"
            )
        targets = tuple(t for t in LoraConfig(target_modules=targets).megatron_targets() if t not in drop)
        if not targets:
            raise SkyRLConfigError(f"exclude_modules={excluded!r} excludes every target of {where}: keep one")
    if _get(mlora, "experts_shared_outer_loras", False):
        expert_adapters = "shared-outer"
    elif _get(lora, "share_expert_adapters", True):
        expert_adapters = "shared"
    else:
        expert_adapters = "per-expert"
    config = LoraConfig(
        enabled=rank > 0,
        target_modules=targets,
        rank=rank if rank > 0 else LoraConfig().rank,
        alpha=_get(lora, "alpha", 16),
        dropout=_get(lora, "dropout", 0.0),
        expert_adapters=expert_adapters,
        sync_mode="merged" if _get(mlora, "merge_lora", True) else "adapter",
    )
    try:
        validate_lora_config(config)
    except LoraConfigError as exc:
        problems = []
        for line in exc.problems:
            for flag, key in _FLAG_KEYS.items():
                line = line.replace(flag, key)
            problems.append(line)
        raise LoraConfigError(problems) from None
    return config


def moe_runtime_from_skyrl(cfg: Any, section: str = "policy") -> Any:
    """The validated ``MoeRuntimeConfig`` SkyRL's worker gives the provider before ``finalize()``:
    ``trainer.<section>.megatron_config``'s five settings, overridden by its ``transformer_config_kwargs``."""
    from moe_lora_plugins.trainer.moe_runtime import MoeRuntimeConfig, MoeRuntimeConfigError

    where = f"trainer.{section}.megatron_config"
    megatron = _get(_get(_trainer_section(cfg), section, where="trainer."), "megatron_config",
                    where=f"trainer.{section}.")
    overrides = _get(megatron, "transformer_config_kwargs", None) or {}
    values = {}
    for key in _MOE_KEYS:
        value = _get(overrides, key, _get(megatron, key, None))
        if value is not None:
            values[key] = value
    runtime = MoeRuntimeConfig.from_mapping(values)
    try:
        runtime.validate()
    except MoeRuntimeConfigError as exc:
        raise MoeRuntimeConfigError(f"SkyRL {where} (or its transformer_config_kwargs): {exc}") from None
    return runtime


def declare_skyrl_build(cfg: Any, role: str = "policy") -> Any:
    """Call in a SkyRL Megatron worker before ``init_model``: activate the suite and declare this process's
    build from SkyRL's trainer config (``role``: SkyRL's ``policy``, ``ref`` or ``critic``). Returns the
    declared ``hooks.build.BuildConfig``."""
    if role not in SKYRL_ROLES:
        raise SkyRLConfigError(f"role={role!r}: use one of {list(SKYRL_ROLES)} (SkyRL's worker sections)")
    from moe_lora_plugins.activation import activate
    from moe_lora_plugins.hooks.build import declare_build

    lora = lora_config_from_skyrl(cfg) if role == "policy" else None
    moe_runtime = moe_runtime_from_skyrl(cfg, role)
    activate(role="trainer")
    return declare_build(lora, args=cfg, default_role=SKYRL_ROLES[role],
                         moe_runtime=None if moe_runtime.is_empty() else moe_runtime)


def skyrl_role_of(worker_cls: type) -> str:
    """SkyRL's section for a worker class, from its 0.4.0 base classes (PolicyWorkerBase, RefWorkerBase, ...)."""
    for base in worker_cls.__mro__:
        if base.__name__ in _WORKER_BASES:
            return _WORKER_BASES[base.__name__]
    raise SkyRLConfigError(
        f"{worker_cls.__name__} derives from none of {sorted(_WORKER_BASES)}: pass role='policy', 'ref' or 'critic'"
    )


def moe_lora_worker(worker_cls: type, role: str | None = None) -> type:
    """A subclass of SkyRL's worker class whose ``init_model`` calls :func:`declare_skyrl_build` with the
    worker's ``self.cfg`` first (wrap it with ``ray.remote`` as SkyRL does its own)."""
    section = role or skyrl_role_of(worker_cls)
    if section not in SKYRL_ROLES:
        raise SkyRLConfigError(f"role={section!r}: use one of {list(SKYRL_ROLES)} (SkyRL's worker sections)")

    def init_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        declare_skyrl_build(self.cfg, section)
        return super(wrapped, self).init_model(*args, **kwargs)

    wrapped = type(f"MoeLora{worker_cls.__name__}", (worker_cls,),
                   {"init_model": init_model, "__module__": __name__, "moelora_skyrl_role": section})
    return wrapped

"""Every Megatron model a host builds reaches ``on_build_model`` before DDP wrapping.

A host seam (``integrations.megatron_init.init(args)`` for slime / miles, the SkyRL and verl
integrations) declares the process's build configuration once with :func:`set_build_config`. From
then on the ``megatron_bridge.pre_wrap_build_hooks`` patch adds :func:`pre_wrap_hook` to every
``provide_distributed_model`` call, so the plugins see each model's chunks with the provider, the
role and that configuration. The role is, in order: the innermost :func:`building` block, the
provider's ``moelora_role`` attribute, the configuration's ``default_role`` (``"actor"``).
Only the standard library and pluggy are imported here.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

ROLES = ("actor", "reference", "critic")


@dataclass
class BuildConfig:
    """What a host seam hands to ``on_build_model``: its parsed arguments and what we read from them.

    ``lora`` is a ``moe_lora_plugins.lora_config.LoraConfig`` (or ``None``: no LoRA from us); ``args``
    the host's own namespace or config object, for plugins that read more of it. ``moe_runtime`` is a
    ``moe_lora_plugins.trainer.moe_runtime.MoeRuntimeConfig`` (or ``None``): the
    ``megatron_bridge.moe_runtime_finalize`` patch applies it to every MoE provider before its
    ``finalize()``.
    """

    args: Any = None
    lora: Any = None
    default_role: str = "actor"
    moe_runtime: Any = None


_lock = threading.Lock()
_config: BuildConfig | None = None
_role: contextvars.ContextVar[str | None] = contextvars.ContextVar("moelora_build_role", default=None)


def set_build_config(config: BuildConfig | None) -> None:
    """Declare (or, with ``None``, withdraw) this process's build configuration."""
    global _config
    if config is not None and config.default_role not in ROLES:
        raise ValueError(f"BuildConfig.default_role must be one of {ROLES}, got {config.default_role!r}")
    with _lock:
        _config = config


def build_config() -> BuildConfig | None:
    """The configuration a host seam declared in this process, or ``None`` (then builds are untouched)."""
    return _config


@contextlib.contextmanager
def building(role: str) -> Iterator[None]:
    """Models built inside this block get ``role`` (``actor``, ``reference`` or ``critic``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    token = _role.set(role)
    try:
        yield
    finally:
        _role.reset(token)


def resolve_role(provider: Any, config: BuildConfig) -> str:
    return _role.get() or getattr(provider, "moelora_role", None) or config.default_role


def pre_wrap_hook(provider: Any, config: BuildConfig, plugin_manager: Any = None) -> Callable[[list[Any]], list[Any]]:
    """A Megatron-Bridge pre-wrap hook that calls every plugin's ``on_build_model`` for this build."""
    role = resolve_role(provider, config)

    def call_plugins(model_chunks: list[Any]) -> list[Any]:
        from moe_lora_plugins.hooks.manager import get_plugin_manager

        pm = plugin_manager or get_plugin_manager()
        pm.hook.on_build_model(model_chunks=model_chunks, provider=provider, role=role, config=config)
        return model_chunks

    call_plugins.moelora_role = role  # type: ignore[attr-defined]
    return call_plugins


def declare_build(lora: Any = None, *, args: Any = None, default_role: str = "actor",
                  moe_runtime: Any = None) -> BuildConfig:
    """Declare what this process's builds get (``lora``: a ``LoraConfig`` or ``None``; ``moe_runtime``: a
    ``MoeRuntimeConfig`` or ``None``); returns the config."""
    config = BuildConfig(args=args, lora=lora, default_role=default_role, moe_runtime=moe_runtime)
    set_build_config(config)
    return config

"""miles' generate-state seam: ``--custom-generate-state-path moe_lora_plugins.integrations.generate_state.MoeLoraGenerateState``.

miles PR #1141 (multi-LoRA) lets a launcher name the generate state class its rollout loop uses, and
has the loop call five lifecycle methods on it (see ``hooks.lifecycle``). miles main (radixark/miles
31f1ca961, read 2026-12) does not carry that PR yet: ``GenerateState`` there has ``reset()`` only and
the loop calls no lifecycle method. This module follows the PR's contract, read from its branch:
``on_group_submit(group, task)`` and ``reset()`` plain, ``on_group_selected(group)``,
``on_generate_rollout_complete(rollout_id, completed_samples, aborted_samples)`` awaited; the PR does
not show ``on_generate_rollout_start``'s body, so it is taken as ``async (rollout_id)`` like its
neighbours.

- :data:`MoeLoraGenerateState` (``--custom-generate-state-path``): miles' (or slime's) own
  ``GenerateState`` with the five methods added, each forwarded to the plugins' lifecycle
  (``hooks.lifecycle.lifecycle_for``). Without miles installed its base is
  :class:`StandaloneGenerateState` (``args`` and ``reset()`` only), for launchers of their own.
- :class:`MoeLoraGenerateStateHooks` (the PR's later ``--custom-generate-state-hooks-path`` form, a
  hooks object constructed with the host's state): the same five methods.

Plugins add behaviour as listeners (``moelora_generate_state_listeners``): multi-LoRA routing counts
groups per adapter in ``on_group_submit`` / ``on_group_selected``, the true-on-policy gate checks a
finished rollout in ``on_generate_rollout_complete``.
"""

from __future__ import annotations

import importlib
from typing import Any

HOST_GENERATE_STATES = (
    "miles.rollout.sglang_rollout",
    "miles.rollout.inference_rollout.inference_rollout_common",
    "slime.rollout.sglang_rollout",
)


class StandaloneGenerateState:
    """The base when no host ``GenerateState`` is importable: keeps ``args``, calls ``reset()`` once."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.reset()

    def reset(self) -> None:
        self.aborted = False


class _Lifecycle:
    """The five lifecycle methods, forwarded to the plugins' lifecycle for the state ``_moelora_state()``."""

    _moelora_lifecycle: Any = None

    def _moelora_state(self) -> Any:
        return self

    def _moelora(self) -> Any:
        if self._moelora_lifecycle is None:
            from moe_lora_plugins.hooks.lifecycle import lifecycle_for

            lifecycle = lifecycle_for(self._moelora_state().args)
            self._moelora_lifecycle = lifecycle.bind(self._moelora_state()) if hasattr(lifecycle, "bind") else lifecycle
        return self._moelora_lifecycle

    def on_group_submit(self, group: list[Any], task: Any) -> None:
        self._moelora().on_group_submit(group, task)

    async def on_group_selected(self, group: list[Any]) -> None:
        await self._moelora().on_group_selected(group)

    async def on_generate_rollout_start(self, rollout_id: int) -> None:
        await self._moelora().on_generate_rollout_start(rollout_id)

    async def on_generate_rollout_complete(self, rollout_id: int, completed_samples: list[Any],
                                           aborted_samples: list[Any]) -> None:
        await self._moelora().on_generate_rollout_complete(rollout_id, completed_samples, aborted_samples)

    def moelora_metrics(self) -> dict[str, float]:
        """The listeners' metrics of the last finished rollout (listeners with a ``metrics()`` method)."""
        out: dict[str, float] = {}
        for listener in getattr(self._moelora(), "listeners", []):
            if callable(getattr(listener, "metrics", None)):
                out.update(listener.metrics())
        return out


class MoeLoraGenerateStateHooks(_Lifecycle):
    """The hooks-object form: constructed with the host's generate state; listeners receive that state."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def _moelora_state(self) -> Any:
        return self.state

    def reset(self) -> None:
        self._moelora().reset()


def _reset(self: Any) -> None:
    super(generate_state_class(), self).reset()
    self._moelora().reset()


def host_generate_state_base() -> type:
    """The host's ``GenerateState`` class (miles, then slime), or :class:`StandaloneGenerateState`."""
    for module_name in HOST_GENERATE_STATES:
        try:
            return importlib.import_module(module_name).GenerateState
        except (ImportError, AttributeError):
            continue
    return StandaloneGenerateState


_classes: dict[str, type] = {}


def generate_state_class() -> type:
    """``MoeLoraGenerateState``: the host's ``GenerateState`` with the lifecycle methods (built once)."""
    if "state" not in _classes:
        _classes["state"] = type("MoeLoraGenerateState", (_Lifecycle, host_generate_state_base()),
                                 {"reset": _reset, "__module__": __name__,
                                  "__doc__": "The host's GenerateState with moe-lora-plugins' rollout lifecycle."})
    return _classes["state"]


def __getattr__(name: str) -> Any:
    if name == "MoeLoraGenerateState":  # built on first use: importing miles here would be heavy
        return generate_state_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The rollout lifecycle of miles' generate state (PR #1141's contract) as one dispatch over plugin listeners.

miles' rollout loop (``generate_rollout_async``) drives a generate state through five calls per
rollout: ``on_generate_rollout_start(rollout_id)``; ``on_group_submit(group, task)`` for every group it
submits (``task`` is the ``asyncio.Task`` generating it); ``on_group_selected(group)`` for every
finished group kept for training; ``on_generate_rollout_complete(rollout_id, completed_samples,
aborted_samples)`` after the unfinished requests are aborted; ``reset()`` at the end (and once from the
state's constructor). ``on_group_submit`` and ``reset`` are plain calls, the other three are awaited.

:class:`GenerateLifecycle` forwards each call to its listeners in order, the generate state first:
a listener implements any subset of the five methods. Listeners come from the plugins'
``moelora_generate_state_listeners`` hook; :class:`RolloutCounters` is the built-in one (per-rollout
group counts, a metrics dict).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.errors import MoeLoraError

LIFECYCLE_METHODS = ("on_group_submit", "on_group_selected", "on_generate_rollout_start",
                     "on_generate_rollout_complete", "reset")


class LifecycleError(MoeLoraError, RuntimeError):
    """A lifecycle listener broke the calling convention (an awaitable from a plain call)."""


class GenerateLifecycle:
    """Calls every listener's lifecycle method, in order, with the generate state first."""

    def __init__(self, listeners: Sequence[Any], state: Any = None) -> None:
        self.listeners = list(listeners)
        self.state = state

    def bind(self, state: Any) -> GenerateLifecycle:
        self.state = state
        return self

    def _methods(self, name: str) -> list[Any]:
        return [getattr(listener, name) for listener in self.listeners if callable(getattr(listener, name, None))]

    def _plain(self, name: str, *args: Any) -> None:
        for method in self._methods(name):
            if inspect.isawaitable(result := method(self.state, *args)):
                result.close() if inspect.iscoroutine(result) else None
                raise LifecycleError(
                    f"{method.__qualname__} returned an awaitable, but the rollout loop calls {name} without "
                    "awaiting it: make it a plain method (schedule async work with asyncio.create_task)"
                )

    async def _awaited(self, name: str, *args: Any) -> None:
        for method in self._methods(name):
            result = method(self.state, *args)
            if inspect.isawaitable(result):
                await result

    def on_group_submit(self, group: list[Any], task: Any) -> None:
        self._plain("on_group_submit", group, task)

    async def on_group_selected(self, group: list[Any]) -> None:
        await self._awaited("on_group_selected", group)

    async def on_generate_rollout_start(self, rollout_id: int) -> None:
        await self._awaited("on_generate_rollout_start", rollout_id)

    async def on_generate_rollout_complete(
        self, rollout_id: int, completed_samples: list[Any], aborted_samples: list[Any]
    ) -> None:
        await self._awaited("on_generate_rollout_complete", rollout_id, completed_samples, aborted_samples)

    def reset(self) -> None:
        self._plain("reset")


@dataclass
class RolloutCounters:
    """Groups submitted, finished, selected and aborted in the current rollout; ``metrics()`` of the last one."""

    rollout_id: int | None = None
    submitted: int = 0
    finished: int = 0
    in_flight: int = 0
    selected: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def on_generate_rollout_start(self, state: Any, rollout_id: int) -> None:
        self.rollout_id = rollout_id

    def on_group_submit(self, state: Any, group: list[Any], task: Any) -> None:
        self.submitted += 1
        self.in_flight += 1
        task.add_done_callback(self._group_done)

    def _group_done(self, task: Any) -> None:
        self.in_flight -= 1
        if not task.cancelled():
            self.finished += 1

    def on_group_selected(self, state: Any, group: list[Any]) -> None:
        self.selected += 1

    def on_generate_rollout_complete(self, state: Any, rollout_id: int, completed_samples: list[Any],
                                     aborted_samples: list[Any]) -> None:
        self.last = {
            "rollout/moelora_groups_submitted": float(self.submitted),
            "rollout/moelora_groups_selected": float(self.selected),
            "rollout/moelora_groups_completed": float(len(completed_samples)),
            "rollout/moelora_groups_aborted": float(len(aborted_samples)),
        }

    def reset(self, state: Any) -> None:
        self.rollout_id = None
        self.submitted = self.finished = self.selected = 0

    def metrics(self) -> dict[str, float]:
        return dict(self.last)


def lifecycle_for(args: Any, plugin_manager: Any = None) -> Any:
    """The lifecycle a generate state delegates to: a plugin's ``on_generate_state`` answer, else a
    :class:`GenerateLifecycle` over every plugin's ``moelora_generate_state_listeners``."""
    from moe_lora_plugins.hooks.manager import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    chosen = pm.hook.on_generate_state(args=args)
    if chosen is not None:
        return chosen
    listeners = [listener for found in pm.hook.moelora_generate_state_listeners(args=args) for listener in found or []]
    return GenerateLifecycle(listeners)

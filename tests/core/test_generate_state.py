"""``--custom-generate-state-path ...generate_state.MoeLoraGenerateState`` driven the way miles' rollout loop does.

The loop below is the shape of miles' ``generate_rollout_async`` with PR #1141's lifecycle calls:
start, one submit per group with the task generating it, one selected per group kept, abort of
what is still running, complete, reset. A listener plugin records every call; the built-in
counters give the rollout's metrics.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace

import pytest

from moe_lora_plugins.hooks import hookimpl
from moe_lora_plugins.hooks.lifecycle import LifecycleError
from moe_lora_plugins.hooks.manager import get_plugin_manager, reset_plugin_manager


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []

    def on_generate_rollout_start(self, state, rollout_id):
        self.calls.append(("start", rollout_id, state))

    def on_group_submit(self, state, group, task):
        self.calls.append(("submit", group[0]["index"], state))
        task.add_done_callback(lambda t: self.calls.append(("done", group[0]["index"], t.cancelled())))

    async def on_group_selected(self, state, group):
        await asyncio.sleep(0)
        self.calls.append(("selected", group[0]["index"], state))

    async def on_generate_rollout_complete(self, state, rollout_id, completed_samples, aborted_samples):
        self.calls.append(("complete", rollout_id, len(completed_samples), len(aborted_samples), state))

    def reset(self, state):
        self.calls.append(("reset", state))


class ListenerPlugin:
    def __init__(self, listener):
        self.listener = listener

    @hookimpl
    def moelora_generate_state_listeners(self, args):
        return [self.listener]


@pytest.fixture
def recorder():
    reset_plugin_manager()
    listener = Recorder()
    get_plugin_manager().register(ListenerPlugin(listener), name="recorder")
    yield listener
    reset_plugin_manager()


async def generate_group(index: int, delay: float) -> list[dict]:
    await asyncio.sleep(delay)
    return [{"index": index, "sample": s} for s in range(2)]


async def miles_style_rollout(state, rollout_id: int, delays: list[float], target: int) -> list[list[dict]]:
    """Submit every group, keep the first ``target`` that finish, abort the rest (miles' loop, PR #1141 calls)."""
    await state.on_generate_rollout_start(rollout_id)
    pendings = set()
    for index, delay in enumerate(delays):
        group = [{"index": index}]
        task = asyncio.create_task(generate_group(index, delay))
        state.on_group_submit(group, task)
        pendings.add(task)
    data: list[list[dict]] = []
    while len(data) < target:
        done, pendings = await asyncio.wait(pendings, return_when=asyncio.FIRST_COMPLETED)
        for task in sorted(done, key=lambda t: t.result()[0]["index"]):
            if len(data) < target:
                data.append(task.result())
                await state.on_group_selected(task.result())
    aborted = []
    for task in pendings:
        task.cancel()
        aborted.append([{"aborted": True}])
    await asyncio.gather(*pendings, return_exceptions=True)
    await state.on_generate_rollout_complete(rollout_id, data, aborted)
    state.reset()
    return data


def test_the_five_lifecycle_hooks_reach_the_listeners_in_the_loops_order_with_the_state(recorder):
    from moe_lora_plugins.integrations.generate_state import MoeLoraGenerateState

    state = MoeLoraGenerateState(Namespace(rollout_batch_size=2))
    asyncio.run(miles_style_rollout(state, 7, delays=[0.2, 0.0, 1.0], target=2))
    events = [call[0] for call in recorder.calls]
    assert events[:5] == ["reset", "start", "submit", "submit", "submit"]  # reset: from the constructor
    assert events[-2:] == ["complete", "reset"]
    assert [c[1] for c in recorder.calls if c[0] == "selected"] == [1, 0]  # in the order the groups finished
    assert recorder.calls[-2][:4] == ("complete", 7, 2, 1)
    assert ("done", 2, True) in recorder.calls  # the aborted group's task was cancelled
    assert all(call[-1] is state for call in recorder.calls if call[0] in ("start", "submit", "selected", "reset"))


def test_the_built_in_counters_give_each_rollouts_metrics(recorder):
    from moe_lora_plugins.integrations.generate_state import MoeLoraGenerateState

    state = MoeLoraGenerateState(Namespace())
    asyncio.run(miles_style_rollout(state, 0, delays=[0.0, 0.0, 0.0, 0.5], target=3))
    assert state.moelora_metrics() == {"rollout/moelora_groups_submitted": 4.0, "rollout/moelora_groups_selected": 3.0,
                                       "rollout/moelora_groups_completed": 3.0, "rollout/moelora_groups_aborted": 1.0}
    asyncio.run(miles_style_rollout(state, 1, delays=[0.0, 0.0], target=2))
    assert state.moelora_metrics()["rollout/moelora_groups_submitted"] == 2.0  # reset between rollouts


def test_the_hooks_object_form_hands_the_hosts_own_state_to_the_listeners(recorder):
    from moe_lora_plugins.integrations.generate_state import (
        MoeLoraGenerateStateHooks,
        StandaloneGenerateState,
    )

    host_state = StandaloneGenerateState(Namespace())
    hooks = MoeLoraGenerateStateHooks(host_state)
    asyncio.run(miles_style_rollout(hooks, 3, delays=[0.0], target=1))
    assert [c[0] for c in recorder.calls if c[0] != "done"] == ["start", "submit", "selected", "complete", "reset"]
    assert all(call[-1] is host_state for call in recorder.calls if call[0] in ("start", "submit", "selected"))


def test_a_coroutine_on_group_submit_is_refused_with_the_calling_convention(recorder):
    from moe_lora_plugins.integrations.generate_state import MoeLoraGenerateState

    class AsyncSubmit:
        async def on_group_submit(self, state, group, task):
            return None

    get_plugin_manager().register(ListenerPlugin(AsyncSubmit()), name="async-submit")
    state = MoeLoraGenerateState(Namespace())

    async def submit_one():
        task = asyncio.create_task(generate_group(0, 0.0))
        try:
            state.on_group_submit([{"index": 0}], task)
        finally:
            await task

    with pytest.raises(LifecycleError, match="without awaiting"):
        asyncio.run(submit_one())


def test_a_plugin_answering_on_generate_state_replaces_the_dispatch(recorder):
    from moe_lora_plugins.integrations.generate_state import MoeLoraGenerateState

    class Replacement:
        def __init__(self):
            self.resets = 0

        def reset(self):
            self.resets += 1

    replacement = Replacement()

    class Provider:
        @hookimpl
        def on_generate_state(self, args):
            return replacement

    get_plugin_manager().register(Provider(), name="replacement")
    MoeLoraGenerateState(Namespace()).reset()
    assert replacement.resets == 2 and recorder.calls == []

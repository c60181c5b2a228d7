"""The controller under random sequences of register / load / confirm / deregister / steps (hypothesis state
machine): slots stay unique and bounded, engine ids are never reused, only RUNNING adapters get groups, a
removed adapter never comes back, and only adapters present in a step count it."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from moe_lora_plugins.multilora.controller import (
    AdapterSpec,
    AdapterState,
    LifecycleError,
    MultiLoraController,
    MultiLoraError,
    PromptCycle,
    present_adapters,
)

NAMES = [f"a{i}" for i in range(6)]


class ControllerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.c = MultiLoraController(3, interleave="weighted")
        self.engine_ids: set[int] = set()
        self.removed: set[str] = set()
        self.steps: dict[str, int] = {}

    @rule(name=st.sampled_from(NAMES), weight=st.integers(1, 3))
    def register(self, name, weight):
        full = len(self.c.records()) == 3
        try:
            record = self.c.register(AdapterSpec(name, rank=2, alpha=4.0, weight=float(weight)),
                                     data=PromptCycle([1, 2, 3], seed=0), reward_fn=lambda p, c: 0.0)
        except MultiLoraError as exc:
            assert full or "already registered" in str(exc)
            return
        assert record.engine_id not in self.engine_ids
        self.engine_ids.add(record.engine_id)
        self.steps[name] = 0

    @rule(name=st.sampled_from(NAMES), action=st.sampled_from(["load", "trainer", "engine", "deregister"]))
    def act(self, name, action):
        record = next((r for r in self.c.records() if r.name == name), None)
        if record is None:
            return
        before = record.state
        try:
            if action == "load":
                self.c.begin_loading(name)
            elif action == "trainer":
                self.c.confirm_trainer(name)
            elif action == "engine":
                self.c.confirm_engine(name, 1 + (record.engine_version or 0))
            else:
                self.c.deregister(name)
        except LifecycleError:
            assert record.state is before
        if record.state is AdapterState.REMOVED:
            self.removed.add(name)

    @precondition(lambda self: any(r.state is AdapterState.RUNNING for r in self.c.records()))
    @rule(groups=st.integers(1, 6))
    def step(self, groups):
        running = {r.name for r in self.c.records() if r.state is AdapterState.RUNNING}
        plan = self.c.plan_step(groups)
        assert set(plan.groups) <= running
        self.c.draw(plan)
        counts = present_adapters(plan.groups)
        for name in self.c.finish_step(plan, counts):
            self.removed.add(name)
        for name in counts:
            self.steps[name] += 1

    @invariant()
    def slots_unique_and_bounded(self):
        slots = [r.slot for r in self.c.records()]
        assert len(slots) == len(set(slots)) and all(0 <= s < 3 for s in slots)

    @invariant()
    def removed_adapters_stay_out_and_counts_match(self):
        live = {r.name: r for r in self.c.records()}
        for name in self.removed:
            if name in live:  # re-registered under the same name: a new record with a new engine id
                assert live[name].state is not AdapterState.REMOVED
        for name, record in live.items():
            assert record.metrics.train_steps == self.steps[name]

    @invariant()
    def ready_means_running(self):
        for record in self.c.records():
            assert self.c.is_ready(record.name) == (record.state is AdapterState.RUNNING)


ControllerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_controller_lifecycle = ControllerMachine.TestCase

"""The multi-LoRA controller: slots, lifecycle, explicit readiness, interleave, per-adapter counts and resume."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lora_plugins.multilora.controller import (
    AdapterSpec,
    AdapterState,
    LifecycleError,
    MultiLoraController,
    MultiLoraError,
    PromptCycle,
    allowed_transition,
    present_adapters,
)
from moe_lora_plugins.multilora.tagging import AdapterRequestTagger


def spec(name: str, rank: int = 4, weight: float = 1.0) -> AdapterSpec:
    return AdapterSpec(name=name, rank=rank, alpha=2.0 * rank, weight=weight)


def running(controller: MultiLoraController, name: str, rank: int = 4, weight: float = 1.0, prompts=None):
    controller.register(spec(name, rank, weight), data=PromptCycle(prompts or [f"{name}-{i}" for i in range(5)], seed=7),
                        reward_fn=lambda prompt, completion: float(completion == prompt))
    controller.begin_loading(name)
    controller.confirm_trainer(name)
    controller.confirm_engine(name, 0)
    return controller.get(name)


# -- specs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"name": "a/b"}, "adapter name"),
    ({"name": ""}, "adapter name"),
    ({"rank": 0}, "rank 0"),
    ({"alpha": 0.0}, "alpha 0.0"),
    ({"targets": ("linear_qkv", "q_proj")}, "q_proj"),
    ({"targets": ()}, r"targets \[\]"),
    ({"targets": ("linear_qkv", "linear_qkv")}, "distinct"),
    ({"weight": -1.0}, "weight -1.0"),
    ({"learning_rate": 0.0}, "learning_rate 0.0"),
])
def test_a_bad_spec_is_refused_naming_the_value(kwargs, needle):
    base = {"name": "a", "rank": 4, "alpha": 8.0}
    with pytest.raises(MultiLoraError, match=needle):
        AdapterSpec(**{**base, **kwargs})


def test_spec_round_trips_through_json_and_scale_is_alpha_over_rank():
    s = AdapterSpec("math", rank=8, alpha=4.0, targets=("linear_qkv", "linear_fc2"), experts=False, seed=3, weight=2.5)
    assert AdapterSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.scale == 0.5


# -- lifecycle -----------------------------------------------------------------------------------


def test_the_lifecycle_graph_is_pending_loading_running_draining_removed():
    order = list(AdapterState)
    assert order == [AdapterState.PENDING, AdapterState.LOADING, AdapterState.RUNNING, AdapterState.DRAINING,
                     AdapterState.REMOVED]
    for a in order:
        for b in order:
            expected = (a, b) in {(order[i], order[i + 1]) for i in range(4)} | {
                (AdapterState.PENDING, AdapterState.REMOVED), (AdapterState.LOADING, AdapterState.REMOVED)}
            assert allowed_transition(a, b) == expected, (a, b)


def confirm(c: MultiLoraController, side: str) -> None:
    if side == "trainer":
        c.confirm_trainer("a")
    else:
        c.confirm_engine("a", 0)


def test_readiness_needs_both_explicit_confirmations_in_either_order():
    for first, second in (("trainer", "engine"), ("engine", "trainer")):
        c = MultiLoraController(2)
        c.register(spec("a"))
        assert not c.is_ready("a")
        c.begin_loading("a")
        confirm(c, first)
        assert c.get("a").state is AdapterState.LOADING and not c.is_ready("a")
        with pytest.raises(LifecycleError, match="waits for"):
            c.require_ready("a")
        confirm(c, second)
        assert c.get("a").state is AdapterState.RUNNING and c.is_ready("a")


def test_readiness_is_a_state_not_an_exception_probe_unknown_names_are_simply_not_ready():
    # miles #1141 review: readiness was found by calling into the adapter and catching the failure.
    c = MultiLoraController(1)
    assert c.is_ready("never-registered") is False
    c.register(spec("a"))
    assert c.is_ready("a") is False
    tagger = AdapterRequestTagger(c)
    assert tagger.can_tag("a") is False
    with pytest.raises(LifecycleError, match="'a' is pending, not running"):
        tagger.tag("a")


def test_confirm_trainer_before_loading_is_refused():
    c = MultiLoraController(1)
    c.register(spec("a"))
    with pytest.raises(LifecycleError, match="begin_loading"):
        c.confirm_trainer("a")


def test_engine_versions_only_grow():
    c = MultiLoraController(1)
    running(c, "a")
    c.confirm_engine("a", 3)
    with pytest.raises(LifecycleError, match="version 2 after 3"):
        c.confirm_engine("a", 2)


def test_a_removed_adapter_cannot_come_back_to_life():
    c = MultiLoraController(1)
    running(c, "a")
    record = c.deregister("a")
    c.drain()
    assert record.state is AdapterState.REMOVED
    with pytest.raises(MultiLoraError, match="no adapter named 'a'"):
        c.begin_loading("a")


# -- slots ---------------------------------------------------------------------------------------


def test_slots_are_lowest_free_first_and_a_freed_slot_is_reused_with_a_new_engine_id():
    c = MultiLoraController(3)
    a, b, d = (running(c, n) for n in ("a", "b", "d"))
    assert [a.slot, b.slot, d.slot] == [0, 1, 2]
    with pytest.raises(MultiLoraError, match="no free slot for adapter 'e'"):
        c.register(spec("e"))
    c.deregister("b")
    with pytest.raises(MultiLoraError, match="no free slot"):  # draining still holds the slot
        c.register(spec("e"))
    assert c.drain() == ["b"]
    e = c.register(spec("e"))
    assert e.slot == 1
    assert e.engine_id not in {a.engine_id, b.engine_id, d.engine_id}


def test_a_draining_adapter_with_samples_in_flight_stays_until_they_finish():
    c = MultiLoraController(2)
    running(c, "a")
    running(c, "b")
    plan = c.plan_step(2)
    c.draw(plan)
    c.deregister("b")
    assert c.drain() == []  # its group of this step is still in flight
    assert c.finish_step(plan, present_adapters(plan.groups)) == ["b"]
    assert [r.name for r in c.records()] == ["a"]


def test_a_duplicate_name_is_refused_while_the_first_is_registered():
    c = MultiLoraController(2)
    c.register(spec("a"))
    with pytest.raises(MultiLoraError, match="already registered"):
        c.register(spec("a"))


# -- interleave ----------------------------------------------------------------------------------


def test_round_robin_takes_each_running_adapter_in_turn_across_steps():
    c = MultiLoraController(4)
    for n in ("a", "b", "d"):
        running(c, n)
    picks = [c.plan_step(2).groups for _ in range(3)]
    assert picks == [("a", "b"), ("a", "d"), ("b", "d")]


def test_plan_groups_of_one_adapter_are_contiguous_in_slot_order():
    c = MultiLoraController(3, interleave="weighted")
    running(c, "a", weight=1.0)
    running(c, "b", weight=3.0)
    for _ in range(5):
        groups = c.plan_step(4).groups
        slots = [c.slot_of(g) for g in groups]
        assert slots == sorted(slots)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(1, 4))
def test_weighted_interleave_gives_every_adapter_exactly_its_integer_weight_per_cycle(weights, cycles):
    c = MultiLoraController(len(weights), interleave="weighted")
    names = [f"a{i}" for i in range(len(weights))]
    for name, weight in zip(names, weights, strict=True):
        running(c, name, weight=float(weight))
    total = sum(weights)
    counts = dict.fromkeys(names, 0)
    for _ in range(cycles):
        for g in c.plan_step(total).groups:
            counts[g] += 1
    assert counts == {n: w * cycles for n, w in zip(names, weights, strict=True)}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.lists(st.integers(1, 6), min_size=1, max_size=8))
def test_round_robin_counts_differ_by_at_most_one_at_every_point(n_adapters, group_counts):
    c = MultiLoraController(n_adapters)
    names = [f"a{i}" for i in range(n_adapters)]
    for name in names:
        running(c, name)
    counts = dict.fromkeys(names, 0)
    for n in group_counts:
        for g in c.plan_step(n).groups:
            counts[g] += 1
        assert max(counts.values()) - min(counts.values()) <= 1


def test_only_running_adapters_are_planned():
    c = MultiLoraController(3)
    running(c, "a")
    c.register(spec("b"))
    c.begin_loading("b")
    assert set(c.plan_step(4).groups) == {"a"}
    with pytest.raises(MultiLoraError, match="no adapter is RUNNING"):
        MultiLoraController(1).plan_step(1)


# -- per-adapter data, reward, metrics -------------------------------------------------------------


def test_each_adapter_draws_from_its_own_source_and_is_scored_by_its_own_reward():
    c = MultiLoraController(2)
    running(c, "a", prompts=["x", "y"])
    c.register(spec("b"), data=PromptCycle(["p", "q", "r"], seed=1), reward_fn=lambda p, comp: 10.0 * len(comp))
    c.begin_loading("b")
    c.confirm_trainer("b")
    c.confirm_engine("b", 0)
    drawn = c.draw(c.plan_step(2))
    assert [n for n, _ in drawn] == ["a", "b"]
    assert drawn[0][1] in ("x", "y") and drawn[1][1] in ("p", "q", "r")
    assert c.score("a", "x", "x") == 1.0 and c.score("b", "p", "abc") == 30.0


def test_train_steps_count_only_adapters_present_in_the_batch():
    # miles #1141 review: every registered adapter's step counter moved on every step.
    c = MultiLoraController(3)
    for n in ("a", "b", "d"):
        running(c, n)
    plan = c.plan_step(2)  # a, b
    c.draw(plan)
    c.finish_step(plan, present_adapters(plan.groups), {"a": {"reward": 0.5}, "b": {"reward": 0.25}})
    assert {r.name: r.metrics.train_steps for r in c.records()} == {"a": 1, "b": 1, "d": 0}
    plan = c.plan_step(1)  # d
    c.draw(plan)
    c.finish_step(plan, {"d": 3, "a": 0})
    assert {r.name: r.metrics.train_steps for r in c.records()} == {"a": 1, "b": 1, "d": 1}
    assert c.get("a").metrics.reward_history == [0.5] and c.get("d").metrics.samples == 3
    assert c.step == 2


def test_prompt_cycle_is_a_permutation_per_epoch_and_resumes_exactly():
    source = PromptCycle(list(range(7)), seed=3)
    first = [source.next_group() for _ in range(7)]
    assert sorted(first) == list(range(7))
    for _ in range(3):
        source.next_group()
    saved = json.loads(json.dumps(source.state_dict()))
    expected = [source.next_group() for _ in range(12)]
    fresh = PromptCycle(list(range(7)), seed=3)
    fresh.load_state_dict(saved)
    assert [fresh.next_group() for _ in range(12)] == expected


# -- resume --------------------------------------------------------------------------------------


def test_controller_state_round_trips_through_json_and_continues_identically():
    def build():
        c = MultiLoraController(3, interleave="weighted")
        running(c, "a", weight=2.0)
        running(c, "b", weight=1.0)
        return c

    c = build()
    for _ in range(3):
        plan = c.plan_step(2)
        c.draw(plan)
        c.finish_step(plan, present_adapters(plan.groups), {n: {"reward": 1.0} for n in plan.adapters})
    state = json.loads(json.dumps(c.state_dict()))
    twin = copy.deepcopy(c)
    restored = MultiLoraController(3, interleave="weighted")
    restored.load_state_dict(state, data={"a": PromptCycle([f"a-{i}" for i in range(5)], seed=7),
                                          "b": PromptCycle([f"b-{i}" for i in range(5)], seed=7)})
    for _ in range(4):
        p1, p2 = twin.plan_step(3), restored.plan_step(3)
        assert p1 == p2
        assert twin.draw(p1) == restored.draw(p2)
        twin.finish_step(p1, present_adapters(p1.groups))
        restored.finish_step(p2, present_adapters(p2.groups))
    assert twin.state_dict() == restored.state_dict()


def test_a_trainer_only_controller_is_ready_on_the_trainers_confirmation_alone():
    c = MultiLoraController(1, require_engine=False)
    c.register(spec("a"))
    c.begin_loading("a")
    assert not c.is_ready("a")
    c.confirm_trainer("a")
    assert c.is_ready("a")
    with pytest.raises(MultiLoraError, match="require_engine"):
        MultiLoraController(1).load_state_dict(c.state_dict())

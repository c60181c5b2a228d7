"""The multi-LoRA training loop's driver: controller + trainer pool + rollouts + per-adapter checkpoints.

:class:`MultiLoraDriver` registers adapters (slot in the controller, weights in the trainer, explicit
confirmations), runs steps (plan -> each adapter's prompts from its own source -> rollouts with the
adapter's own sampling RNG -> its own reward -> group-normalised advantages -> one trainer step over
the mixed batch), deregisters, and checkpoints / resumes everything: per adapter (weights, Adam
state, RNG of every rank, data position, sampling RNG, metrics) and the controller's interleave state.

Rollouts come from one call per step, ``rollout(requests, group_size)``, with ``requests`` a list of
:class:`GroupRequest` (adapter, prompt, sampling seed drawn from the adapter's own RNG); it returns each
group's completions (token-id lists of one length). The engine serves all adapters' groups of the step
at once in the demo; trainer-only tests use a seeded sampler.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.multilora import checkpoint as ckpt
from moe_lora_plugins.multilora.controller import (
    AdapterSpec,
    DataSource,
    MultiLoraController,
    MultiLoraError,
    RewardFunction,
    StepPlan,
    rng_state_from_json,
    rng_state_to_json,
)

CONTROLLER_CHECKPOINT = "_controller"



@dataclass(frozen=True)
class GroupRequest:
    """One group to roll out: the adapter it belongs to, its prompt, and its sampling seed."""

    adapter: str
    prompt: tuple[int, ...]
    seed: int


Rollout = Callable[[list[GroupRequest], int], list[list[list[int]]]]


@dataclass
class StepReport:
    """What one driver step did: the plan, each adapter's mean reward and loss, slots the trainer stepped."""

    step: int
    plan: StepPlan
    rewards: dict[str, float] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    stepped_slots: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """GRPO: each reward minus its group's mean, over the group's standard deviation (0 when all equal)."""
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
    return [0.0 if std < 1e-6 else (r - mean) / std for r in rewards]


class MultiLoraDriver:
    """Drives a :class:`~moe_lora_plugins.multilora.trainer.MultiLoraTrainerPool` (or anything with its ``call``)."""

    def __init__(self, controller: MultiLoraController, pool: Any, rollout: Rollout, group_size: int,
                 groups_per_step: int | None = None, groups_per_adapter: int | None = None,
                 checkpoint_root: str | None = None) -> None:
        """Each step takes ``groups_per_step`` groups by the controller's interleave, or (round-robin)
        ``groups_per_adapter`` from every RUNNING adapter; give exactly one of the two."""
        if (groups_per_step is None) == (groups_per_adapter is None):
            raise MultiLoraError("give exactly one of groups_per_step and groups_per_adapter")
        if groups_per_adapter is not None and controller.interleave != "round-robin":
            raise MultiLoraError("groups_per_adapter needs the round-robin interleave")
        self.controller = controller
        self.pool = pool
        self.rollout = rollout
        self.group_size = group_size
        self.groups_per_step = groups_per_step
        self.groups_per_adapter = groups_per_adapter
        self.checkpoint_root = checkpoint_root
        self.samplers: dict[str, random.Random] = {}
        self._freed = 0  # how many of the controller's removed adapters have left the trainer

    # -- lifecycle -------------------------------------------------------------------------------

    def register(self, spec: AdapterSpec, data: DataSource, reward_fn: RewardFunction) -> int:
        """Reserve a slot, materialise the adapter on every trainer rank, confirm it; returns its slot."""
        record = self.controller.register(spec, data=data, reward_fn=reward_fn)
        self.controller.begin_loading(spec.name)
        self.pool.call("add_adapter", record.slot, spec)
        self.controller.confirm_trainer(spec.name)
        self.samplers[spec.name] = random.Random(spec.seed)
        return record.slot

    def deregister(self, name: str) -> None:
        """No new samples for ``name``; its slot is freed on the trainer once the controller removes it."""
        self.controller.deregister(name)
        self._free_removed()

    def _free_removed(self) -> list[str]:
        names = []
        for record in self.controller.removed()[self._freed:]:
            self.samplers.pop(record.name, None)
            self.pool.call("remove_adapter", record.slot)
            names.append(record.name)
        self._freed = len(self.controller.removed())
        return names

    # -- a step ----------------------------------------------------------------------------------

    def step(self) -> StepReport:
        """Plan, roll out, score and train one step over the RUNNING adapters."""
        import torch

        from moe_lora_plugins.multilora.trainer import MultiBatch

        count = self.groups_per_step or self.groups_per_adapter * len(self.controller.running())
        plan = self.controller.plan_step(count)
        drawn = self.controller.draw(plan)
        requests = [GroupRequest(name, tuple(prompt), self.samplers[name].randrange(2**31)) for name, prompt in drawn]
        groups = self.rollout(requests, self.group_size)
        if len(groups) != len(requests):
            raise MultiLoraError(f"the rollout returned {len(groups)} groups for {len(requests)} requests")
        tokens, advantages, slots, rewards = [], [], [], {}
        prompt_len = len(requests[0].prompt)
        for request, completions in zip(requests, groups, strict=True):
            name, prompt = request.adapter, list(request.prompt)
            record = self.controller.get(name)
            scores = [self.controller.score(name, prompt, c) for c in completions]
            rewards.setdefault(name, []).extend(scores)
            if len(prompt) != prompt_len:
                raise MultiLoraError(f"adapter {name!r}: prompt length {len(prompt)}, expected {prompt_len} "
                                     "(every sample of a step has one length)")
            for completion, advantage in zip(completions, group_advantages(scores), strict=True):
                tokens.append(prompt + list(completion))
                advantages.append(advantage)
                slots.append(record.slot)
        batch = MultiBatch(torch.tensor(tokens), prompt_len, torch.tensor(advantages, dtype=torch.float32), slots)
        results = self.pool.call("step", batch)
        losses: dict[int, float] = {}
        for result in results:
            for slot, loss in result.loss_by_slot.items():
                losses[slot] = losses.get(slot, 0.0) + loss
        by_slot = {self.controller.get(n).slot: n for n in plan.adapters}
        mean_rewards = {n: sum(v) / len(v) for n, v in rewards.items()}
        metrics = {n: {"reward": mean_rewards[n], "loss": losses.get(self.controller.get(n).slot, 0.0)}
                   for n in plan.adapters}
        counts = {n: len(rewards[n]) for n in plan.adapters}
        step = self.controller.step
        self.controller.finish_step(plan, counts, metrics)
        report = StepReport(step=step, plan=plan, rewards=mean_rewards,
                            losses={by_slot[s]: v for s, v in losses.items() if s in by_slot},
                            stepped_slots=list(results[0].stepped))
        report.removed = self._free_removed()
        return report

    def adapter_state(self, name: str) -> dict[str, Any]:
        """The adapter's parameters over all ranks, by global name (replicas agree; first one kept)."""
        merged: dict[str, Any] = {}
        for part in self.pool.call("adapter_state", self.controller.get(name).slot):
            for key, value in part.items():
                merged.setdefault(key, value)
        return merged

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint(self) -> int:
        """Checkpoint every resident adapter, then the controller (its checkpoint marks the set complete)."""
        if self.checkpoint_root is None:
            raise MultiLoraError("this driver has no checkpoint_root")
        step = self.controller.step
        for record in self.controller.records():
            manifest = {"data": record.data.state_dict() if record.data is not None else None,
                        "sampler_rng": rng_state_to_json(self.samplers[record.name].getstate()),
                        "metrics": record.metrics.to_dict(), "state": record.state.value}
            self.pool.call("save_checkpoint", self.checkpoint_root, record.slot, step, manifest)
        ckpt.prepare(self.checkpoint_root, CONTROLLER_CHECKPOINT, step)
        ckpt.commit(self.checkpoint_root, CONTROLLER_CHECKPOINT, step, 0, {"controller": self.controller.state_dict()})
        return step

    def resume(self, data: Mapping[str, DataSource], reward_fns: Mapping[str, RewardFunction]) -> int:
        """Restore the latest complete checkpoint into this (fresh) driver and pool; returns its step.

        Order matters (miles #1141 loaded into slots it had not created yet): every adapter's slot is
        materialised first, then its weights, Adam state and RNG are loaded, and the loaded tensor count
        must equal the slot's parameter count on every rank.
        """
        if self.checkpoint_root is None:
            raise MultiLoraError("this driver has no checkpoint_root")
        ref = ckpt.latest_checkpoint(self.checkpoint_root, CONTROLLER_CHECKPOINT)
        if ref is None:
            raise MultiLoraError(f"no complete checkpoint under {self.checkpoint_root}")
        self.controller.load_state_dict(ref.manifest["controller"], data=data, reward_fns=reward_fns)
        for record in self.controller.records():
            counts = self.pool.call("add_adapter", record.slot, record.spec)
            loaded = self.pool.call("load_checkpoint", self.checkpoint_root, record.slot, ref.step)
            for rank, (made, got) in enumerate(zip(counts, loaded, strict=True)):
                if made > 0 and got["tensors"] == 0:
                    raise MultiLoraError(f"adapter {record.name!r}: rank {rank} holds {made} parameter elements "
                                         "but loaded no tensors")
            manifest = loaded[0]["manifest"]
            if record.data is not None and manifest["data"] is not None:
                record.data.load_state_dict(manifest["data"])
            self.samplers[record.name] = random.Random()
            self.samplers[record.name].setstate(rng_state_from_json(manifest["sampler_rng"]))
        return ref.step

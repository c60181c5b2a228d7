"""Which LoRA adapters train on the one frozen base, in which slot, in what state, and whose samples a
step takes: the multi-LoRA controller, free of any training or serving framework.

An adapter goes PENDING (registered, slot reserved) -> LOADING (the trainer materialises its weights,
the engine receives its first sync) -> RUNNING (both confirmed: it gets samples) -> DRAINING
(deregistered: no new samples, in-flight ones may still finish) -> REMOVED (slot free for the next
registration). Readiness is a state the trainer and the engine confirm explicitly
(:meth:`MultiLoraController.confirm_trainer`, :meth:`MultiLoraController.confirm_engine`); nothing
here learns it from an exception. A step's groups come from the RUNNING adapters' own data sources,
interleaved round-robin or by weight (smooth weighted round-robin, deterministic); only adapters
whose samples are in a step count that step.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from moe_lora_plugins.errors import MoeLoraError

# LoRA targets of the Megatron transformer layer a multi-LoRA adapter may name (Megatron module names).
KNOWN_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
INTERLEAVE_POLICIES = ("round-robin", "weighted")
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class MultiLoraError(MoeLoraError, ValueError):
    """A multi-LoRA request that cannot be honoured (bad spec, unknown adapter, no free slot, ...)."""


class LifecycleError(MoeLoraError, RuntimeError):
    """An adapter was asked to move to a state its current state does not lead to."""


class AdapterState(str, enum.Enum):
    """Where an adapter is in its life; see the module docstring for the order."""

    PENDING = "pending"
    LOADING = "loading"
    RUNNING = "running"
    DRAINING = "draining"
    REMOVED = "removed"


_NEXT_STATES: dict[AdapterState, frozenset[AdapterState]] = {
    AdapterState.PENDING: frozenset({AdapterState.LOADING, AdapterState.REMOVED}),
    AdapterState.LOADING: frozenset({AdapterState.RUNNING, AdapterState.REMOVED}),
    AdapterState.RUNNING: frozenset({AdapterState.DRAINING}),
    AdapterState.DRAINING: frozenset({AdapterState.REMOVED}),
    AdapterState.REMOVED: frozenset(),
}


def allowed_transition(current: AdapterState, new: AdapterState) -> bool:
    """Whether an adapter in ``current`` may move to ``new``."""
    return new in _NEXT_STATES[current]


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's own LoRA shape and training settings.

    ``targets`` are Megatron module names (:data:`KNOWN_TARGETS`); ``experts`` puts the adapter on every
    routed expert's ``linear_fc1`` / ``linear_fc2`` as well (when those are targets). ``weight`` is its
    share under weighted interleave; ``seed`` seeds its LoRA A initialisation and its data order.
    """

    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...] = KNOWN_TARGETS
    experts: bool = True
    learning_rate: float = 1e-3
    seed: int = 0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _ADAPTER_NAME.match(self.name):
            raise MultiLoraError(
                f"adapter name {self.name!r}: use 1-64 characters of letters, digits, '_', '.', '-' "
                "starting with a letter or digit (it becomes a directory and an engine LoRA name)"
            )
        if not isinstance(self.rank, int) or self.rank < 1:
            raise MultiLoraError(f"adapter {self.name!r}: rank {self.rank!r} must be an integer >= 1")
        if not self.alpha > 0:
            raise MultiLoraError(f"adapter {self.name!r}: alpha {self.alpha!r} must be > 0")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in KNOWN_TARGETS]
        if not targets or unknown or len(set(targets)) != len(targets):
            raise MultiLoraError(
                f"adapter {self.name!r}: targets {list(targets)} must be distinct names from {list(KNOWN_TARGETS)}"
            )
        object.__setattr__(self, "targets", targets)
        if not self.learning_rate > 0:
            raise MultiLoraError(f"adapter {self.name!r}: learning_rate {self.learning_rate!r} must be > 0")
        if not self.weight > 0:
            raise MultiLoraError(f"adapter {self.name!r}: interleave weight {self.weight!r} must be > 0")

    @property
    def scale(self) -> float:
        """LoRA's output scale ``alpha / rank``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "experts": self.experts, "learning_rate": self.learning_rate, "seed": self.seed,
                "weight": self.weight}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterSpec:
        return cls(name=data["name"], rank=int(data["rank"]), alpha=float(data["alpha"]),
                   targets=tuple(data["targets"]), experts=bool(data["experts"]),
                   learning_rate=float(data["learning_rate"]), seed=int(data["seed"]), weight=float(data["weight"]))


class DataSource(Protocol):
    """An adapter's own prompts: the next group, and a state that resumes exactly where it was."""

    def next_group(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class PromptCycle:
    """Prompts in a seeded shuffled order, reshuffled every epoch; its state is (epoch, position, RNG).

    The order depends only on ``seed`` and the prompt list, so an adapter's data does not change when
    other adapters come and go.
    """

    def __init__(self, prompts: Sequence[Any], seed: int) -> None:
        if not prompts:
            raise MultiLoraError("a PromptCycle needs at least one prompt")
        self._prompts = list(prompts)
        self._rng = random.Random(seed)
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self._prompts)))
        self._rng.shuffle(order)
        return order

    def next_group(self) -> Any:
        if self.position == len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._shuffled()
        prompt = self._prompts[self._order[self.position]]
        self.position += 1
        return prompt

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "order": list(self._order),
                "rng": rng_state_to_json(self._rng.getstate()), "size": len(self._prompts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["size"]) != len(self._prompts):
            raise MultiLoraError(
                f"a PromptCycle state for {state['size']} prompts cannot resume a source of {len(self._prompts)}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = [int(i) for i in state["order"]]
        self._rng.setstate(rng_state_from_json(state["rng"]))


def rng_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    """A ``random.Random`` state as JSON-able lists."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_state_from_json(state: Sequence[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)


RewardFunction = Callable[[Any, Any], float]


@dataclass
class AdapterMetrics:
    """What an adapter did: steps trained (only steps whose batch held its samples), samples, rewards."""

    train_steps: int = 0
    samples: int = 0
    reward_history: list[float] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"train_steps": self.train_steps, "samples": self.samples,
                "reward_history": list(self.reward_history), "last": dict(self.last)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterMetrics:
        return cls(int(data["train_steps"]), int(data["samples"]), [float(x) for x in data["reward_history"]],
                   {k: float(v) for k, v in data["last"].items()})


@dataclass
class AdapterRecord:
    """One registered adapter: its spec, slot, state, confirmations, data source, reward function, metrics."""

    spec: AdapterSpec
    slot: int
    state: AdapterState
    engine_id: int = 0
    data: DataSource | None = None
    reward_fn: RewardFunction | None = None
    trainer_loaded: bool = False
    engine_version: int | None = None
    in_flight: int = 0
    metrics: AdapterMetrics = field(default_factory=AdapterMetrics)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ready(self) -> bool:
        """RUNNING: the trainer holds its weights and the engine serves a synced version."""
        return self.state is AdapterState.RUNNING


@dataclass(frozen=True)
class StepPlan:
    """A step's groups in order: ``groups[i]`` is the adapter whose data source gives group ``i``."""

    step: int
    groups: tuple[str, ...]

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters present in this step, in order of first appearance."""
        return tuple(dict.fromkeys(self.groups))

    def count(self, name: str) -> int:
        return sum(1 for g in self.groups if g == name)


class MultiLoraController:
    """Slots, lifecycle and interleave of the adapters that share one base model.

    ``num_slots`` is how many adapters may be resident at once (the trainer and the engine size their
    tables by it). A freed slot goes to the next registration (lowest free slot first).
    ``require_engine=False`` is for trainer-only runs (no rollout engine): readiness then needs the
    trainer's confirmation alone.
    """

    def __init__(self, num_slots: int, interleave: str = "round-robin", require_engine: bool = True) -> None:
        if not isinstance(num_slots, int) or num_slots < 1:
            raise MultiLoraError(f"num_slots {num_slots!r} must be an integer >= 1")
        if interleave not in INTERLEAVE_POLICIES:
            raise MultiLoraError(f"interleave {interleave!r}: use one of {list(INTERLEAVE_POLICIES)}")
        self.num_slots = num_slots
        self.interleave = interleave
        self.require_engine = require_engine
        self.step = 0
        self._records: dict[str, AdapterRecord] = {}
        self._removed: list[AdapterRecord] = []
        self._cursor = 0  # round-robin: slot to look at first next time
        self._credit: dict[str, float] = {}  # weighted: smooth weighted round-robin credit
        self._next_engine_id = 1  # engine LoRA ids are never reused: a reused slot gets a new id

    # -- registry ------------------------------------------------------------------------------

    def register(self, spec: AdapterSpec, data: DataSource | None = None,
                 reward_fn: RewardFunction | None = None) -> AdapterRecord:
        """Reserve the lowest free slot for ``spec`` (state PENDING)."""
        if spec.name in self._records:
            raise MultiLoraError(
                f"adapter {spec.name!r} is already registered (state {self._records[spec.name].state.value}); "
                "deregister it and wait for REMOVED, or pick another name"
            )
        used = {r.slot for r in self._records.values()}
        free = [s for s in range(self.num_slots) if s not in used]
        if not free:
            raise MultiLoraError(
                f"no free slot for adapter {spec.name!r}: all {self.num_slots} are held by "
                f"{sorted(self._records)}; deregister one or create the controller with more slots"
            )
        record = AdapterRecord(spec=spec, slot=free[0], state=AdapterState.PENDING, engine_id=self._next_engine_id,
                               data=data, reward_fn=reward_fn)
        self._next_engine_id += 1
        self._records[spec.name] = record
        return record

    def get(self, name: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None:
            raise MultiLoraError(f"no adapter named {name!r}; registered: {sorted(self._records)}")
        return record

    def records(self) -> list[AdapterRecord]:
        """Every adapter not yet REMOVED, by slot."""
        return sorted(self._records.values(), key=lambda r: r.slot)

    def removed(self) -> list[AdapterRecord]:
        return list(self._removed)

    def slot_of(self, name: str) -> int:
        return self.get(name).slot

    def _move(self, record: AdapterRecord, new: AdapterState) -> None:
        if not allowed_transition(record.state, new):
            raise LifecycleError(
                f"adapter {record.name!r} is {record.state.value}; it cannot become {new.value} "
                f"(from {record.state.value} it may become {sorted(s.value for s in _NEXT_STATES[record.state])})"
            )
        record.state = new
        if new is AdapterState.REMOVED:
            del self._records[record.name]
            self._credit.pop(record.name, None)
            self._removed.append(record)

    # -- lifecycle -----------------------------------------------------------------------------

    def begin_loading(self, name: str) -> AdapterRecord:
        """PENDING -> LOADING: the trainer may now materialise the slot and the engine receive a sync."""
        record = self.get(name)
        self._move(record, AdapterState.LOADING)
        return record

    def confirm_trainer(self, name: str) -> AdapterRecord:
        """The trainer holds the adapter's weights (initialised or restored) in its slot."""
        record = self._loading(name, "confirm_trainer")
        record.trainer_loaded = True
        self._promote(record)
        return record

    def confirm_engine(self, name: str, version: int) -> AdapterRecord:
        """The engine validated and serves ``version`` of the adapter (after the sync of the trainer's step)."""
        record = self.get(name)
        if record.state not in (AdapterState.LOADING, AdapterState.RUNNING, AdapterState.DRAINING):
            raise LifecycleError(f"adapter {name!r} is {record.state.value}; the engine cannot confirm a sync for it")
        if record.engine_version is not None and version < record.engine_version:
            raise LifecycleError(
                f"adapter {name!r}: the engine confirmed version {version} after {record.engine_version}; "
                "versions only grow"
            )
        record.engine_version = version
        if record.state is AdapterState.LOADING:
            self._promote(record)
        return record

    def _loading(self, name: str, what: str) -> AdapterRecord:
        record = self.get(name)
        if record.state is not AdapterState.LOADING:
            raise LifecycleError(f"adapter {name!r} is {record.state.value}; {what} is only for a LOADING adapter "
                                 "(call begin_loading first)")
        return record

    def _promote(self, record: AdapterRecord) -> None:
        if record.trainer_loaded and (record.engine_version is not None or not self.require_engine):
            self._move(record, AdapterState.RUNNING)

    def is_ready(self, name: str) -> bool:
        """Whether ``name`` is RUNNING: both sides confirmed it. Unknown names are not ready."""
        record = self._records.get(name)
        return record is not None and record.ready

    def require_ready(self, name: str) -> AdapterRecord:
        """The record of a RUNNING adapter, or an error saying what it still waits for."""
        record = self.get(name)
        if not record.ready:
            waits = [w for w, done in (("the trainer's load (confirm_trainer)", record.trainer_loaded),
                                       ("the engine's first sync (confirm_engine)",
                                        record.engine_version is not None or not self.require_engine))
                     if not done]
            raise LifecycleError(
                f"adapter {name!r} is {record.state.value}, not running"
                + (f"; it waits for {' and '.join(waits)}" if record.state is AdapterState.LOADING else "")
            )
        return record

    def deregister(self, name: str) -> AdapterRecord:
        """Stop giving ``name`` samples. RUNNING -> DRAINING; PENDING / LOADING go straight to REMOVED.
        A DRAINING adapter with nothing in flight is removed at the end of the next step (or :meth:`drain`)."""
        record = self.get(name)
        if record.state in (AdapterState.PENDING, AdapterState.LOADING):
            self._move(record, AdapterState.REMOVED)
        else:
            self._move(record, AdapterState.DRAINING)
        return record

    def drain(self) -> list[str]:
        """Remove every DRAINING adapter with no samples in flight; their slots become free."""
        done = [r for r in self.records() if r.state is AdapterState.DRAINING and r.in_flight == 0]
        for record in done:
            self._move(record, AdapterState.REMOVED)
        return [r.name for r in done]

    # -- a step --------------------------------------------------------------------------------

    def running(self) -> list[AdapterRecord]:
        return [r for r in self.records() if r.state is AdapterState.RUNNING]

    def plan_step(self, num_groups: int) -> StepPlan:
        """The next step's ``num_groups`` groups from the RUNNING adapters, by the interleave policy; the
        groups of one adapter are kept together in slot order (one adapter per microbatch downstream)."""
        if not isinstance(num_groups, int) or num_groups < 1:
            raise MultiLoraError(f"num_groups {num_groups!r} must be an integer >= 1")
        running = self.running()
        if not running:
            raise MultiLoraError(
                "no adapter is RUNNING: register one, then begin_loading, confirm_trainer and confirm_engine"
            )
        picks = self._pick_round_robin(running, num_groups) if self.interleave == "round-robin" \
            else self._pick_weighted(running, num_groups)
        slot = {r.name: r.slot for r in running}
        return StepPlan(self.step, tuple(sorted(picks, key=lambda n: slot[n])))

    def _pick_round_robin(self, running: list[AdapterRecord], n: int) -> list[str]:
        slots = [r.slot for r in running]
        by_slot = {r.slot: r.name for r in running}
        start = next((i for i, s in enumerate(slots) if s >= self._cursor), 0)
        picks = [by_slot[slots[(start + i) % len(slots)]] for i in range(n)]
        self._cursor = (slots[(start + n - 1) % len(slots)] + 1) % self.num_slots
        return picks

    def _pick_weighted(self, running: list[AdapterRecord], n: int) -> list[str]:
        total = sum(r.spec.weight for r in running)
        picks = []
        for _ in range(n):
            for r in running:
                self._credit[r.name] = self._credit.get(r.name, 0.0) + r.spec.weight
            best = max(running, key=lambda r: (self._credit[r.name], -r.slot))
            self._credit[best.name] -= total
            picks.append(best.name)
        return picks

    def draw(self, plan: StepPlan) -> list[tuple[str, Any]]:
        """Each planned group from its adapter's own data source, in plan order; marks them in flight."""
        out = []
        for name in plan.groups:
            record = self.require_ready(name)
            if record.data is None:
                raise MultiLoraError(f"adapter {name!r} has no data source; pass data= to register")
            out.append((name, record.data.next_group()))
            record.in_flight += 1
        return out

    def score(self, name: str, prompt: Any, completion: Any) -> float:
        """The adapter's own reward for one completion."""
        record = self.get(name)
        if record.reward_fn is None:
            raise MultiLoraError(f"adapter {name!r} has no reward function; pass reward_fn= to register")
        return float(record.reward_fn(prompt, completion))

    def finish_step(self, plan: StepPlan, samples: Mapping[str, int],
                    metrics: Mapping[str, Mapping[str, float]] | None = None) -> list[str]:
        """Book a trained step: only adapters with samples in it (``samples[name] > 0``) count it.

        ``metrics[name]`` (e.g. ``{"reward": ...}``) is kept per adapter; ``reward`` joins its curve. Groups of
        the plan are no longer in flight; DRAINING adapters with nothing in flight are removed (returned).
        """
        unknown = [n for n in samples if n not in self._records]
        if unknown:
            raise MultiLoraError(f"finish_step: samples for unknown adapters {unknown}; registered: {sorted(self._records)}")
        for name in plan.groups:
            if name in self._records:
                self._records[name].in_flight = max(0, self._records[name].in_flight - 1)
        for name, count in samples.items():
            if count <= 0:
                continue
            record = self._records[name]
            record.metrics.train_steps += 1
            record.metrics.samples += int(count)
            if metrics and name in metrics:
                record.metrics.last = {k: float(v) for k, v in metrics[name].items()}
                if "reward" in metrics[name]:
                    record.metrics.reward_history.append(float(metrics[name]["reward"]))
        self.step += 1
        return self.drain()

    # -- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the callables: specs, slots, states, metrics, data positions, interleave cursors."""
        return {
            "num_slots": self.num_slots, "interleave": self.interleave, "require_engine": self.require_engine,
            "step": self.step,
            "cursor": self._cursor, "credit": dict(self._credit), "next_engine_id": self._next_engine_id,
            "adapters": [{"spec": r.spec.to_dict(), "slot": r.slot, "state": r.state.value, "engine_id": r.engine_id,
                          "trainer_loaded": r.trainer_loaded, "engine_version": r.engine_version,
                          "metrics": r.metrics.to_dict(),
                          "data": r.data.state_dict() if r.data is not None else None} for r in self.records()],
        }

    def load_state_dict(self, state: Mapping[str, Any], data: Mapping[str, DataSource] | None = None,
                        reward_fns: Mapping[str, RewardFunction] | None = None) -> None:
        """Restore a :meth:`state_dict` into an empty controller; ``data`` / ``reward_fns`` give each adapter
        its (fresh) source and function back; a source's position is restored from the state."""
        if self._records:
            raise MultiLoraError("load_state_dict needs an empty controller (this one holds "
                                 f"{sorted(self._records)})")
        mine = (self.num_slots, self.interleave, self.require_engine)
        theirs = (int(state["num_slots"]), state["interleave"], bool(state["require_engine"]))
        if mine != theirs:
            raise MultiLoraError(
                f"state is for (slots, interleave, require_engine) = {theirs}; this controller has {mine}"
            )
        data, reward_fns = dict(data or {}), dict(reward_fns or {})
        self.step, self._cursor = int(state["step"]), int(state["cursor"])
        self._credit = {k: float(v) for k, v in state["credit"].items()}
        self._next_engine_id = int(state["next_engine_id"])
        for item in state["adapters"]:
            spec = AdapterSpec.from_dict(item["spec"])
            source = data.get(spec.name)
            if item["data"] is not None:
                if source is None:
                    raise MultiLoraError(f"adapter {spec.name!r} had a data source; pass it in data=")
                source.load_state_dict(item["data"])
            self._records[spec.name] = AdapterRecord(
                spec=spec, slot=int(item["slot"]), state=AdapterState(item["state"]), engine_id=int(item["engine_id"]),
                data=source,
                reward_fn=reward_fns.get(spec.name), trainer_loaded=bool(item["trainer_loaded"]),
                engine_version=item["engine_version"], metrics=AdapterMetrics.from_dict(item["metrics"]))


def present_adapters(sample_adapters: Iterable[str]) -> dict[str, int]:
    """Sample counts per adapter name, for :meth:`MultiLoraController.finish_step`."""
    counts: dict[str, int] = {}
    for name in sample_adapters:
        counts[name] = counts.get(name, 0) + 1
    return counts

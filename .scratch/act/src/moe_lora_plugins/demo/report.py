"""What the demo prints: a progress display for the long parts, one line per step, a summary, ``--json``.

Human-readable lines go to stdout, or to stderr with ``--json`` so that stdout carries exactly one
JSON object (the summary). On a terminal a phase shows a ticking timer; elsewhere it prints one
line when it starts and one when it ends.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_MODULE_SUFFIX = re.compile(r"\.lora_[AB](\.default)?\.weight$")


def lora_module_kind(module: str) -> str:
    """``attention``, ``dense_mlp``, ``experts`` or ``router`` for a module carrying LoRA, named the PEFT way
    (``...layers.0.mlp.gate_proj``) or the vLLM way (``...layers.0.mlp.gate_up_proj``, ``...mlp.experts``)."""
    if ".self_attn." in module:
        return "attention"
    if ".mlp.experts" in module:
        return "experts"
    if module.endswith(".mlp.gate"):
        return "router"
    if ".mlp." in module:
        return "dense_mlp"
    return "other"


def lora_kinds(modules: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per kind of module: how many modules carry LoRA and in which layers. PEFT tensor names
    (``<module>.lora_A.weight``) count once per module."""
    kinds: dict[str, dict[str, Any]] = {}
    for module in sorted({_MODULE_SUFFIX.sub("", name) for name in modules}):
        entry = kinds.setdefault(lora_module_kind(module), {"modules": 0, "layers": set()})
        entry["modules"] += 1
        layer = _LAYER.search(module)
        if layer is not None:
            entry["layers"].add(int(layer.group(1)))
    return {kind: {"modules": e["modules"], "layers": sorted(e["layers"])} for kind, e in sorted(kinds.items())}


def describe_lora_kinds(kinds: dict[str, dict[str, Any]]) -> str:
    """``attention 16 modules (layers 0,1,2,3); dense MLP 3 modules (layer 0); ...`` for the summary."""
    names = {"attention": "attention", "dense_mlp": "dense MLP", "experts": "experts", "router": "router"}
    parts = []
    for kind, entry in kinds.items():
        layers = entry["layers"]
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {','.join(map(str, layers))}"
        parts.append(f"{names.get(kind, kind)} {entry['modules']} modules ({where})")
    return "; ".join(parts) or "none"


@dataclass
class SyncFigures:
    """One adapter sync, trainer to engine."""

    version: int
    wire_bytes: int
    sent_bytes: int
    adapter_bytes: int
    expanded_bytes: int
    buckets: int
    senders: int
    seconds: float
    export_seconds: float
    audit_passed: bool
    audit_agrees_with_gather: bool
    engine_change: float
    adapter_changed: bool
    matches_vllm_loader: bool
    send_seconds: float = 0.0
    probe_seconds: float = 0.0
    adapter_lora_kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    engine_lora_kinds: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def engine_serves_every_kind(self) -> bool:
        """vLLM holds LoRA on every kind of module, in every layer, that the synced adapter's tensors carry."""
        return bool(self.adapter_lora_kinds) and all(
            self.engine_lora_kinds.get(kind, {}).get("layers") == entry["layers"]
            for kind, entry in self.adapter_lora_kinds.items())

    @property
    def bytes_equal(self) -> bool:
        """What the senders sent, what the engine received and the adapter's true bytes are one number."""
        return self.wire_bytes == self.sent_bytes == self.adapter_bytes


@dataclass
class StepFigures:
    """One GRPO step: rollout, trainer recompute and update, then the sync of the new adapter."""

    step: int
    reward: float
    train_rollout_logprob_abs_diff: float
    train_rollout_logprob_max_abs_diff: float
    loss: float
    rollout_seconds: float
    train_seconds: float
    sync: SyncFigures
    bitwise_equal_tokens: int = 0
    tokens: int = 0


@dataclass
class DemoSummary:
    layout: dict[str, Any]
    model: dict[str, Any]
    initial_sync: SyncFigures | None = None
    steps: list[StepFigures] = field(default_factory=list)
    final_train_rollout_logprob_abs_diff: float | None = None
    final_reward: float | None = None
    patches: dict[str, dict[str, str]] = field(default_factory=dict)
    required_patches: dict[str, list[str]] = field(default_factory=dict)
    startup_seconds: float = 0.0
    wall_seconds: float = 0.0
    workdir: str = ""
    lora_kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    dense_mlp_engine_effect: float | None = None
    true_on_policy: bool = False
    final_bitwise_equal_tokens: int = 0
    final_tokens: int = 0

    def syncs(self) -> list[SyncFigures]:
        return ([self.initial_sync] if self.initial_sync else []) + [s.sync for s in self.steps]

    def checks(self) -> dict[str, bool]:
        syncs = self.syncs()
        checks = {
            "suite_patches_applied_in_trainer_and_engine": bool(self.patches) and all(
                self.patches.get(role, {}).get(patch_id) == "applied"
                for role, ids in self.required_patches.items() for patch_id in ids),
            "adapter_reached_engine_every_sync": bool(syncs) and all(s.matches_vllm_loader for s in syncs),
            "engine_logprobs_changed_with_every_adapter_change": all(
                (s.sync.engine_change > 0) == s.sync.adapter_changed for s in self.steps),
            "export_audit_passed": bool(syncs) and all(s.audit_passed and s.audit_agrees_with_gather for s in syncs),
            "sync_bytes_equal_adapter_bytes": bool(syncs) and all(s.bytes_equal for s in syncs),
            "engine_serves_lora_on_every_module_kind": bool(syncs) and all(s.engine_serves_every_kind for s in syncs),
        }
        if self.dense_mlp_engine_effect is not None:
            checks["dense_mlp_lora_moves_engine_logprobs"] = self.dense_mlp_engine_effect > 0
        if self.true_on_policy:
            checks["trainer_logprobs_bitwise_equal_engine_logprobs"] = bool(self.steps) and all(
                s.train_rollout_logprob_max_abs_diff == 0.0 and s.tokens > 0 and s.bitwise_equal_tokens == s.tokens
                for s in self.steps) and self.final_tokens > 0 and self.final_bitwise_equal_tokens == self.final_tokens
        return checks

    @property
    def ok(self) -> bool:
        return all(self.checks().values())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["checks"] = self.checks()
        out["ok"] = self.ok
        return out


def reward_plot(rewards: list[float], height: int = 6) -> list[str]:
    """A text plot of the mean reward per step (0..1 on the vertical axis), one column per step."""
    if not rewards:
        return []
    rows = ["  mean reward per step:"]
    for level in range(height, 0, -1):
        top = level / height
        marks = "".join("#" if r >= top - 0.5 / height else " " for r in rewards)
        rows.append(f"  {top:4.2f} |{marks}")
    rows.append(f"       +{'-' * len(rewards)} steps 1..{len(rewards)}")
    return rows


class Reporter:
    """Prints phases, steps and the summary; ``json_mode`` moves the human lines to stderr."""

    def __init__(self, json_mode: bool = False, stream: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.out = stream or (sys.stderr if json_mode else sys.stdout)
        self.started = time.perf_counter()

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    @contextlib.contextmanager
    def phase(self, title: str) -> Iterator[None]:
        """A long part: a ticking timer on a terminal, start and end lines elsewhere."""
        start = time.perf_counter()
        done = threading.Event()
        ticker = None
        if self.out.isatty():
            def tick() -> None:
                frames = "|/-\\"
                i = 0
                while not done.wait(0.2):
                    print(f"\r  {frames[i % 4]} {title} ... {time.perf_counter() - start:5.1f} s", end="",
                          file=self.out, flush=True)
                    i += 1

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        else:
            self.line(f"  . {title} ...")
        try:
            yield
        except BaseException:
            done.set()
            if ticker:
                ticker.join()
                print(file=self.out)
            self.line(f"  x {title} failed after {time.perf_counter() - start:.1f} s")
            raise
        done.set()
        if ticker:
            ticker.join()
            print("\r", end="", file=self.out)
        self.line(f"  + {title} ({time.perf_counter() - start:.1f} s)")

    def sync_line(self, label: str, sync: SyncFigures) -> str:
        audit = "passed" if sync.audit_passed and sync.audit_agrees_with_gather else "FAILED"
        engine = "= vLLM loader" if sync.matches_vllm_loader else "!= vLLM loader"
        same = "=" if sync.bytes_equal else "!="
        return (f"{label} sync v{sync.version}: {sync.wire_bytes:,} B {same} adapter {sync.adapter_bytes:,} B "
                f"({sync.buckets} bucket(s) from {sync.senders} stage sender(s), {sync.seconds * 1000:.0f} ms; "
                f"naive per-name {sync.expanded_bytes:,} B) | audit {audit} | engine {engine}, "
                f"logprobs moved {sync.engine_change:.2e}{'' if sync.adapter_changed else ' (adapter unchanged)'}")

    def step_header(self) -> None:
        self.line(f"  {'step':>4}  {'reward':>6}  {'trainer vs engine log-probs':>36}  {'bitwise equal':>13}  "
                  f"{'loss':>8}  {'rollout':>7}  {'train':>6}")

    def step(self, figures: StepFigures) -> None:
        diff = figures.train_rollout_logprob_abs_diff
        shown = "= 0.0" if diff == 0.0 else f"= {diff:.2e}"
        equal = f"{figures.bitwise_equal_tokens}/{figures.tokens}"
        self.line(f"  {figures.step:>4}  {figures.reward:6.3f}  {'train_rollout_logprob_abs_diff ' + shown:>36}  "
                  f"{equal:>13}  {figures.loss:8.4f}  {figures.rollout_seconds:6.2f}s  {figures.train_seconds:5.2f}s")
        self.line("        " + self.sync_line("", figures.sync).strip())

    def summary(self, summary: DemoSummary) -> None:
        self.line()
        self.line("Summary")
        layout = summary.layout
        self.line(f"  trainer: Megatron-Bridge, {layout['trainer_procs']} gloo processes, EP={layout['ep']} x "
                  f"PP={layout['pp']}{' x VPP=' + str(layout['vpp']) if layout['vpp'] else ''} (TP=1); engine: vLLM "
                  f"{layout['engine']} with LoRA, in this process")
        if summary.steps:
            first, last = summary.steps[0], summary.steps[-1]
            trend = [f"{first.reward:.3f} (step 1)"]
            if last is not first:
                trend.append(f"{last.reward:.3f} (step {last.step})")
            if summary.final_reward is not None:
                trend.append(f"{summary.final_reward:.3f} (final rollout)")
            self.line("  reward: " + " -> ".join(trend))
            diffs = [s.train_rollout_logprob_abs_diff for s in summary.steps]
            if summary.final_train_rollout_logprob_abs_diff is not None:
                diffs.append(summary.final_train_rollout_logprob_abs_diff)
            tokens = sum(s.tokens for s in summary.steps) + summary.final_tokens
            equal = sum(s.bitwise_equal_tokens for s in summary.steps) + summary.final_bitwise_equal_tokens
            mode = ("true-on-policy mode on: both sides run moe_lora_plugins.onpolicy.ops" if summary.true_on_policy
                    else "true-on-policy mode off: Megatron's and vLLM's own float32 kernels")
            self.line(f"  train_rollout_logprob_abs_diff: max {max(diffs):.2e} over {len(diffs)} rollout batches, "
                      f"{equal}/{tokens} tokens bitwise equal ({mode})")
            curve = [s.reward for s in summary.steps] + ([summary.final_reward] if summary.final_reward is not None
                                                         else [])
            for row in reward_plot(curve):
                self.line(row)
        if summary.lora_kinds:
            self.line(f"  LoRA (from the synced adapter's tensors): {describe_lora_kinds(summary.lora_kinds)}")
        syncs = summary.syncs()
        if syncs and syncs[-1].engine_lora_kinds:
            self.line(f"  LoRA vLLM holds (q/k/v and gate/up packed, experts one module per layer): "
                      f"{describe_lora_kinds(syncs[-1].engine_lora_kinds)}")
        if summary.dense_mlp_engine_effect is not None:
            self.line(f"  dense-MLP LoRA in vLLM: zeroing its lora_B moves the engine's logprobs by "
                      f"{summary.dense_mlp_engine_effect:.2e}")
        elif "dense_mlp" in summary.lora_kinds:
            self.line("  dense-MLP LoRA in vLLM: not measured, its lora_B is still zero (no step moved it)")
        if syncs:
            self.line(f"  adapter syncs: {len(syncs)}, {syncs[-1].wire_bytes:,} B each (adapter "
                      f"{syncs[-1].adapter_bytes:,} B), mean {1000 * sum(s.seconds for s in syncs) / len(syncs):.0f} ms")
        for role, statuses in summary.patches.items():
            applied = sorted(p for p, st in statuses.items() if st == "applied")
            self.line(f"  patches applied ({role}, MOELORA_PLUGINS=on): {', '.join(applied) or 'none'}")
        for name, ok in summary.checks().items():
            self.line(f"  [{'ok' if ok else 'FAILED'}] {name.replace('_', ' ')}")
        self.line(f"  wall time {summary.wall_seconds:.1f} s (start-up {summary.startup_seconds:.1f} s); "
                  f"logs and model in {summary.workdir}")

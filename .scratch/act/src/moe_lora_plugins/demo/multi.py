"""``moe-lora-plugins demo --adapters N``: several LoRA adapters trained at once on one frozen tiny MoE.

Adapters of different ranks learn different toy tasks (copy the prompt's symbols; write them
reversed) in one Megatron-Bridge trainer (EP x PP gloo processes, every adapter on attention, the
dense MLP and every expert) while one vLLM engine serves all of them concurrently. Per step: the
controller plans groups from every RUNNING adapter, the engine samples every group in one call (each
request tagged with its adapter's LoRA), each adapter's own reward scores its completions, one
trainer step trains the adapters present (each sample through its own adapter), then every adapter is
synced to the engine under its own stable id. After each sync, each adapter's probe log-probs from
the engine must equal vLLM's own loading of that adapter's PEFT directory (bitwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_lora_plugins.demo.run import _output_to
from moe_lora_plugins.demo.task import CopyTask
from moe_lora_plugins.errors import MoeLoraError

SYNC_HOST = "127.0.0.1"
DISK_ID_BASE = 1000  # engine ids of the PEFT-directory checks (adapters get small ids from the controller)


@dataclass(frozen=True)
class ReverseTask(CopyTask):
    """The prompt's symbols in reverse order (same prompt format and reward shape as :class:`CopyTask`)."""

    def target(self, prompt: list[int]) -> list[int]:
        return list(reversed(prompt[1 : 1 + self.length]))


TASKS = {"copy": CopyTask, "reverse": ReverseTask}


@dataclass(frozen=True)
class MultiDemoConfig:
    """Settings of the multi-adapter demo; ``ranks[i]`` / ``tasks[i]`` belong to adapter ``i``."""

    adapters: int = 2
    steps: int = 6
    ep: int = 2
    pp: int = 2
    ranks: tuple[int, ...] = (4, 8)
    tasks: tuple[str, ...] = ("copy", "reverse")
    group_size: int = 4
    groups_per_adapter: int = 2
    task_length: int = 3
    learning_rate: float = 0.05
    seed: int = 0
    workdir: str | None = None

    def problems(self) -> list[str]:
        out = []
        if self.adapters < 1:
            out.append(f"--adapters {self.adapters}: need at least 1")
        if len(self.ranks) < self.adapters or len(self.tasks) < self.adapters:
            out.append(f"--adapters {self.adapters}: give as many --ranks ({list(self.ranks)}) and --tasks "
                       f"({list(self.tasks)})")
        if any(r not in range(1, 9) for r in self.ranks):
            out.append(f"--ranks {list(self.ranks)}: each rank must be 1..8 (the engine's max LoRA rank is 8)")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            out.append(f"--tasks {unknown}: known tasks are {sorted(TASKS)}")
        dp = self.ep  # data-parallel size with TP = 1: world / PP
        if self.group_size % dp:
            out.append(f"--group-size {self.group_size}: must be a multiple of the data-parallel size {dp} (= EP here)")
        if self.steps < 1:
            out.append(f"--steps {self.steps}: need at least 1")
        return out


@dataclass
class AdapterCurve:
    """One adapter's story: rank, task, mean reward per step, and every sync check."""

    name: str
    rank: int
    task: str
    engine_id: int
    rewards: list[float] = field(default_factory=list)
    sync_checks: list[bool] = field(default_factory=list)

    @property
    def improved(self) -> bool:
        half = max(1, len(self.rewards) // 2)
        return sum(self.rewards[-half:]) / half > sum(self.rewards[:half]) / half

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.rank, "task": self.task, "engine_id": self.engine_id,
                "rewards": self.rewards, "improved": self.improved, "sync_checks": self.sync_checks}


class MultiEngine:
    """One vLLM engine with room for every adapter and its PEFT-directory check at once."""

    def __init__(self, model_dir: str, adapters: int, seed: int) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_dir, enable_lora=True, max_lora_rank=8, max_loras=2 * adapters, max_cpu_loras=2 * adapters + 2,
            dtype="float32", max_model_len=64, enforce_eager=True, max_num_seqs=32, seed=seed,
            worker_extension_cls="moe_lora_plugins.integrations.vllm_worker.MoeLoraWorkerExtension",
        )
        import torch

        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = 0.3
        else:
            kwargs["kv_cache_memory_bytes"] = 64 << 20
        self.llm = LLM(**kwargs)

    def generate(self, prompts: Sequence[Sequence[int]], requests: Sequence[Any], max_tokens: int, *, n: int = 1,
                 seeds: Sequence[int] | None = None, greedy: bool = False) -> list[Any]:
        from vllm import SamplingParams

        params = [SamplingParams(n=n, temperature=0.0 if greedy else 1.0, max_tokens=max_tokens, min_tokens=max_tokens,
                                 ignore_eos=True, logprobs=0, seed=None if seeds is None else seeds[i])
                  for i in range(len(prompts))]
        return self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, lora_request=list(requests),
                                 use_tqdm=False)


def _logprob_rows(outputs: list[Any]) -> list[list[float]]:
    return [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
            for o in outputs]


class MultiDemo:
    """One run; :meth:`run` returns the summary dict (``ok`` says whether every check passed)."""

    def __init__(self, config: MultiDemoConfig, out: Any = sys.stdout) -> None:
        self.config = config
        self.out = out
        self.workdir = Path(config.workdir or tempfile.mkdtemp(prefix="moelora-multi-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.pool: Any = None
        self.engine: MultiEngine | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> dict[str, Any]:
        problems = self.config.problems()
        if problems:
            raise MoeLoraError("the multi-adapter demo cannot start:\n  - " + "\n  - ".join(problems))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ["MOELORA_PLUGINS"] = "on"
        try:
            return self._run()
        finally:
            if self.pool is not None:
                self.pool.stop()

    def _run(self) -> dict[str, Any]:
        from moe_lora_plugins.demo.model import make_tiny_moe
        from moe_lora_plugins.multilora.controller import AdapterSpec, MultiLoraController, PromptCycle
        from moe_lora_plugins.multilora.driver import MultiLoraDriver
        from moe_lora_plugins.multilora.tagging import AdapterRequestTagger
        from moe_lora_plugins.multilora.trainer import MultiLoraTrainerPool, MultiTrainerSettings

        c = self.config
        start = time.perf_counter()
        with _output_to(self.logs / "model.log"):
            model_dir = make_tiny_moe(self.workdir / "model", seed=c.seed)
        self.say(f"multi-LoRA demo: {c.adapters} adapters on one tiny Qwen3-MoE, trainer EP={c.ep} x PP={c.pp}, "
                 f"{c.steps} steps")
        self.pool = MultiLoraTrainerPool(MultiTrainerSettings(str(model_dir), ep=c.ep, pp=c.pp, micro_batch_size=1),
                                         env=dict(os.environ), log_dir=str(self.logs))
        from moe_lora_plugins.activation import activate

        activate(role="vllm")
        with _output_to(self.logs / "engine.log"):
            self.engine = MultiEngine(str(model_dir), c.adapters, c.seed)
        self.say(f"  trainer and engine up in {time.perf_counter() - start:.1f} s")
        from moe_lora_plugins.testing.distributed import free_port

        port = free_port()
        self.pool.send("join_sync_group", SYNC_HOST, port)
        self.engine.llm.collective_rpc("moelora_init_sync_group", args=(SYNC_HOST, port, 0, c.pp + 1, "gloo", 300.0))
        senders = sorted(s + 1 for s in self.pool.collect("join_sync_group") if s is not None)

        controller = MultiLoraController(c.adapters)
        self.tagger = AdapterRequestTagger(controller)
        driver = MultiLoraDriver(controller, self.pool, self._rollout, group_size=c.group_size,
                                 groups_per_adapter=c.groups_per_adapter)
        curves: dict[str, AdapterCurve] = {}
        self.tasks: dict[str, CopyTask] = {}
        probes = CopyTask(length=c.task_length).prompts(2, seed=10_000 + c.seed)
        for i in range(c.adapters):
            task = TASKS[c.tasks[i]](length=c.task_length)
            name = f"{c.tasks[i]}-r{c.ranks[i]}" + (f"-{i}" if c.adapters > 2 else "")
            spec = AdapterSpec(name, rank=c.ranks[i], alpha=2.0 * c.ranks[i], learning_rate=c.learning_rate,
                               seed=c.seed + 1 + i)
            self.tasks[name] = task
            driver.register(spec, PromptCycle(task.prompts(16, seed=c.seed * 100 + i), seed=spec.seed),
                            lambda prompt, completion, task=task: task.reward(list(prompt), list(completion)))
            curves[name] = AdapterCurve(name, spec.rank, c.tasks[i], controller.get(name).engine_id)
        self._sync_all(controller, senders, version=0)  # first sync: LoRA B = 0; confirms the engine side
        self.say("  step  " + "  ".join(f"{n:>14}" for n in curves) + "   (mean reward per adapter)")
        for step in range(1, c.steps + 1):
            report = driver.step()
            self._sync_all(controller, senders, version=step)
            checks = self._check_against_disk(controller, probes, step)
            for name, curve in curves.items():
                curve.rewards.append(report.rewards.get(name, float("nan")))
                curve.sync_checks.append(checks[name])
            self.say(f"  {step:>4}  " + "  ".join(f"{report.rewards[n]:>14.3f}" for n in curves)
                     + ("" if all(checks.values()) else f"   sync check FAILED: {checks}"))
        summary = {"adapters": [curve.to_json() for curve in curves.values()],
                   "layout": {"ep": c.ep, "pp": c.pp}, "wall_seconds": time.perf_counter() - start,
                   "workdir": str(self.workdir)}
        summary["ok"] = all(all(a["sync_checks"]) for a in summary["adapters"])
        for curve in curves.values():
            self.say(f"  {curve.name}: reward {curve.rewards[0]:.3f} -> {curve.rewards[-1]:.3f} "
                     f"({'improved' if curve.improved else 'not improved'}); engine == vLLM's own PEFT load after "
                     f"{sum(curve.sync_checks)}/{len(curve.sync_checks)} syncs")
        return summary

    # -- engine side ---------------------------------------------------------------------------

    def _rollout(self, requests: list[Any], group_size: int) -> list[list[list[int]]]:
        """Every group of the step in one engine call, each request with its adapter's LoRA."""
        tags = [self.tagger.tag(r.adapter) for r in requests]
        try:
            outputs = self.engine.generate([r.prompt for r in requests], [t.lora_request() for t in tags],
                                           self.config.task_length, n=group_size, seeds=[r.seed for r in requests])
        finally:
            for tag in tags:
                self.tagger.done(tag)
        return [[list(sample.token_ids) for sample in output.outputs] for output in outputs]

    def _sync_all(self, controller: Any, senders: list[int], version: int) -> None:
        """Each adapter to the engine under its own stable name and id (the trainer's stages send)."""
        from moe_lora_plugins.integrations.vllm_worker import receive_adapter

        for record in controller.records():
            self.pool.send("send_adapter", record.slot, version)
            receive_adapter(self.engine.llm, record.name, record.engine_id, senders, version)
            self.pool.collect("send_adapter")
            controller.confirm_engine(record.name, version)

    def _check_against_disk(self, controller: Any, probes: list[list[int]], step: int) -> dict[str, bool]:
        """Per adapter: greedy probe log-probs served from the sync equal, bitwise, those of vLLM loading the
        adapter's PEFT directory (exported from the trainer). One adapter per call: on the CPU, rows of a
        batch that mixes LoRAs are grouped by LoRA slot, which can move float32 sums by ~1e-6."""
        from vllm.lora.request import LoRARequest

        from moe_lora_plugins.lora.formats import write_adapter_dir

        checks = {}
        for i, record in enumerate(controller.records()):
            exported = self.pool.call("export_adapter", record.slot)[0]
            path = self.workdir / "peft" / f"{record.name}-step{step}"
            write_adapter_dir(str(path), exported["tensors"], exported["config"])
            disk_id = DISK_ID_BASE + 100 * step + i
            tag = self.tagger.tag(record.name)
            try:
                served = _logprob_rows(self.engine.generate(probes, [tag.lora_request()] * len(probes),
                                                            self.config.task_length, greedy=True))
                disk = LoRARequest(f"{record.name}-disk-{step}", disk_id, str(path))
                loaded = _logprob_rows(self.engine.generate(probes, [disk] * len(probes), self.config.task_length,
                                                            greedy=True))
            finally:
                self.tagger.done(tag)
                self.engine.llm.collective_rpc("remove_lora", args=(disk_id,))
            checks[record.name] = served == loaded
        return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", type=int, default=2, help="adapters trained at once (default 2)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--ranks", type=lambda s: tuple(int(x) for x in s.split(",")), default=(4, 8),
                        help="LoRA rank per adapter, comma-separated (default 4,8)")
    parser.add_argument("--tasks", type=lambda s: tuple(s.split(",")), default=("copy", "reverse"),
                        help=f"toy task per adapter, comma-separated, from {sorted(TASKS)} (default copy,reverse)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--groups-per-adapter", type=int, default=2)
    parser.add_argument("--task-length", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")


def run_from_args(args: argparse.Namespace) -> int:
    config = MultiDemoConfig(adapters=args.adapters, steps=args.steps, ep=args.ep, pp=args.pp, ranks=args.ranks,
                             tasks=args.tasks, group_size=args.group_size, groups_per_adapter=args.groups_per_adapter,
                             task_length=args.task_length, learning_rate=args.lr, seed=args.seed, workdir=args.workdir)
    problems = config.problems()
    if problems:
        print("moe-lora-plugins demo --adapters: " + "; ".join(problems), file=sys.stderr)
        return 2
    demo = MultiDemo(config, out=sys.stderr if args.json else sys.stdout)
    try:
        summary = demo.run()
    except (MoeLoraError, RuntimeError) as exc:
        print(f"moe-lora-plugins demo --adapters failed: {exc}\n(logs: {demo.logs})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0 if summary["ok"] else 1


def run_from_args_with_defaults(args: argparse.Namespace) -> int:
    """``moe-lora-plugins demo --adapters N``: the single-adapter demo's flags where the user set them (steps,
    layout, group size, task length, learning rate, seed, workdir, json), this demo's own defaults where a
    flag still holds the single-adapter demo's default; ranks and tasks cycle through 4, 8 and copy, reverse."""
    from moe_lora_plugins.demo.config import DemoConfig

    single, multi = DemoConfig(), MultiDemoConfig()

    def chosen(name: str, single_default: object, multi_default: object) -> object:
        value = getattr(args, name)
        return multi_default if value == single_default else value

    n = args.adapters
    ours = argparse.Namespace(
        adapters=n, steps=chosen("steps", single.steps, multi.steps), ep=args.ep, pp=args.pp,
        ranks=tuple((4, 8)[i % 2] for i in range(n)), tasks=tuple(("copy", "reverse")[i % 2] for i in range(n)),
        group_size=chosen("group_size", single.group_size, multi.group_size),
        groups_per_adapter=multi.groups_per_adapter,
        task_length=chosen("task_length", single.task_length, multi.task_length),
        lr=chosen("lr", single.learning_rate, multi.learning_rate), seed=args.seed, workdir=args.workdir,
        json=args.json)
    return run_from_args(ours)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lora_plugins.demo.multi", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""The demo's settings and the checks that stop a bad configuration before anything starts.

:func:`validate` returns every problem at once; each line says what was wrong, with the values,
and what to change. It imports nothing heavy (``importlib.util.find_spec`` only), so a wrong flag
costs milliseconds, not a minute of process start-up.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field

from moe_lora_plugins.demo.model import TinyMoeSpec
from moe_lora_plugins.errors import MoeLoraError

# vLLM's LoRA engine accepts these max_lora_rank values.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class DemoConfigError(MoeLoraError, ValueError):
    """The demo cannot run with these settings; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("the demo cannot start:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class DemoConfig:
    """Everything ``moe-lora-plugins demo`` can be told (see ``moe-lora-plugins demo --help``)."""

    steps: int = 25
    ep: int = 2
    pp: int = 2
    vpp: int | None = None
    trainer_procs: int | None = None
    samples: int = 64
    group_size: int = 8
    task: str = "echo"
    task_length: int = 1
    alphabet: int = 4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    learning_rate: float = 0.005
    seed: int = 0
    workdir: str | None = None
    true_on_policy: bool = True
    model: TinyMoeSpec = field(default_factory=TinyMoeSpec)

    @property
    def world_size(self) -> int:
        return self.ep * self.pp

    @property
    def prompts_per_step(self) -> int:
        return self.samples // self.group_size

    @property
    def max_lora_rank(self) -> int:
        return next(r for r in VLLM_LORA_RANKS if r >= self.lora_rank)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problems(config: DemoConfig) -> list[str]:
    """Parallel-layout problems: process count, EP vs experts, PP x VPP vs layers, samples vs replicas."""
    problems: list[str] = []
    spec = config.model
    if config.ep < 1 or config.pp < 1:
        problems.append(f"--ep {config.ep} --pp {config.pp}: both must be >= 1")
        return problems
    if spec.num_experts % config.ep:
        problems.append(
            f"--ep {config.ep} does not divide the model's {spec.num_experts} experts: each expert-parallel rank "
            f"must hold the same number of experts; choose --ep from {_divisors(spec.num_experts)}"
        )
    chunks = config.pp * (config.vpp or 1)
    if config.vpp is not None and (config.vpp < 2 or config.pp < 2):
        problems.append(
            f"--vpp {config.vpp} with --pp {config.pp}: virtual pipeline stages need --pp >= 2 and --vpp >= 2 "
            "(or leave --vpp out)"
        )
    elif spec.num_layers % chunks:
        vpp = f" x VPP={config.vpp}" if config.vpp else ""
        problems.append(
            f"PP={config.pp}{vpp} = {chunks} model chunks do not split the model's {spec.num_layers} layers evenly; "
            f"choose --pp (x --vpp) from {_divisors(spec.num_layers)}"
        )
    if config.trainer_procs is not None and config.trainer_procs != config.world_size:
        more = "more" if config.trainer_procs > config.world_size else "fewer"
        problems.append(
            f"--trainer-procs {config.trainer_procs} is {more} processes than the layout needs: EP={config.ep} x "
            f"PP={config.pp} (TP=1) is {config.world_size} trainer processes; pass --trainer-procs "
            f"{config.world_size} (or leave it out), or change --ep / --pp"
        )
    if config.samples < 1 or config.group_size < 2 or config.samples % config.group_size:
        problems.append(
            f"--samples {config.samples} --group-size {config.group_size}: GRPO needs groups of >= 2 samples per "
            "prompt and --samples a multiple of --group-size"
        )
    elif config.samples % config.ep:
        problems.append(
            f"--samples {config.samples} does not split over the {config.ep} data-parallel replicas (one per "
            f"expert-parallel rank); choose a multiple of {config.ep}"
        )
    elif config.vpp and (config.samples // config.ep) % config.pp:
        problems.append(
            f"--vpp {config.vpp}: the interleaved schedule runs {config.pp} microbatches (one per pipeline stage), "
            f"but each data-parallel replica gets {config.samples // config.ep} samples; choose --samples as a "
            f"multiple of {config.ep * config.pp}"
        )
    if config.task not in ("echo", "copy"):
        problems.append(f"--task {config.task!r}: choose echo or copy")
    if config.alphabet < 2 or 4 + config.alphabet > spec.vocab_size:
        problems.append(f"--alphabet {config.alphabet}: choose 2..{spec.vocab_size - 4} task symbols")
    if config.steps < 1:
        problems.append(f"--steps {config.steps}: run at least one step")
    if config.lora_rank < 1 or config.lora_rank > VLLM_LORA_RANKS[-1]:
        problems.append(f"--lora-rank {config.lora_rank}: choose 1..{VLLM_LORA_RANKS[-1]}")
    if config.task_length + 2 + config.task_length > spec.max_positions:
        problems.append(f"--task-length {config.task_length} does not fit {spec.max_positions} positions")
    return problems


def environment_problems() -> list[str]:
    """Missing packages or a Python that cannot hold both trainer and engine."""
    problems: list[str] = []
    install = (
        "run the demo with `nox -s demo` (it builds the environment), or install the trainer and engine into one "
        "Python 3.12 venv as the README's 'Run the demo' section shows"
    )
    if importlib.util.find_spec("vllm") is None:
        problems.append(f"vLLM is not installed in {sys.executable}: the rollout engine needs it; {install}")
    for module, what in (("megatron.core", "megatron-core"), ("megatron.bridge", "megatron-bridge")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            problems.append(f"{what} is not installed in {sys.executable}: the trainer needs it; {install}")
    for module in ("transformers", "tokenizers", "safetensors"):
        if importlib.util.find_spec(module) is None:
            problems.append(f"{module} is not installed in {sys.executable}; {install}")
    if sys.version_info < (3, 12):
        problems.append(
            f"Python {sys.version_info.major}.{sys.version_info.minor}: megatron-bridge 0.6 needs Python >= 3.12; {install}"
        )
    return problems


def validate(config: DemoConfig, check_environment: bool = True) -> None:
    """Raise :class:`DemoConfigError` listing every problem with ``config`` (and the environment)."""
    problems = layout_problems(config)
    if check_environment:
        problems += environment_problems()
    if problems:
        raise DemoConfigError(problems)

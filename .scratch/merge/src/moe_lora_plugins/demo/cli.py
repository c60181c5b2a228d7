"""``moe-lora-plugins demo``: the command line of the end-to-end demo (registered in ``cli.SUBCOMMANDS``)."""

from __future__ import annotations

import argparse
import json
import sys

from moe_lora_plugins.demo.config import DemoConfig


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a real MoE LoRA RL loop on the CPU: Megatron-Bridge trainer (EP x PP gloo processes) + vLLM",
        description="Make a tiny Qwen3-MoE locally, train LoRA on it for a few GRPO-style steps with a "
        "Megatron-Bridge trainer in several gloo processes, roll out with a real vLLM engine, and sync the "
        "adapter into vLLM in place after every step, checking each sync. Exits 1 if a check fails.",
    )
    d = DemoConfig()
    p.add_argument("--steps", type=int, default=d.steps, help=f"GRPO steps (default {d.steps})")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size of the trainer (default 2)")
    p.add_argument("--pp", type=int, default=2, help="pipeline-parallel size of the trainer (default 2)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per PP rank (default: none)")
    p.add_argument("--trainer-procs", type=int, default=None,
                   help="trainer processes; must equal EP x PP (the default)")
    p.add_argument("--samples", type=int, default=d.samples, help=f"rollouts per step (default {d.samples})")
    p.add_argument("--group-size", type=int, default=d.group_size,
                   help=f"rollouts per prompt, the GRPO group (default {d.group_size})")
    p.add_argument("--task-length", type=int, default=d.task_length,
                   help=f"completion tokens per prompt (default {d.task_length})")
    p.add_argument("--task", choices=("echo", "copy"), default="echo",
                   help="echo: repeat the prompt's last symbol (default); copy: repeat the whole sequence")
    p.add_argument("--alphabet", type=int, default=d.alphabet, help=f"distinct task symbols (default {d.alphabet})")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank})")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    p.add_argument("--lr", type=float, default=d.learning_rate,
                   help=f"Adam learning rate on the LoRA parameters (default {d.learning_rate})")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, prompts and sampling (default 0)")
    p.add_argument("--workdir", default=None, help="where the model and logs go (default: a new temp dir)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    p.add_argument("--adapters", type=int, default=1,
                   help="train N adapters at once (different ranks, different toy tasks; docs/multilora.md)")
    p.add_argument("--plot", default=None, metavar="FILE", help="write the reward curve as a PNG to FILE")
    p.add_argument("--true-on-policy", dest="true_on_policy", action=argparse.BooleanOptionalAction, default=True,
                   help="true-on-policy mode in trainer and engine (default on): the trainer's log-probs equal "
                   "the engine's bit for bit; --no-true-on-policy shows the default kernels' diff")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    if args.adapters > 1:
        from moe_lora_plugins.demo.multi import run_from_args_with_defaults

        return run_from_args_with_defaults(args)
    from moe_lora_plugins.demo.config import DemoConfig, DemoConfigError, validate
    from moe_lora_plugins.demo.report import Reporter
    from moe_lora_plugins.demo.run import Demo

    config = DemoConfig(
        steps=args.steps, ep=args.ep, pp=args.pp, vpp=args.vpp, trainer_procs=args.trainer_procs,
        samples=args.samples, group_size=args.group_size, task=args.task, task_length=args.task_length, alphabet=args.alphabet,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, learning_rate=args.lr, seed=args.seed,
        workdir=args.workdir, true_on_policy=args.true_on_policy,
    )
    try:
        validate(config)
    except DemoConfigError as exc:
        print(f"moe-lora-plugins demo: {exc}", file=sys.stderr)
        return 2
    from moe_lora_plugins.errors import MoeLoraError

    reporter = Reporter(json_mode=args.json)
    demo = Demo(config, reporter)
    try:
        summary = demo.run()
    except (MoeLoraError, RuntimeError) as exc:
        print(f"moe-lora-plugins demo failed: {exc}\n(logs: {demo.logs})", file=sys.stderr)
        return 1
    reporter.summary(summary)
    if args.plot:
        from moe_lora_plugins.demo.plot import write_reward_png

        curve = [s.reward for s in summary.steps] + ([summary.final_reward] if summary.final_reward is not None else [])
        reporter.line(f"  reward curve written to {write_reward_png(args.plot, curve)}")
    if args.json:
        print(json.dumps(summary.to_json(), separators=(",", ":")), flush=True)
    if not summary.ok:
        failed = [name for name, ok in summary.checks().items() if not ok]
        print(f"moe-lora-plugins demo: checks failed: {failed}", file=sys.stderr)
        return 1
    return 0

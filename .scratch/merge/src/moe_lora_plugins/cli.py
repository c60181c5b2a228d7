"""The ``moe-lora-plugins`` command line: ``doctor`` and ``ledger`` (more subcommands register here)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

Subcommand = Callable[[argparse._SubParsersAction], None]


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="show versions, switches, plugins and every patch's status")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when an enabled patch is incompatible, drifted or missing a symbol")
    p.add_argument("--status-dir", default=None, help="also show the per-process status files in DIR")
    p.add_argument("--verbose", action="store_true",
                   help="also show what the upstream packages printed while doctor imported them")
    p.add_argument(
        "--no-import",
        action="store_true",
        help="do not import the patch targets (faster; resolvable and fingerprint are then unknown)",
    )
    p.set_defaults(func=_run_doctor)


def _run_doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_lora_plugins import doctor

    status_dir = args.status_dir or doctor.default_status_dir()
    if status_dir and not Path(status_dir).is_dir():
        where = f"--status-dir {status_dir!r}" if args.status_dir else f"MOELORA_STATUS_DIR={status_dir!r}"
        message = (f"moe-lora-plugins doctor: {where} does not exist or is not a directory; point it at the "
                   "MOELORA_STATUS_DIR your processes were started with")
        if args.status_dir:
            print(message, file=sys.stderr)
            return 2
        print(f"{message} (no process has written there yet?)", file=sys.stderr)
        status_dir = None
    report = doctor.collect(import_targets=not args.no_import, status_dir=status_dir)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(doctor.render_text(report, verbose=args.verbose))
    bad = doctor.failures(report)
    if args.strict and (bad or report["switch_error"]):
        print(f"doctor --strict: failing patches {bad}; switch error: {report['switch_error']}", file=sys.stderr)
        return 1
    return 0


def _add_ledger(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ledger", help="print the patch ledger (markdown) generated from the specs")
    p.set_defaults(func=_run_ledger)


def _run_ledger(args: argparse.Namespace) -> int:
    from moe_lora_plugins.activation import get_registry
    from moe_lora_plugins.ledger import render_ledger

    sys.stdout.write(render_ledger(get_registry().specs))
    return 0


SUBCOMMANDS: list[Subcommand] = [_add_doctor, _add_ledger]

from moe_lora_plugins.lora.cli import add_convert_subcommand  # noqa: E402  (argparse only at import)

SUBCOMMANDS.append(add_convert_subcommand)

from moe_lora_plugins.demo.cli import add_demo  # noqa: E402  (argparse only at import)

SUBCOMMANDS.append(add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lora-plugins",
        description="MoE LoRA and true on-policy RL patches for Megatron-Bridge, vLLM and SGLang.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

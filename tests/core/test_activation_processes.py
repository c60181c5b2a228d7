"""Activation reaches every kind of child process, with the switch on; nothing happens with it off.

These need the package installed (the ``.pth`` bootstrap lives in site-packages), as the core lane
does with ``pip install .``. Each child imports the fixture target and reports whether the fixture
plugin's patch is in effect (``compute(1)`` is 12 patched, 2 original).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lora_plugins.doctor import _bootstrap_locations
from moe_lora_plugins.testing.contract import write_module

from .fixture_site import build_fixture_site

PROBE = '''
"""Fixture probe run in child processes."""

import json
import os
import sys


def probe(tag):
    import moelora_fixture_target.core as t

    import moe_lora_plugins

    out = {"tag": tag, "pid": os.getpid(), "active": moe_lora_plugins.is_active(), "compute": t.compute(1)}
    path = os.path.join(os.environ["PROBE_OUT"], f"{tag}-{os.getpid()}.json")
    with open(path, "w") as fh:
        json.dump(out, fh)


def run_with(method):
    import multiprocessing as mp

    ctx = mp.get_context(method)
    p = ctx.Process(target=probe, args=(method,))
    p.start()
    p.join(120)
    assert p.exitcode == 0, p.exitcode


if __name__ == "__main__":
    if os.environ.get("RANK") is not None:
        probe("torchrun")
    elif sys.argv[1] == "subprocess":
        import subprocess

        subprocess.run([sys.executable, "-c", "import moelora_fixture_probe as p; p.probe('subprocess')"], check=True)
    else:
        run_with(sys.argv[1])
'''

installed = bool(_bootstrap_locations())
pytestmark = pytest.mark.skipif(
    not installed and not os.environ.get("MOELORA_LANE"),
    reason="the .pth bootstrap is not installed in this interpreter (run the core lane: nox -s core)",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = build_fixture_site(tmp_path_factory.mktemp("procs"))
    write_module(site, "moelora_fixture_probe", PROBE)
    return site


def _run(site: Path, out: Path, args: list[str], switch: str | None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    env["PYTHONPATH"] = str(site)
    env["PROBE_OUT"] = str(out)
    if switch is not None:
        env["MOELORA_PLUGINS"] = switch
    subprocess.run([sys.executable, *args], env=env, check=True, timeout=240, cwd=site)
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


METHODS = ["spawn", "forkserver", "fork", "subprocess"]


def test_bootstrap_is_installed_in_the_lane():
    assert installed, "the core lane installs the package; moe_lora_plugins.pth must be in site-packages"


@pytest.mark.parametrize("method", METHODS)
def test_child_process_is_patched_with_the_switch_on(method, site, tmp_path):
    results = _run(site, tmp_path, [str(site / "moelora_fixture_probe.py"), method], "on")
    assert [(r["tag"], r["active"], r["compute"]) for r in results] == [(method, True, 12)]


@pytest.mark.parametrize("method", METHODS)
def test_child_process_is_untouched_with_the_switch_off(method, site, tmp_path):
    results = _run(site, tmp_path, [str(site / "moelora_fixture_probe.py"), method], None)
    assert [(r["tag"], r["active"], r["compute"]) for r in results] == [(method, False, 2)]


@pytest.mark.parametrize("switch", ["on", None], ids=["on", "off"])
def test_every_torchrun_rank_follows_the_switch(switch, site, tmp_path):
    if not os.environ.get("MOELORA_LANE"):
        pytest.importorskip("torch")
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(site / "moelora_fixture_probe.py")]
    results = _run(site, tmp_path, args, switch)
    expected = (True, 12) if switch else (False, 2)
    assert len(results) == 2
    assert all((r["active"], r["compute"]) == expected for r in results)


def test_switch_unset_imports_nothing_of_ours(site):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    code = "import sys, json; print(json.dumps([m for m in ('moe_lora_plugins', 'wrapt', 'pluggy') if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_malformed_switch_is_reported_and_the_interpreter_still_starts():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    env["MOELORA_PLUGINS"] = "maybe"
    out = subprocess.run([sys.executable, "-c", "print('started')"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "started"
    assert "MOELORA_PLUGINS='maybe' is not an on/off value" in out.stderr


def _start(env_switches: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    env.update(env_switches)
    return subprocess.run([sys.executable, "-c", "print('started')"], env=env, capture_output=True, text=True)


def test_strict_mode_stops_a_process_whose_activation_fails():
    out = _start({"MOELORA_STRICT": "1", "MOELORA_PLUGINS": "on", "MOELORA_PATCHES": "bogus"})
    assert out.returncode != 0, out
    assert "started" not in out.stdout
    assert "bogus" in out.stderr and "SettingsError" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Fatal Python error" not in out.stderr, out.stderr


def test_without_strict_a_failed_activation_says_it_runs_unpatched():
    out = _start({"MOELORA_PLUGINS": "on", "MOELORA_PATCHES": "bogus"})
    assert out.returncode == 0 and out.stdout.strip() == "started"
    assert "bogus" in out.stderr and "running unpatched" in out.stderr, out.stderr

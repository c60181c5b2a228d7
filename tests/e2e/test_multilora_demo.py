"""``moe-lora-plugins demo --adapters 2`` end to end: two adapters of different ranks learn two toy tasks at
once in one Megatron-Bridge trainer (EP=2 x PP=2 gloo processes) served by one vLLM engine.

Read from ``--json``: each adapter's reward improves on its own task, and after every sync the engine's
log-probs for each adapter equal vLLM's own loading of that adapter's PEFT directory (bitwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SRC = str(Path(__file__).resolve().parents[2] / "src")
STEPS = 8


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("multi-demo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "moe_lora_plugins.demo.multi", "--adapters", "2", "--steps",
                           str(STEPS), "--workdir", str(workdir), "--json"],
                          capture_output=True, text=True, env=env, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert len(lines) == 1, proc.stdout[-3000:]
    return json.loads(lines[0])


def test_two_adapters_of_different_ranks_on_two_tasks_in_an_ep2_pp2_trainer(summary):
    assert summary["layout"] == {"ep": 2, "pp": 2}
    adapters = summary["adapters"]
    assert [(a["rank"], a["task"]) for a in adapters] == [(4, "copy"), (8, "reverse")]
    assert len({a["engine_id"] for a in adapters}) == 2


def test_every_sync_of_every_adapter_equals_vllms_own_load_of_its_peft_dir(summary):
    for adapter in summary["adapters"]:
        assert adapter["sync_checks"] == [True] * STEPS, adapter["name"]


def test_each_adapters_reward_improves_on_its_own_task(summary):
    for adapter in summary["adapters"]:
        rewards = adapter["rewards"]
        assert len(rewards) == STEPS
        assert adapter["improved"], f"{adapter['name']}: {rewards}"

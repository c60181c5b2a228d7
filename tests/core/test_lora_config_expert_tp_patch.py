"""The actor plugin lifts the expert-TP guardrail only where the fc1-split export patch is active."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import moe_lora_plugins, sys\n"
    "from moe_lora_plugins.plugins.lora_actor import expert_tp_fc1_split_fixed\n"
    "if sys.argv[1] == 'activate':\n"
    "    moe_lora_plugins.activate(role='trainer')\n"
    "print(expert_tp_fc1_split_fixed())\n"
)


def _probe(mode: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    environ.update(env, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("mode", "env", "expected"),
    [
        ("plain", {}, "False"),
        ("activate", {}, "True"),
        ("activate", {"MOELORA_DISABLED_PATCHES": "megatron_bridge.split_fused_fc1_lora_b"}, "False"),
    ],
    ids=["not-activated", "activated", "patch-disabled"],
)
def test_split_fix_is_reported_only_when_the_patch_is_applied_or_pending(mode, env, expected):
    assert _probe(mode, **env) == expected

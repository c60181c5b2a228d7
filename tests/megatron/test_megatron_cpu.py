"""Megatron-Bridge imports and builds on a CPU-only machine without Transformer Engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lora_plugins.testing.megatron_cpu import transformer_engine_installed

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.mark.skipif(transformer_engine_installed(), reason="Transformer Engine is installed here")
def test_bridge_imports_without_transformer_engine_and_leaves_no_stand_in_behind():
    code = (
        "import sys\n"
        "from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu\n"
        "prepare_megatron_cpu()\n"
        "import megatron.bridge.peft.lora_layers, megatron.bridge.peft.utils as peft_utils\n"
        "left = sorted(k for k in sys.modules if k.split('.')[0] == 'transformer_engine')\n"
        "print('stand-ins left:', left, 'HAVE_TE:', peft_utils.HAVE_TE)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stand-ins left: [] HAVE_TE: False" in out.stdout

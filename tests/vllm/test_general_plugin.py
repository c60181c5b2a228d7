"""vLLM's own plugin loader reaches our ``vllm.general_plugins`` entry point, honouring the switch.

The child runs with ``-S`` and the venv's site-packages on PYTHONPATH: packages import, but ``.pth``
files are not processed, so any activation seen comes from vLLM's loader and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest

CODE = """
import json
import vllm.plugins
vllm.plugins.load_general_plugins()
from moe_lora_plugins.activation import current
state = current()
print("RESULT " + json.dumps(None if state is None else state.role))
"""


def _run(switch: str | None) -> str | None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOELORA_", "VLLM_PLUGINS"))}
    env["PYTHONPATH"] = os.pathsep.join(
        [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    )
    if switch is not None:
        env["MOELORA_PLUGINS"] = switch
    proc = subprocess.run([sys.executable, "-S", "-c", CODE], env=env, capture_output=True, text=True, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("switch,expected", [("on", "vllm"), (None, None), ("off", None)])
def test_vllm_general_plugins_activate_us_only_with_the_switch_on(switch, expected):
    assert _run(switch) == expected

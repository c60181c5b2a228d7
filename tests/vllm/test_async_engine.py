"""The worker extension in a real multi-process vLLM engine: patches reach the spawned worker, the
swap runs with generation paused, and the OpenAI serving-models table serves the adapter by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .tiny_models import adapter_config, make_adapter, save_peft_dir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = os.path.join(os.path.dirname(__file__), "async_engine_swap.py")


@pytest.fixture(scope="module")
def observed(dense_model, tmp_path_factory):
    adapter_dir = save_peft_dir(str(tmp_path_factory.mktemp("async") / "adapter"), make_adapter(False, seed=51),
                                adapter_config(False))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, SCRIPT, dense_model.path, adapter_dir], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1])


def test_every_vllm_patch_is_applied_in_the_spawned_worker(observed):
    vllm_patches = {k: v for k, v in observed["patches"].items() if k.startswith("vllm.")}
    assert vllm_patches and all(status in ("applied", "pending") for status in vllm_patches.values()), vllm_patches
    assert observed["patches"]["vllm.tensor_lora_requests"] == "applied"


def test_the_swap_runs_while_generation_is_paused_and_generation_resumes(observed):
    assert observed["paused"] and observed["resumed"]
    assert observed["report"]["version"] == 3 and observed["status"]["policy"]["loaded"]


def test_the_adapter_is_served_by_name_from_the_openai_models_table(observed):
    assert "policy" in observed["listed"]
    assert observed["by_name"] == observed["reference"]
    assert observed["by_name"] != observed["base"]

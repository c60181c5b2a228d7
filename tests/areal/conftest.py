"""One vLLM CPU engine with the composed AReaL + moe-lora-plugins worker extension for the whole lane.

A second engine cannot start in a process that imported AReaL: AReaL imports flask, whose context
proxies vLLM's start-up scan trips over. So every module of the lane shares this one (session scope),
and each uses its own adapter names and LoRA ids.
"""

from __future__ import annotations

import pytest

from tests.vllm import conftest as helpers  # the vllm lane's helpers (engine start, sender processes)
from tests.vllm import tiny_models

EXTENSION = "moe_lora_plugins.integrations.areal.AReaLMoeLoraWorkerExtension"


@pytest.fixture(scope="session")
def areal_engine(tmp_path_factory):
    model = tiny_models.build_tiny_model(str(tmp_path_factory.mktemp("dense-qwen3")), moe=False)
    llm = helpers.start_engine(model, max_loras=4, worker_extension_cls=EXTENSION)
    yield llm, model
    helpers.stop_engine(llm)

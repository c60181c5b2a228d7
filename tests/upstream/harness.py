"""pytest plugin loaded by compare.py (``-p harness``) into both runs of upstream's own unit tests.

What it sets up is the same in the run without the suite and the run with it, so it cannot make an
outcome differ; it only lets upstream's tests import and tear down on this CPU machine.

Megatron-Bridge 0.6 imports Transformer Engine unconditionally, so the CPU stand-in of
moe_lora_plugins.testing.megatron_cpu is installed when pytest loads this plugin: before upstream's
conftest or any test module imports Megatron-Bridge.

vLLM's ``tests/lora`` is run without vLLM's top-level ``tests/conftest.py`` (it needs packages and
test helpers the vllm lane does not install), so this plugin provides the one fixture of it the LoRA
tests use, ``default_vllm_config`` (a default ``VllmConfig`` made current for the test). vLLM's LoRA
conftest tears every test down with ``cleanup_dist_env_and_memory(shutdown_ray=True)``, which imports
Ray; the vllm lane does not install Ray, and no test here starts it, so where Ray is absent the
teardown runs with ``shutdown_ray=False`` (everything else it does is unchanged).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest

if importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.bridge") is not None:
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()


def _teardown_without_ray() -> None:
    import vllm.distributed
    import vllm.distributed.parallel_state as parallel_state

    upstream_cleanup = parallel_state.cleanup_dist_env_and_memory

    def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
        upstream_cleanup(shutdown_ray=False)

    parallel_state.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory
    vllm.distributed.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory


if importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("ray") is None:
    _teardown_without_ray()


@pytest.fixture
def default_vllm_config() -> Iterator[Any]:
    """A default ``VllmConfig``, current for the test (what vLLM's top-level conftest gives its tests)."""
    from vllm.config import VllmConfig, set_current_vllm_config

    config = VllmConfig()
    with set_current_vllm_config(config):
        yield config

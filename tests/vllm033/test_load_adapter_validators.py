"""The tensor-request path (patches/vllm/tensor_lora.py) runs every validator that the installed vLLM's
own `LRUCacheWorkerLoRAManager._load_adapter` runs on a freshly built adapter, so an in-memory adapter
passes exactly the checks a PEFT directory passes. Read from the installed source with ast; runs in the
vllm lane (0.32: modules_to_save + token classification) and the vllm033 lane (0.33: classification head)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

pytestmark = pytest.mark.needs_any_vllm

worker_manager = pytest.importorskip("vllm.lora.worker_manager")


def _validators_called_by_upstream_load_adapter() -> set[str]:
    source = textwrap.dedent(inspect.getsource(worker_manager.LRUCacheWorkerLoRAManager._load_adapter))
    called = set()
    for node in ast.walk(ast.parse(source)):
        is_method_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        if is_method_call and node.func.attr.startswith("_validate_"):
            called.add(node.func.attr)
    return called


def test_upstream_load_adapter_runs_validators():
    assert _validators_called_by_upstream_load_adapter(), "no _validate_* call found in _load_adapter"


def test_the_tensor_path_runs_every_validator_upstream_runs():
    from moe_lora_plugins.patches.vllm.tensor_lora import adapter_validators

    missing = _validators_called_by_upstream_load_adapter() - set(adapter_validators())
    assert not missing, f"vLLM's _load_adapter runs {sorted(missing)}, which the tensor path does not"


def test_every_validator_upstream_runs_exists_on_the_model_manager():
    from vllm.lora.model_manager import LoRAModelManager

    for name in _validators_called_by_upstream_load_adapter():
        assert callable(getattr(LoRAModelManager, name, None)), name

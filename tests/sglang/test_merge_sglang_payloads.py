"""Our full-weight payloads against the real sglang 0.5.23: its bucket reader, its safe deserializer,
its request dataclasses and the Engine method signatures.

``sglang.srt.entrypoints.engine`` and ``sglang.srt.managers.io_struct`` cannot be imported on a CPU-only
machine (they import torchvision, whose PyPI build needs CUDA torch libraries), so the Engine signatures
and request fields are read from the installed sources with ``ast``; the weight-sync modules are imported
for real.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from moe_lora_plugins.engines.payloads import (
    flattened_bucket,
    sglang_distributed_updates,
    sglang_init_group_kwargs,
    sglang_tensor_update_calls,
)

pytestmark = pytest.mark.sglang

_SGLANG = importlib.util.find_spec("sglang")  # None outside the sglang lane: tests/conftest.py skips these then
SRT = Path(_SGLANG.submodule_search_locations[0]) / "srt" if _SGLANG else Path("sglang-not-installed")


def _weights():
    return [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8)),
        ("model.layers.0.mlp.experts.3.down_proj.weight", torch.randn(4, 8).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(8).to(torch.bfloat16)),
    ]


def _class_node(path: Path, class_name: str) -> ast.ClassDef:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return node
    raise AssertionError(f"{class_name} not found in {path}")


def _signature(function: ast.FunctionDef) -> inspect.Signature:
    """The inspect.Signature an ``ast`` function definition declares (annotations left out)."""
    P = inspect.Parameter
    args = function.args
    positional = args.posonlyargs + args.args
    defaults = [P.empty] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [P(a.arg, P.POSITIONAL_OR_KEYWORD, default=None if d is not P.empty else P.empty)
              for a, d in zip(positional, defaults, strict=True)]
    if args.vararg:
        params.append(P(args.vararg.arg, P.VAR_POSITIONAL))
    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        params.append(P(a.arg, P.KEYWORD_ONLY, default=P.empty if d is None else None))
    if args.kwarg:
        params.append(P(args.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


def _engine_method(name: str) -> inspect.Signature:
    for node in _class_node(SRT / "entrypoints" / "engine.py", "Engine").body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return _signature(node)
    raise AssertionError(f"Engine.{name} not found")


def _request_fields(class_name: str) -> tuple[set[str], set[str]]:
    """(all fields, required fields) of a msgspec request struct in io_struct.py."""
    fields, required = set(), set()
    for node in _class_node(SRT / "managers" / "io_struct.py", class_name).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            fields.add(node.target.id)
            if node.value is None:
                required.add(node.target.id)
    return fields, required


def _fits(request: dict, class_name: str) -> None:
    fields, required = _request_fields(class_name)
    assert set(request) <= fields, f"{class_name} has no field(s) {set(request) - fields}"
    assert required <= set(request), f"{class_name} needs {required - set(request)}"


def test_sglangs_own_bucket_reader_reconstructs_our_flattened_bucket():
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    weights = _weights()
    bucket = flattened_bucket(weights, FlattenedTensorMetadata)
    reader = FlattenedTensorBucket(flattened_tensor=bucket["flattened_tensor"], metadata=bucket["metadata"])
    for (name, tensor), (got_name, got) in zip(weights, reader.reconstruct_tensors(), strict=True):
        assert got_name == name and got.dtype == tensor.dtype and torch.equal(got, tensor)


def test_sglangs_safe_deserializer_accepts_a_bucket_with_its_metadata_class_and_refuses_ours():
    from sglang.srt.utils.common import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    calls = list(sglang_tensor_update_calls(_weights(), max_bytes=1 << 20, tp_size=2,
                                            serialize=MultiprocessingSerializer.serialize,
                                            metadata_type=FlattenedTensorMetadata))
    [call] = calls
    data = MultiprocessingSerializer.deserialize(call["named_tensors"][1])
    reader = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
    assert [n for n, _ in reader.reconstruct_tensors()] == [n for n, _ in _weights()]

    ours = MultiprocessingSerializer.serialize(flattened_bucket(_weights()))
    with pytest.raises(RuntimeError, match="Blocked unsafe global"):
        MultiprocessingSerializer.deserialize(ours)


def test_tensor_update_calls_bind_to_engine_update_weights_from_tensor_and_its_request():
    signature = _engine_method("update_weights_from_tensor")
    for call in sglang_tensor_update_calls(_weights(), max_bytes=200, tp_size=2):
        signature.bind(object(), **call)
        _fits({"serialized_named_tensors": [b""], "load_format": call["load_format"],
               "flush_cache": call["flush_cache"]}, "UpdateWeightsFromTensorReqInput")


def test_distributed_announcements_bind_to_engine_update_weights_from_distributed_and_its_request():
    signature = _engine_method("update_weights_from_distributed")
    for update in sglang_distributed_updates(_weights(), max_bytes=200):
        signature.bind(object(), **update.request)
        _fits(update.request, "UpdateWeightsFromDistributedReqInput")
        assert all(isinstance(getattr(torch, name), torch.dtype) for name in update.request["dtypes"])


def test_init_group_kwargs_bind_to_engine_init_weights_update_group_and_its_request():
    kwargs = sglang_init_group_kwargs("127.0.0.1", 29500, engine_world_size=2)
    _engine_method("init_weights_update_group").bind(object(), **kwargs)
    _fits(kwargs, "InitWeightsUpdateGroupReqInput")


def test_the_signature_reader_rejects_what_sglang_would_reject():
    with pytest.raises(TypeError):
        _engine_method("update_weights_from_tensor").bind(object(), tensors=[])


def test_the_pause_bracket_defaults_name_sglangs_pause_and_continue_endpoints():
    from moe_lora_plugins.engines.payloads import paused_generation

    defaults = inspect.signature(paused_generation.__wrapped__).parameters
    tree = ast.parse((SRT / "entrypoints" / "http_server.py").read_text())
    routes = {
        decorator.args[0].value
        for node in tree.body
        if isinstance(node, ast.AsyncFunctionDef)
        for decorator in node.decorator_list
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "post"
        and decorator.args and isinstance(decorator.args[0], ast.Constant)
    }
    assert f"/{defaults['pause'].default}" in routes
    assert f"/{defaults['resume'].default}" in routes

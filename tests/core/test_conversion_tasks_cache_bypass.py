"""The conversion-task caches never change a call they do not understand: a model that is not made of
torch modules (a test's stand-in, as Megatron-Bridge's own unit tests pass) goes to upstream every time.
Found by the upstream lane: Megatron-Bridge's test_build_adapter_conversion_tasks passes a Mock model."""

from __future__ import annotations

from unittest.mock import Mock

from moe_lora_plugins.patches.megatron_bridge import conversion_tasks_cache as cache


def _upstream_adapter_tasks(calls: list[int]):
    def build_adapter_conversion_tasks(megatron_model, exclude_adapter_base_prefixes=None):  # upstream's parameters
        calls.append(1)
        return {"decoder.layers.0.mlp.linear_fc1": [object()]}

    return build_adapter_conversion_tasks


def _upstream_tasks(calls: list[int]):
    def build_conversion_tasks(hf_pretrained, megatron_model, weight_dtype=None):
        calls.append(1)
        return [object()]

    return build_conversion_tasks


def test_a_model_that_is_not_modules_goes_to_upstream_on_every_call():
    calls: list[int] = []
    wrapped = _upstream_adapter_tasks(calls)
    bridge, model = object(), [Mock()]
    first = cache.build_adapter_conversion_tasks(wrapped, bridge, (model,), {})
    second = cache.build_adapter_conversion_tasks(wrapped, bridge, (model,), {})
    assert len(calls) == 2
    assert list(first) == list(second) == ["decoder.layers.0.mlp.linear_fc1"]
    assert first["decoder.layers.0.mlp.linear_fc1"][0] is not second["decoder.layers.0.mlp.linear_fc1"][0]

    plain_calls: list[int] = []
    plain = _upstream_tasks(plain_calls)
    cache.build_conversion_tasks(plain, bridge, (Mock(), model), {})
    cache.build_conversion_tasks(plain, bridge, (Mock(), model), {})
    assert len(plain_calls) == 2

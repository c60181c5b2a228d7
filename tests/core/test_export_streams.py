"""Weight streams leaving the trainer go through ``on_export_weights`` exactly once (hooks.streams)."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.hooks import hookimpl
from moe_lora_plugins.hooks.manager import get_plugin_manager, reset_plugin_manager
from moe_lora_plugins.hooks.streams import HookedStream, export_stream, inner_exports
from moe_lora_plugins.sync.sender import hooked_adapter_tensors, sync_pieces


class Negate:
    """Records (kind, name) and negates every tensor."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def on_export_weights(self, weights, context):
        for name, tensor, *rest in weights:
            self.seen.append((context.kind, name))
            yield (name, -tensor, *rest)


@pytest.fixture
def negate():
    reset_plugin_manager()
    plugin = Negate()
    get_plugin_manager().register(plugin, name="negate")
    yield plugin
    reset_plugin_manager()


def items():
    return [("model.layers.0.self_attn.q_proj.lora_A.weight", torch.ones(2, 3)),
            ("model.layers.1.self_attn.q_proj.lora_B.weight", torch.full((3, 2), 2.0), "megatron.name")]


def test_a_stream_is_chained_lazily_and_keeps_each_items_arity(negate):
    stream = export_stream(items(), "full")
    assert negate.seen == []  # nothing runs before iteration
    out = list(stream)
    assert [len(item) for item in out] == [2, 3] and out[1][2] == "megatron.name"
    assert torch.equal(out[0][1], -torch.ones(2, 3))
    assert negate.seen == [("full", items()[0][0]), ("full", items()[1][0])]


def test_a_hooked_stream_is_not_chained_a_second_time(negate):
    once = export_stream(items(), "adapter")
    assert isinstance(once, HookedStream)
    assert export_stream(once, "adapter") is once
    tensors = hooked_adapter_tensors(once)
    assert len(negate.seen) == 2
    assert torch.equal(tensors["base_model.model." + items()[0][0]], -torch.ones(2, 3))  # negated once, not twice


def test_exports_read_inside_another_stream_are_not_shown_to_plugins(negate):
    model = [torch.nn.Linear(1, 1)]
    with inner_exports(model):
        inner = list(export_stream(items(), "adapter", model=model))
    assert negate.seen == [] and torch.equal(inner[0][1], torch.ones(2, 3))
    list(export_stream(items(), "adapter", model=model))
    assert len(negate.seen) == 2  # the model left the inner section


def test_a_dict_handed_to_the_sync_sender_reaches_the_wire_transformed_under_its_own_names(negate):
    adapter = {"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": torch.ones(2, 4)}
    pieces = sync_pieces(hooked_adapter_tensors(adapter), compact=False)
    assert [p.name for p in pieces] == list(adapter)
    assert torch.equal(pieces[0].tensor, -torch.ones(2, 4))
    assert negate.seen == [("adapter", next(iter(adapter)))]

"""Adapter sync over a real gloo group: trainer senders and engine receivers in separate processes."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from moe_lora_plugins.sync.errors import IncompleteSyncError
from moe_lora_plugins.sync.sender import send_lora_adapter, sync_pieces, tensors_from_export
from moe_lora_plugins.sync.transport import new_sync_group, receive_adapter
from moe_lora_plugins.testing.distributed import free_port

from .sync_adapters import CONFIG, shared_expert_adapter


def adapter() -> dict[str, torch.Tensor]:
    return shared_expert_adapter(3)


def _sender(rank: int, port: int, world: int, receivers: list[int], die_early: bool) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    group = new_sync_group("127.0.0.1", port, rank, world, "gloo", timeout_s=30)
    stage = rank - len(receivers)
    if die_early:
        from moe_lora_plugins.sync.transport import BucketHeader, pack_bucket, send_bucket

        manifest, payload = pack_bucket(sync_pieces(adapter(), {stage})[:1])
        send_bucket(group, receivers, BucketHeader(5, 0, stage, False, 0, int(payload.numel())), manifest, payload)
        os._exit(0)
    send_lora_adapter(adapter(), group, receivers, sender=stage, version=5, layers={stage}, config=CONFIG,
                      bucket_bytes=700)


def _receiver(rank: int, port: int, world: int, senders: list[int], results: dict) -> None:
    group = new_sync_group("127.0.0.1", port, rank, world, "gloo", timeout_s=30)
    received = receive_adapter(group, senders, version=5)
    results[rank] = (received.tensors, received.wire_bytes, received.buckets, received.config)


@pytest.mark.parametrize("receivers", [1, 2], ids=["one-engine-worker", "two-engine-workers"])
def test_two_pipeline_stage_senders_deliver_the_adapter_to_every_receiver_with_the_true_bytes(receivers):
    ctx = mp.get_context("spawn")
    port, world = free_port(), receivers + 2
    receiver_ranks = list(range(receivers))
    senders = [ctx.Process(target=_sender, args=(r, port, world, receiver_ranks, False)) for r in (receivers, receivers + 1)]
    for process in senders:
        process.start()
    manager = ctx.Manager()
    results = manager.dict()
    others = [ctx.Process(target=_receiver, args=(r, port, world, [receivers, receivers + 1], results))
              for r in receiver_ranks[1:]]
    for process in others:
        process.start()
    _receiver(0, port, world, [receivers, receivers + 1], results)
    for process in senders + others:
        process.join(timeout=60)
        assert process.exitcode == 0
    expected = adapter()
    distinct = {id(t): t for t in expected.values()}
    true_bytes = sum(t.numel() * t.element_size() for t in distinct.values())
    for rank in receiver_ranks:
        tensors, wire_bytes, buckets, config = results[rank]
        assert tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[k], expected[k]) and tensors[k].dtype == expected[k].dtype for k in expected)
        assert wire_bytes == true_bytes < sum(t.numel() * t.element_size() for t in expected.values())
        assert buckets >= 3 and config == CONFIG


def test_a_sender_that_dies_before_its_end_marker_gives_an_incomplete_sync():
    ctx = mp.get_context("spawn")
    port = free_port()
    sender = ctx.Process(target=_sender, args=(1, port, 2, [0], True))
    sender.start()
    group = new_sync_group("127.0.0.1", port, 0, 2, "gloo", timeout_s=20)
    with pytest.raises(IncompleteSyncError, match=r"stopped before the end marker .*\(sender 0: 1 bucket\(s\)\)"):
        receive_adapter(group, [1], version=5)
    sender.join(timeout=30)


def test_export_streams_of_two_and_three_tuples_give_peft_names():
    a, b, c = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    stream = [
        ("model.layers.0.self_attn.q_proj.lora_A.default.weight", a, "decoder.layers.0.self_attention.linear_qkv"),
        ("model.layers.0.self_attn.q_proj.lora_B.weight", b),  # Megatron-Bridge's export_adapter_weights form
        ("base_model.model.model.layers.0.mlp.experts.1.up_proj.lora_A.weight", c),  # already PEFT-named
    ]
    assert tensors_from_export(stream) == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
        "base_model.model.model.layers.0.mlp.experts.1.up_proj.lora_A.weight": c,
    }


def _rogue_sender(port: int, values: list[int]) -> None:
    """Sends one raw header (bypassing the sender's own limit checks), then waits to be torn down."""
    group = new_sync_group("127.0.0.1", port, 1, 2, "gloo", timeout_s=20)
    group.send([torch.tensor(values, dtype=torch.int64)], 0, 0).wait()
    import time

    time.sleep(5)
    os._exit(0)


@pytest.mark.parametrize(
    "field,value",
    [("payload_nbytes", -1), ("manifest_nbytes", 2**50), ("manifest_nbytes", -7), ("payload_nbytes", 2**50)],
)
def test_a_header_announcing_an_impossible_size_is_refused_before_allocating_and_names_the_field(field, value):
    from moe_lora_plugins.sync.errors import AdapterSyncError
    from moe_lora_plugins.sync.protocol import HEADER_FIELDS, BucketHeader

    values = BucketHeader(5, 0, 0, False, 10, 10).to_list()
    values[HEADER_FIELDS.index(field)] = value
    ctx = mp.get_context("spawn")
    port = free_port()
    sender = ctx.Process(target=_rogue_sender, args=(port, values))
    sender.start()
    group = new_sync_group("127.0.0.1", port, 0, 2, "gloo", timeout_s=20)
    with pytest.raises(AdapterSyncError, match=rf"{field}={value} is outside 0\.\.") as info:
        receive_adapter(group, [1], version=5)
    assert not isinstance(info.value, IncompleteSyncError), "a bad size is a protocol error, not a dead sender"
    sender.kill()
    sender.join(timeout=30)

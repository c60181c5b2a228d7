"""Adapter sync through shared memory between two processes of one host (gloo carries only the control)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from moe_lora_plugins.sync.errors import AdapterSyncError
from moe_lora_plugins.sync.sender import send_lora_adapter
from moe_lora_plugins.sync.shm import SegmentRef, SharedPayloadReader, SharedPayloadWriter
from moe_lora_plugins.sync.transport import new_sync_group, receive_adapter
from moe_lora_plugins.testing.distributed import free_port

from .sync_adapters import CONFIG, shared_expert_adapter

SYNCS = 4

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")


def adapter(step: int) -> dict[str, torch.Tensor]:
    """The adapter of sync ``step``: its values differ from step to step."""
    return shared_expert_adapter(100 + step)


def _sender(port: int, segments_seen: dict) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    group = new_sync_group("127.0.0.1", port, 1, 2, "gloo", timeout_s=60)
    writer = SharedPayloadWriter()
    for step in range(SYNCS):
        send_lora_adapter(adapter(step), group, [0], sender=0, version=step, config=CONFIG, bucket_bytes=4096,
                          shared_memory=writer)
        segments_seen[step] = writer.segments
    group.barrier().wait()  # the receiver has checked everything before the segments go
    writer.close()


def test_syncs_through_shared_memory_arrive_bitwise_and_never_overwrite_a_held_adapter():
    ctx = mp.get_context("spawn")
    port = free_port()
    manager = ctx.Manager()
    segments_seen = manager.dict()
    sender = ctx.Process(target=_sender, args=(port, segments_seen))
    sender.start()
    group = new_sync_group("127.0.0.1", port, 0, 2, "gloo", timeout_s=60)
    reader = SharedPayloadReader()
    first = receive_adapter(group, [1], version=0, shared_memory=reader)  # held through every later sync
    latest = None
    for step in range(1, SYNCS):
        latest = None  # the engine drops the previous adapter: its segments may be reused
        latest = receive_adapter(group, [1], version=step, shared_memory=reader)
        expected = adapter(step)
        assert sorted(latest.tensors) == sorted(expected)
        assert all(torch.equal(latest.tensors[n], t) for n, t in expected.items()), step
    expected_first = adapter(0)
    assert all(torch.equal(first.tensors[n], t) for n, t in expected_first.items())
    buckets = first.buckets
    assert first.wire_bytes == latest.wire_bytes
    # the bytes were viewed in place: every tensor of one bucket shares one storage
    storages = {t.untyped_storage().data_ptr() for t in first.tensors.values()}
    assert len(storages) == buckets
    group.barrier().wait()
    sender.join(timeout=60)
    assert sender.exitcode == 0
    # the held first adapter's segments were never handed out again; released ones were reused
    assert segments_seen[SYNCS - 1] < buckets * SYNCS, dict(segments_seen)
    assert segments_seen[SYNCS - 1] >= buckets * 2


def test_a_segment_of_another_host_is_refused_with_the_fix():
    reader = SharedPayloadReader()
    ref = SegmentRef("/dev/shm/moelora-sync-nonexistent-0", 0, 1 << 21, 10)
    with pytest.raises(AdapterSyncError, match="another host"):
        reader.open(ref, writer_key="/dev/shm/moelora-sync-nonexistent")


def test_a_writer_refuses_to_reuse_a_segment_it_never_made():
    writer = SharedPayloadWriter()
    try:
        with pytest.raises(AdapterSyncError, match="never made"):
            writer.released([3])
    finally:
        writer.close()


def test_a_busy_segment_is_not_handed_out_and_a_released_one_is():
    writer = SharedPayloadWriter()
    try:
        ref_a, bytes_a = writer.acquire(1000)
        ref_b, _ = writer.acquire(1000)
        assert ref_a.segment != ref_b.segment
        bytes_a[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        reader = SharedPayloadReader()
        seen = reader.open(ref_a, writer.key)
        assert seen[:4].tolist() == [1, 2, 3, 4]  # the receiver sees the writer's bytes in place
        with pytest.raises(AdapterSyncError, match="arrived again"):
            reader.open(ref_a, writer.key)
        del seen
        released = reader.take_released(writer.key)
        assert released == [ref_a.segment]
        writer.released(released)
        ref_c, _ = writer.acquire(500)
        assert ref_c.segment == ref_a.segment
    finally:
        writer.close()
    assert not os.path.exists(ref_a.path)


def test_shared_memory_sync_has_one_receiver():
    from moe_lora_plugins.sync.transport import send_adapter

    with pytest.raises(ValueError, match="one receiver"):
        send_adapter([], group=None, receivers=[0, 1], sender=0, version=0, shared_memory=True)

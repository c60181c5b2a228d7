"""Receiver-side assembly of an adapter sync from buckets of several senders (no transport)."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.lora.wire import decode, encode
from moe_lora_plugins.sync.assembly import AdapterAssembler
from moe_lora_plugins.sync.errors import AdapterSyncError, IncompleteSyncError
from moe_lora_plugins.sync.protocol import AdapterPiece, BucketHeader, Manifest, ShardSpec, plan_buckets
from moe_lora_plugins.sync.transport import pack_bucket, pieces_from_wire

CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def feed(assembler: AdapterAssembler, sender: int, pieces: list[AdapterPiece], bucket_bytes: int = 64,
         version: int = 1, end: bool = True, config: dict | None = CONFIG) -> int:
    """Hand the assembler what ``send_adapter`` would put on the wire for one sender; returns bytes."""
    buckets = plan_buckets([p.nbytes for p in pieces], bucket_bytes)
    total = 0
    for seq, indices in enumerate(buckets):
        manifest, payload = pack_bucket([pieces[i] for i in indices])
        assembler.add_bucket(BucketHeader(version, seq, sender, False, 0, int(payload.numel())), manifest, payload)
        total += int(payload.numel())
    if end:
        summary = {"buckets": len(buckets), "payload_bytes": total, "config": config}
        assembler.add_bucket(BucketHeader(version, len(buckets), sender, True, 0, 0), Manifest([], summary),
                             torch.empty(0, dtype=torch.uint8))
    return total


def random_adapter(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.q_proj.lora_A.weight": torch.randn(4, 3 + i, generator=g).to(dtype) for i in range(n)}


def test_buckets_from_two_senders_assemble_to_the_exact_adapter():
    stage0, stage1 = random_adapter(3, seed=1, dtype=torch.bfloat16), random_adapter(2, seed=2)
    stage1 = {k.replace("layers.", "layers.1"): v for k, v in stage1.items()}
    assembler = AdapterAssembler(num_senders=2)
    sent = feed(assembler, 0, [AdapterPiece(k, v) for k, v in stage0.items()], bucket_bytes=40)
    sent += feed(assembler, 1, [AdapterPiece(k, v) for k, v in stage1.items()], bucket_bytes=40)
    received = assembler.finish()
    expected = {**stage0, **stage1}
    assert received.tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert received.tensors[name].dtype == tensor.dtype and torch.equal(received.tensors[name], tensor)
    assert received.wire_bytes == sent == sum(t.numel() * t.element_size() for t in expected.values())
    assert received.buckets >= 3 and received.config == CONFIG


def test_a_duplicated_bucket_is_refused():
    assembler = AdapterAssembler(1)
    manifest, payload = pack_bucket([AdapterPiece("w.lora_A.weight", torch.ones(2, 2))])
    header = BucketHeader(1, 0, 0, False, 0, int(payload.numel()))
    assembler.add_bucket(header, manifest, payload)
    with pytest.raises(AdapterSyncError, match="duplicated bucket from sender 0: sequence number 0, expected 1"):
        assembler.add_bucket(header, manifest, payload)


def test_a_missing_bucket_is_refused():
    assembler = AdapterAssembler(1)
    manifest, payload = pack_bucket([AdapterPiece("w.lora_A.weight", torch.ones(2, 2))])
    with pytest.raises(AdapterSyncError, match="out-of-order .* sequence number 2, expected 0"):
        assembler.add_bucket(BucketHeader(1, 2, 0, False, 0, int(payload.numel())), manifest, payload)


def test_a_sync_without_every_end_marker_is_incomplete():
    assembler = AdapterAssembler(2)
    feed(assembler, 0, [AdapterPiece("a.lora_A.weight", torch.ones(2))])
    feed(assembler, 1, [AdapterPiece("b.lora_A.weight", torch.ones(2))], end=False)
    with pytest.raises(IncompleteSyncError, match=r"end marker of sender\(s\) \[1\]"):
        assembler.finish()


def test_an_end_marker_announcing_other_totals_is_refused():
    assembler = AdapterAssembler(1)
    manifest, payload = pack_bucket([AdapterPiece("a.lora_A.weight", torch.ones(4))])
    assembler.add_bucket(BucketHeader(1, 0, 0, False, 0, int(payload.numel())), manifest, payload)
    with pytest.raises(AdapterSyncError, match="announces 2 bucket"):
        assembler.add_bucket(BucketHeader(1, 1, 0, True, 0, 0), Manifest([], {"buckets": 2, "payload_bytes": 16}),
                             torch.empty(0, dtype=torch.uint8))


def test_buckets_of_two_sync_versions_do_not_mix():
    assembler = AdapterAssembler(2)
    feed(assembler, 0, [AdapterPiece("a.lora_A.weight", torch.ones(2))], version=3)
    with pytest.raises(AdapterSyncError, match="sync version 4 into sync version 3"):
        feed(assembler, 1, [AdapterPiece("b.lora_A.weight", torch.ones(2))], version=4)


def test_a_tensor_sent_by_two_senders_is_refused():
    assembler = AdapterAssembler(2)
    feed(assembler, 0, [AdapterPiece("a.lora_A.weight", torch.ones(2))])
    with pytest.raises(AdapterSyncError, match="arrived twice"):
        feed(assembler, 1, [AdapterPiece("a.lora_A.weight", torch.ones(2))])


def test_senders_that_disagree_on_the_adapter_config_are_refused():
    assembler = AdapterAssembler(2)
    feed(assembler, 0, [AdapterPiece("a.lora_A.weight", torch.ones(2))])
    with pytest.raises(AdapterSyncError, match="disagree on the adapter config"):
        feed(assembler, 1, [AdapterPiece("b.lora_A.weight", torch.ones(2))], config={**CONFIG, "r": 8})


@pytest.mark.parametrize("dim", [0, 1])
def test_tensor_parallel_shards_from_several_senders_are_joined_in_shard_order(dim):
    whole = torch.randn(8, 12)
    parts = whole.chunk(4, dim=dim)
    assembler = AdapterAssembler(2)
    # Sender 0 holds shards 2 and 0, sender 1 shards 3 and 1: arrival order must not matter.
    feed(assembler, 0, [AdapterPiece("w.lora_B.weight", parts[i].contiguous(), ShardSpec(dim, i, 4)) for i in (2, 0)])
    feed(assembler, 1, [AdapterPiece("w.lora_B.weight", parts[i].contiguous(), ShardSpec(dim, i, 4)) for i in (3, 1)])
    assert torch.equal(assembler.finish().tensors["w.lora_B.weight"], whole)


def test_a_sharded_tensor_with_a_missing_shard_is_incomplete():
    assembler = AdapterAssembler(1)
    feed(assembler, 0, [AdapterPiece("w.lora_B.weight", torch.ones(2, 2), ShardSpec(0, 0, 2))])
    with pytest.raises(IncompleteSyncError, match=r"'w.lora_B.weight': \[1\]"):
        assembler.finish()


def test_the_compact_wire_form_travels_once_per_shared_tensor_and_expands_like_its_decoder():
    shared_a, shared_b = torch.randn(4, 16), torch.randn(8, 4)
    named = {}
    for expert in range(8):
        named[f"l.0.mlp.experts.{expert}.up_proj.lora_A.weight"] = shared_a
        named[f"l.0.mlp.experts.{expert}.up_proj.lora_B.weight"] = shared_b
    named["l.0.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 16)
    payload = encode(named)
    assembler = AdapterAssembler(1)
    sent = feed(assembler, 0, pieces_from_wire(payload), bucket_bytes=1 << 20)
    received = assembler.finish().tensors
    assert sent == payload.wire_bytes < payload.expanded_bytes
    reference = decode(payload)
    assert received.keys() == reference.keys()
    assert all(torch.equal(received[k], reference[k]) for k in reference)

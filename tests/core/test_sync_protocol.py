"""The adapter-sync wire form: bucket plan by bytes, bucket header, manifest and pieces."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_lora_plugins.sync.errors import AdapterSyncError
from moe_lora_plugins.sync.protocol import (
    AdapterPiece,
    BucketHeader,
    Manifest,
    ManifestEntry,
    ShardSpec,
    expand_names,
    plan_buckets,
)


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=40), st.integers(min_value=1, max_value=4096))
def test_bucket_plan_keeps_order_covers_every_item_and_respects_the_byte_limit(sizes, limit):
    buckets = plan_buckets(sizes, limit)
    assert [i for bucket in buckets for i in bucket] == list(range(len(sizes)))
    for bucket in buckets:
        assert bucket
        assert len(bucket) == 1 or sum(sizes[i] for i in bucket) <= limit


def test_bucket_plan_gives_an_oversized_item_a_bucket_of_its_own():
    assert plan_buckets([10, 100, 10, 10], 30) == [[0], [1], [2, 3]]


def test_bucket_plan_rejects_a_non_positive_limit():
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        plan_buckets([1], 0)


def test_bucket_header_round_trips():
    header = BucketHeader(version=7, seq=3, sender=1, is_end=True, manifest_nbytes=120, payload_nbytes=4096)
    assert BucketHeader.from_list(header.to_list()) == header


def test_a_header_that_is_not_ours_is_refused():
    with pytest.raises(AdapterSyncError, match="not ours"):
        BucketHeader.from_list([1, 1, 0, 0, 0, 0, 0, 0])


def test_a_header_of_another_protocol_version_is_refused():
    values = BucketHeader(1, 0, 0, False, 0, 0).to_list()
    values[1] = 99
    with pytest.raises(AdapterSyncError, match="protocol 99"):
        BucketHeader.from_list(values)


def test_manifest_round_trips_shards_experts_and_aliases():
    manifest = Manifest(
        [
            ManifestEntry("a.lora_A.weight", "bfloat16", (4, 8), 0, 64, ShardSpec(0, 1, 2)),
            ManifestEntry("l.mlp.experts.{expert}.up_proj.lora_A.weight", "float32", (4, 8), 64, 128,
                          experts=(0, 1, 2), aliases=("l.mlp.experts.{expert}.gate_proj.lora_A.weight",)),
        ],
        {"buckets": 1, "config": {"r": 4}},
    )
    decoded = Manifest.decode(manifest.encode())
    assert decoded.entries == manifest.entries and decoded.summary == manifest.summary
    assert b'"expert_ranges":[[0,3]]' in manifest.encode()  # experts travel as runs, not one number each


def test_a_manifest_decoded_again_is_equal_and_owns_its_summary():
    """Repeated manifests reuse the first parse; each decode still gets a summary of its own."""
    manifest = Manifest([ManifestEntry("l.mlp.experts.{expert}.up_proj.lora_A.weight", "float32", (4, 8), 0, 128,
                                       experts=(0, 1, 5, 6))], {"shm": {"segment": 0}})
    raw = manifest.encode()
    first, second = Manifest.decode(raw), Manifest.decode(bytearray(raw))
    assert first.entries == second.entries == manifest.entries
    assert first.entries[0].experts == (0, 1, 5, 6)
    first.summary["shm"]["segment"] = 9
    assert second.summary == {"shm": {"segment": 0}} and Manifest.decode(raw).summary == {"shm": {"segment": 0}}


def test_a_shared_expert_piece_expands_to_one_name_per_expert_for_each_of_its_names():
    names = expand_names(["x.experts.{expert}.up.lora_A.weight", "q.lora_A.weight"], [0, 2])
    assert names == ["x.experts.0.up.lora_A.weight", "x.experts.2.up.lora_A.weight", "q.lora_A.weight"]


def test_a_piece_with_the_expert_placeholder_needs_its_experts():
    with pytest.raises(ValueError, match="no experts"):
        AdapterPiece("m.experts.{expert}.up_proj.lora_A.weight", torch.zeros(2, 2))


def test_a_piece_listing_experts_needs_the_placeholder():
    with pytest.raises(ValueError, match="placeholder"):
        AdapterPiece("m.experts.0.up_proj.lora_A.weight", torch.zeros(2, 2), experts=(0, 1))


def test_piece_bytes_are_its_tensor_bytes():
    assert AdapterPiece("w", torch.zeros(3, 5, dtype=torch.bfloat16)).nbytes == 30


@pytest.mark.parametrize(
    "index,value,field",
    [
        (2, -1, "version"),
        (3, -3, "seq"),
        (4, -1, "sender"),
        (4, 1 << 20, "sender"),
        (5, 2, "is_end"),
        (6, -1, "manifest_nbytes"),
        (6, 2**50, "manifest_nbytes"),
        (7, -5, "payload_nbytes"),
        (7, 2**50, "payload_nbytes"),
    ],
)
def test_a_header_field_outside_the_protocols_limits_is_refused_by_name(index, value, field):
    values = BucketHeader(1, 0, 0, False, 10, 10).to_list()
    values[index] = value
    with pytest.raises(AdapterSyncError, match=rf"{field}={value} is outside"):
        BucketHeader.from_list(values)


def test_the_protocol_limits_hold_a_real_bucket():
    from moe_lora_plugins.sync.protocol import MAX_MANIFEST_BYTES, MAX_PAYLOAD_BYTES

    header = BucketHeader(3, 2, 1, False, MAX_MANIFEST_BYTES, MAX_PAYLOAD_BYTES)
    assert BucketHeader.from_list(header.to_list()) == header


GOOD_ENTRY = {"name": "a.lora_A.weight", "dtype": "float32", "shape": [4, 8], "offset": 0, "nbytes": 128}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"offset": -8}, "offset=-8 is outside"),
        ({"nbytes": -128}, "nbytes=-128 is outside"),
        ({"nbytes": 2**50}, "nbytes=1125899906842624 is outside"),
        ({"shape": [4, -8]}, r"shape\[1\]=-8 is outside"),
        ({"shape": "4x8"}, "shape='4x8' is not a list"),
        ({"shape": [1] * 9}, "is not a list of at most 8 sizes"),
        ({"shard": [0, 2, 2]}, "shard index=2 is outside 0..1"),
        ({"shard": [0, 0, 0]}, "shard count=0 is outside"),
        ({"shard": [2, 0, 2]}, "shard dim=2 is outside 0..1"),
        ({"shard": [0, 1]}, "is not \\[dim, index, count\\]"),
        ({"experts": [-1]}, r"experts\[0\]=-1 is outside"),
        ({"expert_ranges": [[0, 0]]}, r"expert_ranges\[0\] stop=0 is outside 1\.\."),
        ({"expert_ranges": [[-1, 4]]}, r"expert_ranges\[0\] start=-1 is outside"),
        ({"expert_ranges": [[0, 2**20]]}, r"expert_ranges\[0\] stop=1048576 is outside"),
        ({"expert_ranges": [[0, 4, 8]]}, r"expert_ranges\[0\]=\[0, 4, 8\] is not \[start, stop\]"),
        ({"expert_ranges": [[0, 60000], [0, 60000]]}, "more than MAX_EXPERTS"),
        ({"expert_ranges": [[0, 2]], "experts": [0, 1]}, "both experts and expert_ranges"),
        ({"name": 7}, "name=7 is not a tensor name"),
        ({"dtype": None}, "dtype=None is not a dtype name"),
        ({"aliases": [""]}, "aliases=\\[''\\] is not a list of tensor names"),
        ({"offset": "0"}, "offset='0' is not an integer"),
    ],
)
def test_a_manifest_entry_outside_the_protocols_limits_is_refused_by_field(change, message):
    import json

    raw = json.dumps({"entries": [{**GOOD_ENTRY, **change}], "summary": {}}).encode()
    with pytest.raises(AdapterSyncError, match=message):
        Manifest.decode(raw)


@pytest.mark.parametrize("raw", [b"[]", b'{"entries": {}}', b'{"entries": [], "summary": []}', b'{"entries": [3]}'])
def test_a_manifest_of_the_wrong_shape_is_a_sync_error_not_a_crash(raw):
    with pytest.raises(AdapterSyncError):
        Manifest.decode(raw)


def test_the_garbage_collector_is_paused_inside_a_sync_block_and_restored_after():
    import gc

    from moe_lora_plugins.sync.protocol import paused_gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block does not switch it back on
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("a failed sync")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a host that runs without the collector keeps it off
    finally:
        gc.enable()

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

"""Full-weight payloads: byte-bounded chunks, flattened buckets, distributed announcements, pause/resume."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.engines.payloads import (
    PayloadError,
    chunk_by_bytes,
    flattened_bucket,
    paused_generation,
    sglang_distributed_updates,
    sglang_init_group_kwargs,
    sglang_tensor_update_calls,
    unflatten_bucket,
)


def _weights():
    return [
        ("model.embed_tokens.weight", torch.randn(16, 8)),  # 512 B
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8).to(torch.bfloat16)),  # 128 B
        ("model.layers.0.mlp.experts.1.down_proj.weight", torch.randn(4, 8)),  # 128 B
        ("model.norm.weight", torch.randn(8).to(torch.bfloat16)),  # 16 B
    ]


def test_chunks_never_exceed_the_byte_budget_and_keep_the_order():
    chunks = list(chunk_by_bytes(_weights(), max_bytes=256))
    assert [[n for n, _ in c] for c in chunks] == [
        ["model.embed_tokens.weight"],
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.1.down_proj.weight"],
        ["model.norm.weight"],
    ]
    assert all(sum(t.numel() * t.element_size() for _, t in c) <= 256 for c in chunks[1:])


def test_a_tensor_larger_than_the_budget_travels_alone():
    chunks = list(chunk_by_bytes(_weights(), max_bytes=100))
    assert [len(c) for c in chunks] == [1, 1, 1, 1]


def test_three_tuples_become_name_tensor_pairs():
    triples = [(n, t, f"megatron.{n}") for n, t in _weights()]
    assert all(len(item) == 2 for chunk in chunk_by_bytes(triples, 1 << 20) for item in chunk)


def test_chunk_size_must_be_positive():
    with pytest.raises(PayloadError, match="max_bytes=0"):
        list(chunk_by_bytes(_weights(), 0))


def test_flattened_bucket_round_trips_mixed_dtypes_bit_for_bit():
    weights = _weights()
    bucket = flattened_bucket(weights)
    assert bucket["flattened_tensor"].dtype == torch.uint8
    assert bucket["flattened_tensor"].numel() == 512 + 128 + 128 + 16
    for (name, tensor), (got_name, got) in zip(weights, unflatten_bucket(bucket), strict=True):
        assert got_name == name and got.dtype == tensor.dtype and torch.equal(got, tensor)


def test_a_misaligned_offset_is_refused():
    with pytest.raises(PayloadError, match="byte offset 2 is not aligned"):
        flattened_bucket([("a", torch.zeros(1, dtype=torch.bfloat16)), ("b", torch.zeros(1))])


def test_tensor_update_calls_carry_one_bucket_per_tp_rank_and_flush_only_at_the_end():
    calls = list(sglang_tensor_update_calls(_weights(), max_bytes=256, tp_size=2))
    assert len(calls) == 3
    assert [c["flush_cache"] for c in calls] == [False, False, True]
    assert all(c["load_format"] == "flattened_bucket" and len(c["named_tensors"]) == 2 for c in calls)
    names = [n for c in calls for n, _ in unflatten_bucket(c["named_tensors"][0])]
    assert names == [n for n, _ in _weights()]


def test_distributed_updates_announce_names_dtypes_shapes_then_the_tensors():
    updates = list(sglang_distributed_updates(_weights(), max_bytes=700))
    assert [u.request["flush_cache"] for u in updates] == [False, True]
    first = updates[0]
    assert first.request["names"] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert first.request["dtypes"] == ["float32", "bfloat16"]
    assert first.request["shapes"] == [[16, 8], [8, 8]]
    assert [t.shape for t in first.tensors] == [torch.Size([16, 8]), torch.Size([8, 8])]


def test_init_group_puts_the_trainer_at_rank_0_and_the_engine_after_it():
    kwargs = sglang_init_group_kwargs("10.0.0.1", 29500, engine_world_size=4)
    assert kwargs["rank_offset"] == 1 and kwargs["world_size"] == 5
    with pytest.raises(PayloadError, match="master_port must be a TCP port"):
        sglang_init_group_kwargs("10.0.0.1", 0, 4)


class _RecordingEngine:
    def __init__(self, fail_resume: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_resume = fail_resume

    def pause_generation(self) -> None:
        self.calls.append("pause")

    def continue_generation(self) -> None:
        self.calls.append("resume")
        if self.fail_resume:
            raise RuntimeError("engine gone")


def test_generation_is_paused_during_the_sync_and_resumed_after():
    engine = _RecordingEngine()
    with paused_generation(engine):
        engine.calls.append("update")
    assert engine.calls == ["pause", "update", "resume"]


def test_generation_is_resumed_when_the_sync_fails_and_the_sync_error_propagates():
    engine = _RecordingEngine()
    with pytest.raises(ValueError, match="bad chunk"), paused_generation(engine):
        raise ValueError("bad chunk")
    assert engine.calls == ["pause", "resume"]


def test_a_failing_resume_after_a_failing_sync_keeps_the_sync_error():
    engine = _RecordingEngine(fail_resume=True)
    with pytest.raises(ValueError, match="bad chunk"), paused_generation(engine):
        raise ValueError("bad chunk")

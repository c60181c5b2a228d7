"""Per-bucket staging: pieces packed into one payload and received back as views of one host buffer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lora_plugins.sync.assembly import AdapterAssembler
from moe_lora_plugins.sync.errors import AdapterSyncError
from moe_lora_plugins.sync.protocol import AdapterPiece, BucketHeader, Manifest, ManifestEntry, plan_buckets
from moe_lora_plugins.sync.staging import bucket_layout, tensor_from_payload
from moe_lora_plugins.sync.transport import pack_bucket

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.bool,
          torch.int32, torch.int64]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -100), min(info.max, 100), shape, generator=g, dtype=dtype)


def receive_one_bucket(pieces: list[AdapterPiece]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    manifest, payload = pack_bucket(pieces)
    assembler = AdapterAssembler(1)
    assembler.add_bucket(BucketHeader(1, 0, 0, False, 0, int(payload.numel())), manifest, payload)
    assembler.add_bucket(BucketHeader(1, 1, 0, True, 0, 0),
                         Manifest([], {"buckets": 1, "payload_bytes": int(payload.numel())}),
                         torch.empty(0, dtype=torch.uint8))
    return assembler.finish().tensors, payload


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=8))
def test_a_bucket_of_mixed_dtypes_and_odd_shapes_round_trips_bitwise_with_every_offset_aligned(specs):
    pieces = [AdapterPiece(f"t{i}.lora_A.weight", sample(dtype, tuple(shape), i)) for i, (dtype, shape) in enumerate(specs)]
    entries, nbytes = bucket_layout(pieces)
    for piece, entry in zip(pieces, entries, strict=True):
        assert entry.offset % piece.tensor.element_size() == 0
    assert nbytes < sum(p.nbytes for p in pieces) + 8 * len(pieces)
    received, _ = receive_one_bucket(pieces)
    for piece in pieces:
        got = received[piece.name]
        assert got.dtype == piece.tensor.dtype and got.shape == piece.tensor.shape
        assert torch.equal(got, piece.tensor)


def test_a_single_dtype_bucket_has_no_padding_so_wire_bytes_are_tensor_bytes():
    pieces = [AdapterPiece(f"t{i}.lora_A.weight", sample(torch.bfloat16, (3, 2 * i + 1), i)) for i in range(5)]
    manifest, payload = pack_bucket(pieces)
    assert int(payload.numel()) == sum(p.nbytes for p in pieces)
    assert [e.offset for e in manifest.entries] == [0, 6, 24, 54, 96]


def test_padding_between_dtypes_is_zero_and_only_as_long_as_the_alignment_needs():
    odd = AdapterPiece("odd.lora_A.weight", torch.full((3,), 7, dtype=torch.uint8))
    wide = AdapterPiece("wide.lora_A.weight", torch.tensor([1.5, -2.0], dtype=torch.float64))
    manifest, payload = pack_bucket([odd, wide])
    assert [e.offset for e in manifest.entries] == [0, 8]
    assert payload[3:8].tolist() == [0] * 5 and int(payload.numel()) == 24


def test_received_tensors_are_views_of_the_one_host_payload_not_copies_of_it():
    pieces = [AdapterPiece(f"t{i}.lora_A.weight", sample(torch.float32, (4, 4), i)) for i in range(3)]
    received, payload = receive_one_bucket(pieces)
    base = payload.untyped_storage().data_ptr()
    for piece, entry in zip(pieces, bucket_layout(pieces)[0], strict=True):
        assert received[piece.name].untyped_storage().data_ptr() == base
        assert received[piece.name].data_ptr() == base + entry.offset


def test_a_packed_bucket_owns_its_bytes_so_later_changes_to_the_source_do_not_reach_the_receiver():
    source = torch.zeros(2, 3)
    received, _ = receive_one_bucket([AdapterPiece("w.lora_A.weight", source)])
    source += 1
    assert torch.equal(received["w.lora_A.weight"], torch.zeros(2, 3))


def test_a_non_contiguous_piece_travels_as_its_values():
    transposed = sample(torch.float32, (3, 5), 0).t()
    received, _ = receive_one_bucket([AdapterPiece("w.lora_B.weight", transposed)])
    assert torch.equal(received["w.lora_B.weight"], transposed)


def test_one_bucket_carries_many_tensors_and_a_tensor_over_the_limit_rides_alone():
    pieces = [AdapterPiece("small0.lora_A.weight", sample(torch.bfloat16, (4, 4), 0)),
              AdapterPiece("small1.lora_A.weight", sample(torch.bfloat16, (4, 4), 1)),
              AdapterPiece("big.lora_B.weight", sample(torch.float32, (64, 4), 2)),
              AdapterPiece("small2.lora_A.weight", sample(torch.bfloat16, (4, 4), 3))]
    buckets = plan_buckets([p.nbytes for p in pieces], bucket_bytes=128)
    assert buckets == [[0, 1], [2], [3]]
    assembler = AdapterAssembler(1)
    total = 0
    for seq, indices in enumerate(buckets):
        manifest, payload = pack_bucket([pieces[i] for i in indices])
        assembler.add_bucket(BucketHeader(1, seq, 0, False, 0, int(payload.numel())), manifest, payload)
        total += int(payload.numel())
    assembler.add_bucket(BucketHeader(1, len(buckets), 0, True, 0, 0),
                         Manifest([], {"buckets": len(buckets), "payload_bytes": total}), torch.empty(0, dtype=torch.uint8))
    received = assembler.finish().tensors
    assert all(torch.equal(received[p.name], p.tensor) for p in pieces)


def test_an_unaligned_offset_from_an_older_sender_is_received_by_copy():
    value = sample(torch.bfloat16, (2, 3), 0)
    payload = torch.cat([torch.tensor([9], dtype=torch.uint8), value.reshape(-1).view(torch.uint8)])
    entry = ManifestEntry("w.lora_A.weight", "bfloat16", (2, 3), 1, 12)
    got = tensor_from_payload(payload, entry, "sender 0 bucket 0")
    assert got.dtype == torch.bfloat16 and torch.equal(got, value)


def test_a_manifest_entry_whose_bytes_do_not_match_its_shape_is_refused_with_both_sizes():
    entry = ManifestEntry("w.lora_A.weight", "float32", (2, 3), 0, 20)
    with pytest.raises(AdapterSyncError, match=r"sender 0 bucket 4: 'w.lora_A.weight' announces 20 bytes, .* needs 24"):
        tensor_from_payload(torch.zeros(24, dtype=torch.uint8), entry, "sender 0 bucket 4")


def test_a_manifest_entry_reaching_past_the_payload_is_refused():
    entry = ManifestEntry("w.lora_A.weight", "float32", (2, 3), 8, 24)
    with pytest.raises(AdapterSyncError, match=r"claims bytes 8..32 of a 24-byte payload"):
        tensor_from_payload(torch.zeros(24, dtype=torch.uint8), entry, "sender 0 bucket 0")


def _mixed_pieces(count: int) -> list[AdapterPiece]:
    g = torch.Generator().manual_seed(1)
    dtypes = (torch.bfloat16, torch.float32, torch.int8, torch.float16)
    pieces = []
    for i in range(count):
        values = torch.randn(3 + i % 5, 7 + i % 11, generator=g) * 50
        pieces.append(AdapterPiece(f"p{i}", values.to(dtypes[i % len(dtypes)])))
    return pieces


@pytest.mark.parametrize("threads", [2, 3, 4, 7])
def test_a_bucket_filled_by_several_threads_is_byte_for_byte_the_single_thread_fill(monkeypatch, threads):
    from moe_lora_plugins.sync import staging

    pieces = _mixed_pieces(61)
    entries, nbytes = bucket_layout(pieces)
    monkeypatch.setattr(staging, "PARALLEL_FILL_BYTES", 0)  # this small bucket takes the threaded path too
    monkeypatch.setenv("MOELORA_SYNC_FILL_THREADS", "1")
    single = staging.fill_host_payload(pieces, entries, torch.full((nbytes,), 0xAB, dtype=torch.uint8)).clone()
    monkeypatch.setenv("MOELORA_SYNC_FILL_THREADS", str(threads))
    calls = []
    real = staging._copy_spans
    monkeypatch.setattr(staging, "_copy_spans", lambda target, spans: (calls.append(len(spans)), real(target, spans)))
    threaded = staging.fill_host_payload(pieces, entries, torch.full((nbytes,), 0xCD, dtype=torch.uint8))
    assert len(calls) == min(threads, 61 * 2) and sum(calls) >= 61  # it really ran in runs
    assert torch.equal(single, threaded)  # padding zeroed by whichever thread owns it, every piece in place
    for piece, entry in zip(pieces, entries, strict=True):
        assert torch.equal(tensor_from_payload(threaded, entry, "bucket 0"), piece.tensor)


def test_split_runs_keeps_order_covers_every_span_once_and_balances_bytes():
    from moe_lora_plugins.sync.staging import _split_runs

    spans = [(i * 10, i * 10 + 10, i) for i in range(40)]
    runs = _split_runs(spans, 4)
    assert [s for run in runs for s in run] == spans
    assert [sum(s[1] - s[0] for s in run) for run in runs] == [100, 100, 100, 100]
    assert _split_runs(spans[:1], 4) == [spans[:1]]


@pytest.mark.parametrize("value", ["0", "-2", "four"])
def test_a_bad_fill_thread_count_is_refused_naming_the_value_and_the_fix(monkeypatch, value):
    from moe_lora_plugins.sync.staging import fill_threads

    monkeypatch.setenv("MOELORA_SYNC_FILL_THREADS", value)
    from moe_lora_plugins.errors import SettingsError

    with pytest.raises(SettingsError, match=rf"MOELORA_SYNC_FILL_THREADS='{value}' is not a whole number >= 1\. Set it to 1"):
        fill_threads()

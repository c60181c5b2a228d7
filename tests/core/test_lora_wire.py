"""The compact wire form: each distinct tensor travels once, the receiver gets the full name -> tensor dict."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.lora.convert import distinct_nbytes, megatron_to_peft
from moe_lora_plugins.lora.families import ModelDims
from moe_lora_plugins.lora.wire import WireFormatError, WireManifest, WirePayload, decode, decode_many, encode

E, H, INTER, R = 8, 16, 6, 4
DIMS = ModelDims(4, 2, 4, E)


def shared_expert_megatron(layers: int = 2) -> dict[str, torch.Tensor]:
    """Megatron tensors of a grouped-expert model whose expert adapters are shared by all experts (2-D)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(layers):
        p = f"decoder.layers.{layer}"
        out[f"{p}.self_attention.linear_qkv.adapter.linear_in.weight"] = torch.randn(R, H, generator=g)
        out[f"{p}.self_attention.linear_qkv.adapter.linear_out.weight"] = torch.randn(32, R, generator=g)
        out[f"{p}.mlp.experts.linear_fc1.adapter.linear_in.weight"] = torch.randn(R, H, generator=g)
        out[f"{p}.mlp.experts.linear_fc1.adapter.linear_out.weight"] = torch.randn(2 * INTER, R, generator=g)
        out[f"{p}.mlp.experts.linear_fc2.adapter.linear_in.weight"] = torch.randn(R, INTER, generator=g)
        out[f"{p}.mlp.experts.linear_fc2.adapter.linear_out.weight"] = torch.randn(H, R, generator=g)
    return out


def test_wire_bytes_equal_the_true_adapter_bytes_for_shared_expert_adapters():
    megatron = shared_expert_megatron()
    adapter = megatron_to_peft(megatron, "qwen3_moe", DIMS, alpha=8)
    payload = encode(adapter.tensors)
    true_bytes = distinct_nbytes(megatron.values())
    assert payload.wire_bytes == true_bytes
    assert payload.expanded_bytes > E * true_bytes // 2  # the naive form is ~E-fold


def test_decode_gives_back_every_name_bitwise():
    adapter = megatron_to_peft(shared_expert_megatron(), "qwen3_moe", DIMS, alpha=8)
    got = decode(encode(adapter.tensors))
    assert sorted(got) == sorted(adapter.tensors)
    assert all(torch.equal(got[n], adapter.tensors[n]) for n in got)


def test_receiver_expansion_shares_one_tensor_object():
    adapter = megatron_to_peft(shared_expert_megatron(), "qwen3_moe", DIMS, alpha=8)
    got = decode(encode(adapter.tensors))
    p = "base_model.model.model.layers.0.mlp.experts"
    assert got[f"{p}.0.down_proj.lora_B.weight"] is got[f"{p}.{E - 1}.down_proj.lora_B.weight"]


def test_manifest_travels_as_a_uint8_tensor_and_stays_compact():
    payload = encode(
        megatron_to_peft(shared_expert_megatron(), "qwen3_moe", DIMS, alpha=8).tensors, meta={"step": 3}
    )
    blob = payload.manifest.to_tensor()
    assert blob.dtype == torch.uint8
    manifest = WireManifest.from_tensor(blob)
    assert manifest == payload.manifest and manifest.meta == {"step": 3}
    assert len(manifest.entries) == len(payload.tensors)
    assert any("{expert}" in name for e in manifest.entries for name in e.names)


def test_content_dedupe_merges_equal_copies_read_from_disk():
    adapter = megatron_to_peft(shared_expert_megatron(), "qwen3_moe", DIMS, alpha=8)
    copies = {n: t.clone() for n, t in adapter.tensors.items()}
    assert encode(copies).wire_bytes == encode(copies, dedupe="identity").expanded_bytes
    assert encode(copies, dedupe="content").wire_bytes == encode(adapter.tensors).wire_bytes


def test_per_expert_adapters_are_not_merged():
    a = {f"m.experts.{e}.down_proj.lora_A.weight": torch.full((2, 2), float(e)) for e in range(3)}
    payload = encode(a, dedupe="content")
    assert len(payload.tensors) == 3 and decode(payload).keys() == a.keys()


def test_missing_tensor_is_named():
    payload = encode({"x.lora_A.weight": torch.zeros(2), "y.lora_A.weight": torch.ones(2)})
    del payload.tensors["y.lora_A.weight"]
    with pytest.raises(WireFormatError, match=r"missing tensors \['y.lora_A.weight'\]"):
        decode(payload)


def test_wrong_dtype_is_named():
    payload = encode({"x.lora_A.weight": torch.zeros(2)})
    bad = WirePayload(payload.manifest, {"x.lora_A.weight": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(
        WireFormatError, match="x.lora_A.weight: got \\(2,\\) bfloat16, manifest says \\(2,\\) float32"
    ):
        decode(bad)


def test_name_arriving_from_two_senders_is_an_error():
    first = encode({"x.lora_A.weight": torch.zeros(2)})
    second = encode({"x.lora_A.weight": torch.ones(2)})
    with pytest.raises(WireFormatError, match="more than one payload"):
        decode_many([first, second])


def test_payloads_from_several_stages_decode_together():
    stage0 = encode({"a.lora_A.weight": torch.zeros(2)})
    stage1 = encode({"b.lora_A.weight": torch.ones(2)})
    assert sorted(decode_many([stage0, stage1])) == ["a.lora_A.weight", "b.lora_A.weight"]


def test_other_manifest_version_is_refused():
    with pytest.raises(WireFormatError, match="version 99"):
        WireManifest.from_json('{"version": 99, "entries": []}')


def test_a_repeated_encode_follows_a_changed_sharing_under_the_same_names():
    """The grouping by object is remembered per (names, object ids): the same names bound to a new sharing
    (per-expert copies instead of one shared tensor, and back) must encode that new sharing each time."""
    shared = torch.randn(R, H)
    names = [f"base_model.model.model.layers.0.mlp.experts.{e}.up_proj.lora_A.weight" for e in range(E)]
    one = dict.fromkeys(names, shared)
    apart = {n: shared.clone() + i for i, n in enumerate(names)}
    for tensors, distinct in ((one, 1), (apart, E), (one, 1), (apart, E)):
        payload = encode(tensors)
        assert len(payload.manifest.entries) == distinct
        got = decode(payload)
        assert all(torch.equal(got[n], tensors[n]) for n in names)

"""The export audit names every gap, duplicate and wrong shape, and passes a complete export."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.audit import ExportAudit, ExportAuditError, audited


def _stream(layers=2, experts=4, skip=(), dup=(), bad_shape=()):
    for layer in range(layers):
        yield f"model.layers.{layer}.self_attn.q_proj.weight", torch.zeros(8, 8)
        for expert in range(experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{expert}.{proj}.lora_A.weight"
                if name in skip:
                    continue
                shape = (3, 8) if name in bad_shape else (2, 8)
                yield name, torch.zeros(shape)
                if name in dup:
                    yield name, torch.zeros(shape)
    yield "model.norm.weight", torch.zeros(8)


def test_a_complete_export_passes_and_is_counted():
    audit = ExportAudit("adapter", num_layers=2, num_experts=4)
    items = list(audited(_stream(), audit))
    assert len(items) == audit.report.tensors == 2 * (1 + 12) + 1
    assert audit.report.experts == {0, 1, 2, 3} and audit.report.layers == {0, 1}


def test_a_missing_expert_is_named():
    missing = "model.layers.1.mlp.experts.3.up_proj.lora_A.weight"
    with pytest.raises(ExportAuditError, match=r"missing experts: model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        list(audited(_stream(skip={missing}), ExportAudit("adapter", num_layers=2, num_experts=4)))


def test_experts_of_one_ep_rank_only_are_reported_as_gaps():
    # What unpatched Megatron-Bridge 0.6.2 emits under EP=2: experts 0..1 of 4.
    with pytest.raises(ExportAuditError, match=r"missing experts: .*experts\.2\..*\(12 in all\)"):
        list(audited(_stream(experts=2), ExportAudit("adapter", num_layers=2, num_experts=4)))


def test_a_duplicate_is_named():
    dup = "model.layers.0.mlp.experts.1.down_proj.lora_A.weight"
    with pytest.raises(ExportAuditError, match=r"emitted more than once: model\.layers\.0\.mlp\.experts\.1\.down_proj"):
        list(audited(_stream(dup={dup}), ExportAudit("adapter", num_layers=2, num_experts=4)))


def test_an_expert_with_another_shape_than_its_group_is_named():
    bad = "model.layers.0.mlp.experts.2.gate_proj.lora_A.weight"
    with pytest.raises(ExportAuditError, match=r"wrong shapes: .*experts\.2\.gate_proj\.lora_A\.weight \(3, 8\)"):
        list(audited(_stream(bad_shape={bad}), ExportAudit("adapter", num_layers=2, num_experts=4)))


def test_a_missing_layer_is_named():
    with pytest.raises(ExportAuditError, match=r"missing layers: \[2\] of 0\.\.2"):
        list(audited(_stream(layers=2), ExportAudit("plain", num_layers=3, num_experts=4)))


def test_an_explicit_expected_shape_is_enforced():
    audit = ExportAudit("plain", expected_shapes={"model.norm.weight": (16,)})
    with pytest.raises(ExportAuditError, match=r"model\.norm\.weight \(8,\) \(expected \(16,\)\)"):
        list(audited(_stream(), audit))


def test_three_tuples_pass_through_unchanged():
    items = [(name, tensor, f"megatron:{name}") for name, tensor in _stream()]
    assert list(audited(items, ExportAudit("plain", num_layers=2, num_experts=4))) == items

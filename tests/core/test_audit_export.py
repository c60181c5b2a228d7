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


# ---- exports the audit does not fully understand: checked where it can, never broken --------------


class _TensorLike:
    """A tensor stand-in with a shape and no torch methods (as numpy arrays and some wrappers are)."""

    def __init__(self, *shape: int) -> None:
        self.shape = tuple(shape)
        self.nbytes = 4 * (shape[0] if shape else 1)


def test_tensor_likes_pass_and_their_shapes_are_still_checked():
    items = [
        ("model.layers.0.mlp.experts.0.up_proj.lora_A.weight", _TensorLike(2, 8)),
        ("model.layers.0.mlp.experts.1.up_proj.lora_A.weight", _TensorLike(3, 8)),
    ]
    with pytest.raises(ExportAuditError, match=r"wrong shapes: .*experts\.\d\.up_proj"):
        list(audited(items, ExportAudit("adapter", num_layers=1, num_experts=2)))


def test_items_without_a_readable_shape_pass_through_and_are_reported_skipped():
    from unittest.mock import MagicMock

    items = [("model.layers.0.self_attn.q_proj.weight", MagicMock()), ("model.norm.weight", object())]
    audit = ExportAudit("plain", num_layers=1)
    assert list(audited(items, audit)) == items
    assert audit.report.tensors == 2
    assert any("MagicMock" in reason for reason in audit.report.skipped)
    assert any("object" in reason for reason in audit.report.skipped)


def test_a_mock_or_missing_expert_count_leaves_the_range_unchecked_and_says_so():
    from unittest.mock import MagicMock

    config = MagicMock()
    audit = ExportAudit("adapter", num_layers=config.num_layers, num_experts=config.num_moe_experts)
    items = list(_stream(layers=2, experts=3))
    assert list(audited(items, audit)) == items
    reasons = sorted(audit.report.skipped)
    assert len(reasons) == 2
    assert reasons[0].startswith("expert range not checked: the model config gives MagicMock")
    assert reasons[1].startswith("layer range not checked: the model config gives MagicMock")
    assert all(reason.endswith("not a positive int") for reason in reasons)
    assert audit.num_experts is None and audit.num_layers is None


def test_an_unreadable_expert_count_still_catches_a_duplicate():
    dup = "model.layers.0.mlp.experts.1.down_proj.lora_A.weight"
    with pytest.raises(ExportAuditError, match="emitted more than once"):
        list(audited(_stream(dup={dup}), ExportAudit("adapter", num_layers="2", num_experts=[4])))


def test_numpy_integer_counts_are_used():
    numpy = pytest.importorskip("numpy")
    audit = ExportAudit("adapter", num_layers=numpy.int64(2), num_experts=numpy.int64(4))
    assert (audit.num_layers, audit.num_experts) == (2, 4) and not audit.report.skipped


def test_quantized_tensors_are_checked_like_any_tensor():
    quantized = torch.quantize_per_tensor(torch.zeros(2, 8), scale=0.1, zero_point=0, dtype=torch.qint8)
    items = [
        ("model.layers.0.mlp.experts.0.up_proj.weight", quantized),
        ("model.layers.0.mlp.experts.1.up_proj.weight", quantized),
    ]
    audit = ExportAudit("plain", num_layers=1, num_experts=2)
    assert list(audited(items, audit)) == items
    assert audit.report.nbytes == 2 * 16 and not audit.report.skipped


def test_a_tensor_subclass_reports_its_logical_shape_and_is_checked():
    class Wrapped(torch.Tensor):
        pass

    wrapped = torch.zeros(2, 8).as_subclass(Wrapped)
    with pytest.raises(ExportAuditError, match="missing experts"):
        list(audited([("model.layers.0.mlp.experts.0.up_proj.weight", wrapped)],
                     ExportAudit("plain", num_layers=1, num_experts=2)))


def test_items_that_are_not_name_tensor_pairs_pass_through_unchecked():
    items = ["just-a-name", 3, ("model.norm.weight", torch.zeros(8))]
    audit = ExportAudit("plain")
    assert list(audited(items, audit)) == items
    assert audit.report.tensors == 1
    assert sum(count for reason, count in audit.report.skipped.items() if "stream items" in reason) == 2


def test_what_was_skipped_is_said_in_one_log_line(caplog):
    from unittest.mock import MagicMock

    with caplog.at_level("WARNING", logger="moe_lora_plugins.audit"):
        list(audited([("model.norm.weight", MagicMock())], ExportAudit("plain", num_layers=MagicMock())))
    lines = [r.getMessage() for r in caplog.records if r.name == "moe_lora_plugins.audit"]
    assert len(lines) == 1 and "not checked" in lines[0] and "layer range" in lines[0]


def test_the_megatron_bridge_glue_audits_a_model_without_a_config():
    from moe_lora_plugins.patches.megatron_bridge._export_common import maybe_audited

    items = [("model.layers.0.self_attn.q_proj.weight", torch.zeros(2, 2))]
    assert list(maybe_audited(iter(items), "plain", object())) == items


def test_the_megatron_bridge_glue_reads_a_dense_config_without_moe_fields():
    from types import SimpleNamespace

    from moe_lora_plugins.patches.megatron_bridge._export_common import maybe_audited

    model = SimpleNamespace(config=SimpleNamespace(num_layers=1))
    items = [("model.layers.0.self_attn.q_proj.weight", torch.zeros(2, 2))]
    assert list(maybe_audited(iter(items), "plain", model)) == items
    with pytest.raises(ExportAuditError, match="missing layers"):
        list(maybe_audited(iter(items), "plain", SimpleNamespace(config=SimpleNamespace(num_layers=2))))

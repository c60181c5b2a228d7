"""``moe_lora_plugins.merge.fused``: what it accepts and refuses, and when it runs. The kernel's values are checked
in ``tests/megatron/test_merged_stream.py`` (Triton's interpreter, bitwise where the arithmetic is exact) and on
the GPU by ``benchmarks/fused_merge_probe.py`` (bitwise upstream's merge, ``benchmarks/RESULTS-export.md``)."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.envs import SettingsError
from moe_lora_plugins.merge import fused


def members(count: int = 3, rows: int = 6, cols: int = 5, rank: int = 2, dtype: torch.dtype = torch.bfloat16):
    weights = [torch.randn(rows, cols).to(dtype) for _ in range(count)]
    lora_a = [torch.randn(rank, cols).to(dtype) for _ in range(count)]
    lora_b = [torch.randn(rows, rank).to(dtype) for _ in range(count)]
    return weights, lora_a, lora_b


def test_members_that_fit_are_accepted():
    fused.check_members(*members())
    fused.check_members(*members(dtype=torch.float32))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda w, a, b: (w, a[:-1], b), r"one A and one B per weight, got 3 weights, 2 A and 3 B"),
        (lambda w, a, b: (w, [x.t() for x in a], b), r"W \(out, in\), A \(r, in\), B \(out, r\): got W \(6, 5\), A \(5, 2\)"),
        (lambda w, a, b: (w[:2] + [w[2].t().contiguous().t()], a, b), r"W #2 is \(6, 5\) torch.bfloat16 on cpu \(contiguous: False\)"),
        (lambda w, a, b: (w[:2] + [w[2].float()], a, b), r"W #2 is \(6, 5\) torch.float32"),
        (lambda w, a, b: (w, a, [x.float() for x in b]), r"got W torch.bfloat16, A torch.bfloat16, B torch.float32"),
        (lambda w, a, b: ([x.to(torch.int32) for x in w], a, b), r"got W torch.int32"),
    ],
    ids=["counts", "shapes", "not-contiguous", "member-dtype", "factor-dtypes", "int-weights"],
)
def test_members_that_do_not_fit_are_refused_by_name(change, message):
    with pytest.raises(fused.FusedMergeError, match=message):
        fused.check_members(*change(*members()))


def test_runs_on_cuda_or_the_interpreter_only(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MOELORA_FUSED_MERGE", raising=False)
    assert not fused.available(torch.device("cpu"))
    if fused._kernel() is not None and torch.cuda.is_available():
        assert fused.available(torch.device("cuda", 0))


def test_switch_off_and_a_bad_value(monkeypatch):
    monkeypatch.setenv("MOELORA_FUSED_MERGE", "off")
    assert fused.switched_off()
    assert not fused.available(torch.device("cuda", 0))
    monkeypatch.setenv("MOELORA_FUSED_MERGE", "sometimes")
    with pytest.raises(SettingsError, match="MOELORA_FUSED_MERGE"):
        fused.switched_off()


def test_rank_summed_by_dot_only_where_triton_can():
    assert [fused._sums_by_dot(r) for r in (4, 8, 10, 16, 24, 32, 64)] == [False, False, False, True, False, True,
                                                                            True]

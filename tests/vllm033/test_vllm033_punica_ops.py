"""vLLM 0.33.0's own torch punica ops with LoRA index -1 (a token without an adapter), every slot full:
the rows of such tokens get no adapter (shrink writes zero, expand leaves them as they were), and the
other rows get exactly their own slot's product. This is why the vllm.lora_index_minus_one.* backports
stop before 0.33."""

from __future__ import annotations

import pytest
import torch

ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

SLOTS, RANK, HIDDEN, OUT = 3, 4, 8, 6
# Tokens 1 and 4 carry no adapter; the others use every slot, the last one included.
INDICES = torch.tensor([0, -1, 2, 1, -1, 2])


def _reference(inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token times its own slot's matrix; zero for index -1."""
    rows = []
    for token, slot in enumerate(INDICES.tolist()):
        if slot < 0:
            rows.append(torch.zeros(weights.shape[-2], dtype=inputs.dtype))
        else:
            rows.append(weights[slot] @ inputs[token])
    return torch.stack(rows)


def test_shrink_gives_zero_rows_for_index_minus_one():
    torch.manual_seed(0)
    inputs = torch.randn(len(INDICES), HIDDEN)
    lora_a = torch.randn(SLOTS, RANK, HIDDEN)
    output = torch.full((len(INDICES), RANK), 7.0)
    ops.bgmv_shrink(inputs, lora_a, output, INDICES, scaling=0.5)
    torch.testing.assert_close(output, 0.5 * _reference(inputs, lora_a))
    assert output[INDICES < 0].abs().max() == 0


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_leaves_rows_of_index_minus_one_as_they_were(add_inputs):
    torch.manual_seed(1)
    inputs = torch.randn(len(INDICES), RANK)
    lora_b = torch.randn(SLOTS, OUT, RANK)
    before = torch.randn(len(INDICES), OUT)
    output = before.clone()
    ops.bgmv_expand(inputs, lora_b, output, INDICES, add_inputs=add_inputs)
    product = _reference(inputs, lora_b)
    base = INDICES < 0
    torch.testing.assert_close(output[base], before[base], rtol=0, atol=0)
    expected = before[~base] + product[~base] if add_inputs else product[~base]
    torch.testing.assert_close(output[~base], expected)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_touches_only_its_slice_and_not_rows_of_index_minus_one(add_inputs):
    torch.manual_seed(2)
    offset, size, width = 2, OUT, OUT + 5
    inputs = torch.randn(len(INDICES), RANK)
    lora_b = torch.randn(SLOTS, size, RANK)
    before = torch.randn(len(INDICES), width)
    output = before.clone()
    ops.bgmv_expand_slice(inputs, lora_b, output, INDICES, offset, size, add_inputs=add_inputs)
    product = _reference(inputs, lora_b)
    base = INDICES < 0
    window = slice(offset, offset + size)
    outside = torch.ones(width, dtype=torch.bool)
    outside[window] = False
    torch.testing.assert_close(output[:, outside], before[:, outside], rtol=0, atol=0)
    torch.testing.assert_close(output[base], before[base], rtol=0, atol=0)
    expected = before[~base][:, window] + product[~base] if add_inputs else product[~base]
    torch.testing.assert_close(output[~base][:, window], expected)


def test_the_last_slot_is_not_what_base_tokens_get():
    """The 0.32 bug in one line: index -1 read as the last slot would give base tokens slot 2's rows."""
    torch.manual_seed(3)
    inputs = torch.randn(len(INDICES), HIDDEN)
    lora_a = torch.randn(SLOTS, RANK, HIDDEN)
    output = torch.zeros(len(INDICES), RANK)
    ops.bgmv_shrink(inputs, lora_a, output, INDICES, scaling=1.0)
    last_slot_rows = torch.einsum("bi,oi->bo", inputs[INDICES < 0], lora_a[-1])
    assert not torch.allclose(output[INDICES < 0], last_slot_rows)

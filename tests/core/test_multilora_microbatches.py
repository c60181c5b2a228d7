"""The multi-LoRA trainer's microbatch plan: one adapter per microbatch, the same slot sequence on every
data-parallel rank, every sample exactly once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lora_plugins.multilora.trainer import MultiLoraTrainerError, plan_microbatches


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 3)), min_size=1, max_size=4, unique_by=lambda t: t[0]),
       st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]), st.randoms(use_true_random=False))
def test_every_sample_once_one_adapter_per_microbatch_same_slots_on_every_rank(counts, dp, mbs, rng):
    slots = [slot for slot, units in counts for _ in range(units * dp * mbs)]
    rng.shuffle(slots)
    plans = [plan_microbatches(slots, dp, r, mbs) for r in range(dp)]
    seen = sorted(i for plan in plans for micro in plan for i in micro)
    assert seen == list(range(len(slots)))
    sequences = [[slots[m[0]] for m in plan] for plan in plans]
    assert all(seq == sequences[0] for seq in sequences)
    assert sequences[0] == sorted(sequences[0])
    for plan in plans:
        for micro in plan:
            assert len(micro) == mbs and len({slots[i] for i in micro}) == 1


def test_an_adapter_whose_samples_do_not_fill_whole_microbatches_on_every_rank_is_refused():
    with pytest.raises(MultiLoraTrainerError, match="slot 1 has 3 samples; .* 2 x micro batch size 1 = 2"):
        plan_microbatches([0, 0, 1, 1, 1], 2, 0, 1)

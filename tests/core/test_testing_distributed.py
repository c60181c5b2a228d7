"""run_distributed: real processes joined by gloo, results in rank order, failures named by rank."""

from __future__ import annotations

import pytest

from moe_lora_plugins.testing.distributed import DistributedRunError, run_distributed


def _rank_and_sum() -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    value = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(value)
    return dist.get_rank(), int(value.item())


def _fail_on_rank_one() -> int:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one refuses")
    return dist.get_rank()


def test_results_come_back_in_rank_order_after_a_real_collective():
    assert run_distributed(_rank_and_sum, 3, timeout_s=120) == [(0, 6), (1, 6), (2, 6)]


def test_a_failing_rank_is_named_with_its_traceback():
    with pytest.raises(DistributedRunError, match=r"1 of 2 ranks failed \(ranks \[1\]\)[\s\S]*rank one refuses") as info:
        run_distributed(_fail_on_rank_one, 2, timeout_s=120)
    assert set(info.value.failures) == {1}

"""True-on-policy mode on the trainer side (real megatron-core + megatron-bridge, CPU gloo, float32).

The demo's model (a dense layer 0, MoE layers 1-3, LoRA with a non-zero B on attention, the dense MLP and
every expert) scores 16 sequences in one batch and some of them alone: with the mode on, every log-prob is
bitwise the same; under EP=2 a rank's results do not depend on what its EP peer scores at the same time,
and equal world size 1's. (Trainer == engine is the e2e lane's check: tests/e2e/test_true_on_policy.py.)
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from moe_lora_plugins.testing.distributed import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

SEQUENCES = 16
LENGTH = 10


def _score(model_dir: str, ep: int, alone: list[int]) -> dict:
    """Build the demo trainer (EP=ep, PP=1), give LoRA B random values, score the batch and some rows alone."""
    import torch

    from moe_lora_plugins.activation import activate, is_active
    from moe_lora_plugins.demo.trainer import TrainerRank, TrainerSettings

    if not is_active():  # the env reaches the rank after interpreter start-up: the .pth bootstrap missed it
        activate(role="trainer")
    rank = torch.distributed.get_rank()
    trainer = TrainerRank(TrainerSettings(model_dir, ep=ep, pp=1))
    with torch.no_grad():  # by global name: the same values whichever rank holds the expert
        for chunk in trainer.model:
            for name, param in chunk.named_parameters():
                if param.requires_grad and ".linear_out." in name:
                    seed = zlib.crc32(trainer.lora_names[id(param)].encode())
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    tokens = torch.randint(4, 60, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(11))
    model = trainer.model[0]

    def logprobs(batch: torch.Tensor) -> torch.Tensor:
        from moe_lora_plugins.onpolicy import ops

        positions = torch.arange(LENGTH)[None].expand(batch.shape[0], LENGTH)
        mask = torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), diagonal=1)[None, None]
        with torch.no_grad():
            logits = model(input_ids=batch, position_ids=positions, attention_mask=mask)
        return ops.token_logprobs(logits[:, :-1].float(), batch[:, 1:])

    full = logprobs(tokens)
    # Under EP, rank 1 scores the whole batch while rank 0 scores single rows: both run the MoE together.
    singles = {}
    for index in alone:
        singles[index] = logprobs(tokens[index : index + 1] if rank == 0 else tokens)[0 if rank == 0 else index]
    return {"full": full, "alone": singles}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from moe_lora_plugins.demo.model import make_tiny_moe

    return str(make_tiny_moe(Path(tmp_path_factory.mktemp("onpolicy-model")) / "model", seed=3))


ON = {"MOELORA_PLUGINS": "on", "MOELORA_TRUE_ON_POLICY": "on", "OMP_NUM_THREADS": "1"}


def test_a_sequence_alone_and_in_a_batch_of_16_gives_the_same_bits(model_dir):
    (result,) = run_distributed(_score, 1, args=(model_dir, 1, [0, 7, 15]), env=ON, timeout_s=600)
    for index, row in result["alone"].items():
        assert torch_equal(row, result["full"][index]), f"sequence {index}: alone != in the batch"


def test_ep2_rank_results_ignore_the_peer_batch_and_equal_world_size_1(model_dir):
    (single,) = run_distributed(_score, 1, args=(model_dir, 1, [3]), env=ON, timeout_s=600)
    rank0, rank1 = run_distributed(_score, 2, args=(model_dir, 2, [3]), env=ON, timeout_s=600)
    assert torch_equal(rank0["full"], single["full"]) and torch_equal(rank1["full"], single["full"])
    assert torch_equal(rank0["alone"][3], single["full"][3]), "rank 0 alone while rank 1 scored 16"


def test_without_the_mode_a_sequence_alone_and_in_the_batch_differ(model_dir):
    """The check can fail: Megatron's own CPU kernels give a row other bits when the batch is larger."""
    off = {**ON, "MOELORA_TRUE_ON_POLICY": "off"}
    (result,) = run_distributed(_score, 1, args=(model_dir, 1, [0, 7, 15]), env=off, timeout_s=600)
    differing = [i for i, row in result["alone"].items() if not torch_equal(row, result["full"][i])]
    assert differing, "upstream gave every row the same bits alone and in the batch"
    assert max((result["alone"][i] - result["full"][i]).abs().max().item() for i in differing) < 1e-4


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _lora_gradients(model_dir: str) -> dict:
    """LoRA gradients of a policy-gradient-style loss on 4 sequences (LoRA B random), by global name."""
    import torch

    from moe_lora_plugins.activation import activate, is_active
    from moe_lora_plugins.demo.trainer import TrainerRank, TrainerSettings
    from moe_lora_plugins.onpolicy import ops

    if not is_active():
        activate(role="trainer")
    trainer = TrainerRank(TrainerSettings(model_dir, ep=1, pp=1))
    with torch.no_grad():
        for chunk in trainer.model:
            for name, param in chunk.named_parameters():
                if param.requires_grad and ".linear_out." in name:
                    seed = zlib.crc32(trainer.lora_names[id(param)].encode())
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    tokens = torch.randint(4, 60, (4, LENGTH), generator=torch.Generator().manual_seed(13))
    positions = torch.arange(LENGTH)[None].expand(4, LENGTH)
    mask = torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), diagonal=1)[None, None]
    logits = trainer.model[0](input_ids=tokens, position_ids=positions, attention_mask=mask)
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    (-(advantages[:, None] * ops.token_logprobs(logits[:, :-1].float(), tokens[:, 1:])).mean()).backward()
    return {trainer.lora_names[id(p)]: p.grad.clone() for p in trainer.params}


def test_the_modes_gradients_are_the_default_kernels_gradients(model_dir):
    """Only the forward's bits change: the LoRA gradients (through attention, RoPE, norms, router, experts,
    the MoE combine and the LoRA delta) agree with upstream's to float32 rounding."""
    (on,) = run_distributed(_lora_gradients, 1, args=(model_dir,), env=ON, timeout_s=600)
    (off,) = run_distributed(_lora_gradients, 1, args=(model_dir,), env={**ON, "MOELORA_TRUE_ON_POLICY": "off"},
                             timeout_s=600)
    assert sorted(on) == sorted(off)
    for name in on:
        scale = off[name].abs().max().item()
        assert scale > 0 or on[name].abs().max().item() == 0, name
        assert (on[name] - off[name]).abs().max().item() <= 1e-4 * max(scale, 1e-3), name

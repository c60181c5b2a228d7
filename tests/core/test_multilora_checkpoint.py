"""Per-adapter checkpoints: atomic layout, strict step-directory names, loads that count what they restore."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lora_plugins.multilora import checkpoint as ckpt


def write(root, adapter: str, step: int, world: int = 1, weights=None, manifest=None):
    stage = ckpt.prepare(root, adapter, step)
    for rank in range(world):
        ckpt.write_shard(stage, rank, weights or {"w": torch.full((2, 3), float(step))}, {"state": {}},
                         {"torch": torch.get_rng_state()})
    return ckpt.commit(root, adapter, step, world, manifest or {"data": {"position": step}})


def test_a_committed_checkpoint_is_found_with_its_manifest_and_shards(tmp_path):
    path = write(tmp_path, "a", 3, world=2)
    assert path == tmp_path / "a" / "step_00000003"
    assert sorted(os.listdir(path)) == ["manifest.json", "rank0.pt", "rank1.pt"]
    ref = ckpt.latest_checkpoint(tmp_path, "a")
    assert ref.step == 3 and ref.manifest["data"] == {"position": 3} and ref.manifest["world_size"] == 2
    assert torch.equal(ckpt.read_shard(ref, 1, 2)["weights"]["w"], torch.full((2, 3), 3.0))


def test_latest_orders_steps_numerically_not_as_strings(tmp_path):
    # miles #1141 review: step_N names were parsed by splitting and sorting strings.
    for step in (9, 10, 100, 2):
        write(tmp_path, "a", step)
    assert [r.step for r in ckpt.list_checkpoints(tmp_path, "a")] == [2, 9, 10, 100]
    assert ckpt.latest_checkpoint(tmp_path, "a").step == 100


@pytest.mark.parametrize("name", ["step_5.bak", "step_x", "step_-1", "step_", "latest", ".tmp-step_00000011",
                                  "step_00000011.part", "Step_12", "step_1e3", " step_12"])
def test_names_that_are_not_exactly_step_digits_are_never_checkpoints(tmp_path, name):
    assert ckpt.parse_step_dir(name) is None
    write(tmp_path, "a", 4)
    odd = tmp_path / "a" / name
    odd.mkdir()
    (odd / ckpt.MANIFEST).write_text("{not json")  # would blow up if it were read
    assert [r.step for r in ckpt.list_checkpoints(tmp_path, "a")] == [4]


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10**12 - 1))
def test_step_names_round_trip(step):
    assert ckpt.parse_step_dir(ckpt.step_dir_name(step)) == step


def test_a_directory_without_manifest_is_an_incomplete_write_and_is_ignored(tmp_path):
    write(tmp_path, "a", 1)
    stage = ckpt.prepare(tmp_path, "a", 2)
    ckpt.write_shard(stage, 0, {"w": torch.zeros(1)}, {})  # crash before commit
    (tmp_path / "a" / "step_00000003").mkdir()  # a directory someone made by hand
    assert ckpt.latest_checkpoint(tmp_path, "a").step == 1


def test_two_directories_with_the_same_step_are_an_error_naming_both(tmp_path):
    write(tmp_path, "a", 7)
    os.rename(tmp_path / "a" / "step_00000007", tmp_path / "a" / "step_7")
    write(tmp_path, "a", 7)
    with pytest.raises(ckpt.CheckpointError, match="step_7 and step_00000007|step_00000007 and step_7"):
        ckpt.list_checkpoints(tmp_path, "a")


def test_commit_refuses_when_a_rank_did_not_write(tmp_path):
    stage = ckpt.prepare(tmp_path, "a", 1)
    ckpt.write_shard(stage, 0, {"w": torch.zeros(1)}, {})
    with pytest.raises(ckpt.CheckpointError, match=r"\['rank1.pt'\]"):
        ckpt.commit(tmp_path, "a", 1, 2, {})
    assert ckpt.latest_checkpoint(tmp_path, "a") is None


def test_a_stale_staging_directory_from_a_crash_is_cleared(tmp_path):
    stage = ckpt.prepare(tmp_path, "a", 1)
    (stage / "rank5.pt").write_bytes(b"junk")
    stage = ckpt.prepare(tmp_path, "a", 1)
    assert list(stage.iterdir()) == []


def test_reading_with_another_world_size_is_refused(tmp_path):
    write(tmp_path, "a", 1, world=2)
    with pytest.raises(ckpt.CheckpointError, match="written by 2 trainer ranks; this run has 4"):
        ckpt.read_shard(ckpt.latest_checkpoint(tmp_path, "a"), 0, 4)


def test_loading_into_a_slot_with_no_parameters_is_an_error_not_zero_tensors_loaded():
    # miles #1141 review: the slot was initialised after the checkpoint load, which loaded 0 tensors.
    with pytest.raises(ckpt.CheckpointError, match="materialise the slot before loading"):
        ckpt.load_weights({}, {"x.linear_in.weight": torch.zeros(2, 2)}, "adapter 'a' rank 0")


def test_loading_counts_and_copies_every_tensor_and_refuses_mismatches():
    params = {"a": torch.nn.Parameter(torch.zeros(2, 2)), "b": torch.nn.Parameter(torch.zeros(3))}
    weights = {"a": torch.ones(2, 2), "b": torch.arange(3.0)}
    assert ckpt.load_weights(params, weights, "here") == 2
    assert torch.equal(params["a"], weights["a"]) and torch.equal(params["b"], weights["b"])
    with pytest.raises(ckpt.CheckpointError, match=r"missing in checkpoint \['b'\]"):
        ckpt.load_weights(params, {"a": torch.ones(2, 2)}, "here")
    with pytest.raises(ckpt.CheckpointError, match=r"shape \(3, 3\)"):
        ckpt.load_weights(params, {"a": torch.ones(3, 3), "b": torch.zeros(3)}, "here")


def test_rng_state_round_trips():
    state = ckpt.capture_rng()
    expected = torch.rand(5)
    torch.rand(3)
    ckpt.restore_rng(state)
    assert torch.equal(torch.rand(5), expected)

"""Multi-LoRA training on the real Megatron-Bridge trainer (EP=2 x PP=2, gloo, CPU): no cross-talk, only the
adapters of a batch step, register / deregister without touching the others, per-adapter export.

One trainer pool is shared by the tests of this module (its start-up is most of the cost); every test
removes the adapters it added.

Tolerance: the mixed and the alone runs sum the same per-microbatch gradients in the same order with
the same normalisation, so they are compared bitwise (``torch.equal``); this is stricter than the float32
reduction tolerance (rtol 1e-6) the issue allows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_lora_plugins.multilora.controller import MultiLoraController
from moe_lora_plugins.multilora.driver import MultiLoraDriver
from moe_lora_plugins.multilora.trainer import MultiBatch, MultiLoraTrainerError

from .multilora_support import SPEC_A, SPEC_B, SPEC_C, SPEC_D, prompts_for, reward, sample_rollout

EP, PP = 2, 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from moe_lora_plugins.demo.model import make_tiny_moe

    return str(make_tiny_moe(tmp_path_factory.mktemp("multilora") / "model"))


@pytest.fixture(scope="module")
def pool(model_dir, tmp_path_factory):
    from moe_lora_plugins.multilora.trainer import MultiLoraTrainerPool, MultiTrainerSettings

    logs = tmp_path_factory.mktemp("multilora-logs")
    pool = MultiLoraTrainerPool(MultiTrainerSettings(model_dir, ep=EP, pp=PP, micro_batch_size=1), log_dir=str(logs))
    yield pool
    pool.stop()


def merged_state(pool, slot):
    out = {}
    for part in pool.call("adapter_state", slot):
        for name, value in part.items():
            if name in out:
                assert torch.equal(out[name], value), f"{name}: replicas disagree"
            out[name] = value
    return out


def assert_same_bits(left, right):
    assert sorted(left) == sorted(right)
    different = [n for n in left if not torch.equal(left[n], right[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def random_batch(seed, slots):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 64, (len(slots), 10), generator=g)
    return MultiBatch(tokens, 6, torch.randn(len(slots), generator=g), list(slots))


def test_mixed_steps_equal_each_adapter_trained_alone_and_absent_adapters_do_not_move(pool):
    for slot, spec in ((0, SPEC_A), (1, SPEC_B), (2, SPEC_A), (3, SPEC_B)):
        pool.call("add_adapter", slot, spec)
    try:
        initial = {s: merged_state(pool, s) for s in range(4)}
        assert_same_bits(initial[0], initial[2])
        for step in range(3):
            mixed_slots = [0, 1, 1, 0, 1, 0, 0, 1]  # samples of both adapters interleaved in the batch
            batch = random_batch(step, mixed_slots)
            stepped = pool.call("step", batch)
            assert all(r.stepped == [0, 1] for r in stepped)
            for alone_slot, mixed_slot in ((2, 0), (3, 1)):
                rows = [i for i, s in enumerate(mixed_slots) if s == mixed_slot]
                before = {s: merged_state(pool, s) for s in (0, 1, 5 - alone_slot)}
                alone = MultiBatch(batch.tokens[rows], batch.prompt_len, batch.advantages[rows], [alone_slot] * len(rows))
                assert all(r.stepped == [alone_slot] for r in pool.call("step", alone))
                for s, state in before.items():  # adapters absent from the batch: not one bit moved
                    assert_same_bits(merged_state(pool, s), state)
        for alone_slot, mixed_slot in ((2, 0), (3, 1)):
            trained = merged_state(pool, mixed_slot)
            assert_same_bits(trained, merged_state(pool, alone_slot))
            moved = [n for n in trained if not torch.equal(trained[n], initial[mixed_slot][n])]
            assert len(moved) == len(trained), "every LoRA tensor of a trained adapter changes"
        experts = [n for n in merged_state(pool, 0) if ".local_experts." in n]
        assert experts, "adapter A carries expert adapters"
    finally:
        for slot in range(4):
            pool.call("remove_adapter", slot)


def test_each_adapter_exports_with_its_own_rank_alpha_and_targets(pool):
    pool.call("add_adapter", 0, SPEC_A)
    pool.call("add_adapter", 1, SPEC_C)
    try:
        a, c = pool.call("export_adapter", 0)[0], pool.call("export_adapter", 1)[0]
        assert (a["config"]["r"], a["config"]["lora_alpha"]) == (2, 4.0)
        assert (c["config"]["r"], c["config"]["lora_alpha"]) == (8, 8.0)
        assert any(".experts.3.down_proj." in n for n in a["tensors"])  # global expert numbers under EP=2
        assert not any(".experts." in n for n in c["tensors"])
        assert sorted(c["config"]["target_modules"]) == ["down_proj", "o_proj"]  # dense fc2 = down_proj
    finally:
        pool.call("remove_adapter", 0)
        pool.call("remove_adapter", 1)


def test_loading_a_checkpoint_into_a_slot_that_holds_no_adapter_is_refused(pool, tmp_path):
    # miles #1141 review: the slot was initialised after the load, which loaded 0 tensors without a word.
    with pytest.raises(MultiLoraTrainerError, match="slot 4 holds no adapter on this trainer"):
        pool.call("load_checkpoint", str(tmp_path), 4)


PEFT_TOLERANCE = 1e-5  # float32 Megatron vs HF transformers + peft, as in test_peft_logits


def test_each_trained_adapter_as_a_peft_dir_gives_hf_and_peft_the_trainers_logprobs(pool, model_dir, tmp_path):
    """The independent reference: every sample's completion log-probs from the multi-LoRA trainer (mixed batch,
    each sample through its own adapter) equal HF transformers + peft with that adapter's exported PEFT dir
    (peft drops LoRA on the dense MLP of a qwen3_moe model on load; the reference loader adds it back)."""
    from moe_lora_plugins.lora.formats import write_adapter_dir
    from moe_lora_plugins.testing.peft_reference import load_hf_with_peft_and_dense_mlp_lora

    pool.call("add_adapter", 0, SPEC_A)
    pool.call("add_adapter", 1, SPEC_B)
    try:
        slots = [0, 1, 1, 0, 1, 0, 0, 1]
        for step in range(2):  # LoRA B non-zero
            pool.call("step", random_batch(20 + step, slots))
        batch = random_batch(30, slots)
        trainer = {}
        for result in pool.call("step", batch, False):
            for row, index in enumerate(result.sample_indices):
                trainer[index] = result.logprobs[row]
        assert sorted(trainer) == list(range(len(slots)))
        dirs = {}
        for slot in (0, 1):
            exported = pool.call("export_adapter", slot)[0]
            dirs[slot] = write_adapter_dir(str(tmp_path / f"slot{slot}"), exported["tensors"], exported["config"])
    finally:
        pool.call("remove_adapter", 0)
        pool.call("remove_adapter", 1)
    worst = 0.0
    for slot, path in dirs.items():
        _, peft_model = load_hf_with_peft_and_dense_mlp_lora(Path(model_dir), Path(path))
        for index in (i for i, s in enumerate(slots) if s == slot):
            tokens = batch.tokens[index : index + 1]
            with torch.no_grad():
                logits = peft_model(input_ids=tokens).logits.float()
            reference = torch.log_softmax(logits[:, batch.prompt_len - 1 : -1], dim=-1)
            reference = reference.gather(-1, tokens[:, batch.prompt_len :, None]).squeeze(-1)[0]
            worst = max(worst, float((reference - trainer[index]).abs().max()))
    print(f"multi-LoRA trainer vs HF + peft per adapter: max |dlogprob| = {worst:.2e}")
    assert worst < PEFT_TOLERANCE


def run(pool, changes, steps=4):
    """Steps of a trainer-only driver with copy-a and copy-b; ``changes[k]`` runs before step k. Returns
    copy-a's parameters after every step and the driver."""
    driver = MultiLoraDriver(MultiLoraController(4, require_engine=False), pool, sample_rollout, group_size=2,
                             groups_per_adapter=1)
    for spec in (SPEC_A, SPEC_B):
        driver.register(spec, prompts_for(spec), reward)
    states, reports = [], []
    try:
        for k in range(steps):
            if k in changes:
                changes[k](driver)
            reports.append(driver.step())
            states.append(driver.adapter_state(SPEC_A.name))
    finally:
        for record in driver.controller.records():
            pool.call("remove_adapter", record.slot)
    return states, reports, driver


def test_registering_and_deregistering_adapters_leaves_the_others_bits_unchanged_and_reuses_the_slot(pool):
    plain, _, _ = run(pool, {})

    def add_c(driver):
        assert driver.register(SPEC_C, prompts_for(SPEC_C), reward) == 2

    def drop_b(driver):
        driver.deregister(SPEC_B.name)

    def add_d(driver):
        assert driver.register(SPEC_D, prompts_for(SPEC_D), reward) == 1  # copy-b's slot, reused

    changed, reports, driver = run(pool, {1: add_c, 2: drop_b, 3: add_d})
    for left, right in zip(plain, changed, strict=True):
        assert_same_bits(left, right)
    assert [set(r.plan.adapters) for r in reports] == [
        {"copy-a", "copy-b"}, {"copy-a", "copy-b", "late-c"}, {"copy-a", "late-c"}, {"copy-a", "late-c", "late-d"}]
    assert reports[1].stepped_slots == [0, 1, 2] and reports[3].stepped_slots == [0, 1, 2]
    metrics = {r.name: r.metrics.train_steps for r in driver.controller.records()}
    assert metrics == {"copy-a": 4, "late-c": 3, "late-d": 1}
    assert [r.name for r in driver.controller.removed()] == ["copy-b"]


def trainer_only_driver(pool, root=None):
    return MultiLoraDriver(MultiLoraController(4, require_engine=False), pool, sample_rollout, group_size=2,
                           groups_per_adapter=1, checkpoint_root=root)


def test_a_trainer_killed_between_steps_k_and_k_plus_1_resumes_to_the_same_bits(pool, model_dir, tmp_path):
    import os
    import signal

    from moe_lora_plugins.multilora.trainer import MultiLoraTrainerPool, MultiTrainerSettings

    k = 2
    uninterrupted = trainer_only_driver(pool)
    for spec in (SPEC_A, SPEC_B):
        uninterrupted.register(spec, prompts_for(spec), reward)
    try:
        for _ in range(k + 1):
            uninterrupted.step()
        expected = {s.name: uninterrupted.adapter_state(s.name) for s in (SPEC_A, SPEC_B)}
    finally:
        for record in uninterrupted.controller.records():
            pool.call("remove_adapter", record.slot)

    settings = MultiTrainerSettings(model_dir, ep=EP, pp=PP, micro_batch_size=1)
    root = str(tmp_path / "checkpoints")
    victim = MultiLoraTrainerPool(settings, log_dir=str(tmp_path))
    try:
        interrupted = trainer_only_driver(victim, root)
        for spec in (SPEC_A, SPEC_B):
            interrupted.register(spec, prompts_for(spec), reward)
        for _ in range(k):
            interrupted.step()
        assert interrupted.checkpoint() == k
        for info in victim.info:
            os.kill(info["pid"], signal.SIGKILL)
        for proc in victim.procs:
            proc.join(60)
        assert [p.exitcode for p in victim.procs] == [-signal.SIGKILL] * EP * PP
    finally:
        victim.stop()
    assert sorted(os.listdir(tmp_path / "checkpoints" / SPEC_A.name)) == ["step_00000002"]  # no temp left

    resumed_pool = MultiLoraTrainerPool(settings, log_dir=str(tmp_path))
    try:
        resumed = trainer_only_driver(resumed_pool, root)
        assert resumed.resume({s.name: prompts_for(s) for s in (SPEC_A, SPEC_B)},
                              {s.name: reward for s in (SPEC_A, SPEC_B)}) == k
        report = resumed.step()
        assert report.step == k
        for spec in (SPEC_A, SPEC_B):
            assert_same_bits(resumed.adapter_state(spec.name), expected[spec.name])
            assert resumed.controller.get(spec.name).metrics.train_steps == k + 1
    finally:
        resumed_pool.stop()


def test_mixed_steps_equal_each_adapter_alone_and_the_plain_pipeline_under_virtual_stages(model_dir, tmp_path):
    """PP=2 x VPP=2 (the interleaved schedule, one layer per model chunk), EP=1, with more microbatches than
    stages: mixed == alone bitwise, and both equal the same steps without virtual stages."""
    from moe_lora_plugins.multilora.trainer import MultiLoraTrainerPool, MultiTrainerSettings

    results = {}
    for vpp in (None, 2):
        vpp_pool = MultiLoraTrainerPool(MultiTrainerSettings(model_dir, ep=1, pp=2, vpp=vpp, micro_batch_size=1),
                                        log_dir=str(tmp_path))
        try:
            for slot, spec in ((0, SPEC_A), (1, SPEC_B), (2, SPEC_A), (3, SPEC_B)):
                vpp_pool.call("add_adapter", slot, spec)
            for step in range(2):
                mixed_slots = [1, 0, 0, 1, 0, 1, 1, 0]
                batch = random_batch(10 + step, mixed_slots)
                assert all(r.stepped == [0, 1] for r in vpp_pool.call("step", batch))
                for alone_slot, mixed_slot in ((2, 0), (3, 1)):
                    rows = [i for i, s in enumerate(mixed_slots) if s == mixed_slot]
                    alone = MultiBatch(batch.tokens[rows], batch.prompt_len, batch.advantages[rows],
                                       [alone_slot] * len(rows))
                    vpp_pool.call("step", alone)
            results[vpp] = {s: merged_state(vpp_pool, s) for s in range(4)}
            if vpp:
                with pytest.raises(MultiLoraTrainerError, match="needs a multiple of PP = 2"):
                    vpp_pool.call("step", random_batch(0, [0, 0, 0]))
        finally:
            vpp_pool.stop()
    for states in results.values():
        assert_same_bits(states[0], states[2])
        assert_same_bits(states[1], states[3])
    for slot in range(4):
        assert_same_bits(results[2][slot], results[None][slot])

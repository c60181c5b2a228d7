"""The true-on-policy contract's refusals (each message checked), the metric, and the gate both ways."""

from __future__ import annotations

import pytest
import torch

from moe_lora_plugins.envs import load_settings, parse_gate
from moe_lora_plugins.errors import SettingsError
from moe_lora_plugins.onpolicy import enabled
from moe_lora_plugins.onpolicy.contract import (
    CONTRACTS,
    OnPolicyContractError,
    OnPolicyRun,
    process_status,
    validate,
)
from moe_lora_plugins.onpolicy.gate import OnPolicyGateError, check_step, logprob_diff

QWEN3_MOE = "Qwen3MoeForCausalLM"


def test_the_demo_layouts_are_inside_the_contract():
    for ep, pp, vpp in ((1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)):
        assert validate(OnPolicyRun(QWEN3_MOE, ep=ep, pp=pp, vpp=vpp)) is CONTRACTS["qwen3_moe"]


@pytest.mark.parametrize(("run", "message"), [
    (OnPolicyRun("LlamaForCausalLM"), "model architecture 'LlamaForCausalLM' has no true-on-policy contract"),
    (OnPolicyRun(QWEN3_MOE, tp=2), "TP=2: the mode supports TP <= 1"),
    (OnPolicyRun(QWEN3_MOE, etp=2), "expert-TP=2: the mode supports expert-TP <= 1"),
    (OnPolicyRun(QWEN3_MOE, cp=2), "set --context-parallel-size 1"),
    (OnPolicyRun(QWEN3_MOE, sequence_parallel=True), "sequence_parallel=True"),
    (OnPolicyRun(QWEN3_MOE, moe_grouped_gemm=True), "set moe_grouped_gemm=False"),
    (OnPolicyRun(QWEN3_MOE, lora_dropout=0.1), "set --lora-dropout 0"),
    (OnPolicyRun(QWEN3_MOE, dtype="float16"), "dtype 'float16'"),
    (OnPolicyRun(QWEN3_MOE, engine="sglang"), "only vLLM is patched"),
    (OnPolicyRun(QWEN3_MOE, engine_device="cuda"), "vLLM on CUDA could not be run here"),
    (OnPolicyRun(QWEN3_MOE, enforce_eager=False), "pass enforce_eager=True"),
    (OnPolicyRun(QWEN3_MOE, enable_lora=False), "pass enable_lora=True"),
])
def test_each_refusal_names_the_setting_and_the_fix(run, message):
    with pytest.raises(OnPolicyContractError) as caught:
        validate(run)
    assert message in str(caught.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(OnPolicyContractError) as caught:
        validate(OnPolicyRun(QWEN3_MOE, tp=2, moe_grouped_gemm=True, enforce_eager=False))
    assert len(caught.value.problems) == 3


def test_the_switches_parse_and_refuse_bad_values():
    assert enabled({"MOELORA_TRUE_ON_POLICY": "on"}) and not enabled({})
    with pytest.raises(SettingsError, match="MOELORA_TRUE_ON_POLICY='maybe'"):
        enabled({"MOELORA_TRUE_ON_POLICY": "maybe"})
    assert parse_gate(None) == "off" and parse_gate("EXACT") == "exact" and parse_gate("1e-6") == "1e-06"
    for bad in ("-1", "loose", "nan"):
        with pytest.raises(SettingsError, match="MOELORA_ONPOLICY_GATE"):
            parse_gate(bad)
    settings = load_settings({"MOELORA_TRUE_ON_POLICY": "1", "MOELORA_ONPOLICY_GATE": "exact"})
    rows = {r["name"]: r["parsed"] for r in settings.as_rows()}
    assert rows["MOELORA_TRUE_ON_POLICY"] == "on" and rows["MOELORA_ONPOLICY_GATE"] == "exact"


def test_process_status_says_whether_this_roles_patches_are_applied():
    on = {"MOELORA_TRUE_ON_POLICY": "on"}
    status = process_status("trainer", {}, on)
    assert status["mode"] == "on" and status["satisfied"] is False and "megatron_core.onpolicy_linear" in status["missing"]
    applied = dict.fromkeys(status["required"], "applied")
    assert process_status("trainer", applied, on)["satisfied"] is True
    assert process_status("vllm", {}, {})["mode"] == "off"


def test_the_metric_is_the_masked_mean_and_counts_bitwise_tokens():
    train = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.5]])
    rollout = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.5, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    report = logprob_diff(train, rollout, mask)
    assert report.tokens == 5 and report.bitwise_equal_tokens == 3
    assert report.train_rollout_logprob_abs_diff == pytest.approx(1.0 / 5)
    assert report.max_abs_diff == 0.5 and report.first_difference == (1, 1)


def test_the_exact_gate_passes_zero_and_fails_anything_else_naming_token_and_layer():
    same = logprob_diff(torch.zeros(2, 3), torch.zeros(2, 3))
    assert check_step(same, "exact") is same
    tiny = torch.zeros(2, 3)
    tiny[1, 2] = 2.0**-40
    report = logprob_diff(tiny, torch.zeros(2, 3))
    with pytest.raises(OnPolicyGateError) as caught:
        check_step(report, "exact", step=4, locate_layer=lambda seq: f"model.layers.{seq + 2}")
    text = str(caught.value)
    assert "step 4:" in text and "sequence 1, response token 2" in text and "model.layers.3" in text
    assert "5/6 tokens bitwise equal" in text


def test_a_tolerance_gate_and_off():
    report = logprob_diff(torch.tensor([[0.0, 1e-7]]), torch.zeros(1, 2))
    assert check_step(report, "1e-6") is report
    assert check_step(report, "off") is report
    with pytest.raises(OnPolicyGateError, match="tolerance 1e-08"):
        check_step(report, "1e-8")


def test_shapes_and_nans_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        logprob_diff(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        logprob_diff(torch.tensor([[float("nan")]]), torch.zeros(1, 1))


def test_the_lora_surface_has_the_flag_and_refuses_what_breaks_it():
    import argparse

    from moe_lora_plugins.lora_config import (
        LoraConfig,
        LoraConfigError,
        ModelFacts,
        add_lora_arguments,
        apply_true_on_policy,
        validate_lora_config,
    )

    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    config = LoraConfig.from_args(parser.parse_args(["--enable-lora", "--true-on-policy"]))
    assert config.true_on_policy is True
    env: dict[str, str] = {}
    apply_true_on_policy(config, env)
    assert env == {"MOELORA_TRUE_ON_POLICY": "on"} and enabled(env)
    for flags, message in ((["--lora-dropout", "0.1"], "set --lora-dropout 0"),
                           (["--lora-sync-mode", "merged"], "use --lora-sync-mode adapter")):
        bad = LoraConfig.from_args(parser.parse_args(["--enable-lora", "--true-on-policy", *flags]))
        with pytest.raises(LoraConfigError, match=message):
            validate_lora_config(bad, model=ModelFacts(family="moe", num_moe_experts=4))


def test_doctor_shows_whether_the_mode_is_on_and_satisfied_here(monkeypatch):
    from moe_lora_plugins import doctor

    monkeypatch.setenv("MOELORA_TRUE_ON_POLICY", "on")
    monkeypatch.setenv("MOELORA_ROLE", "trainer")
    report = doctor.collect(import_targets=False)
    assert report["true_on_policy"]["mode"] == "on"
    assert report["true_on_policy"]["satisfied"] is False, "nothing is applied in a process that did not activate"
    assert "true-on-policy mode: on (role trainer; NOT satisfied, missing [" in doctor.render_text(report)
    monkeypatch.setenv("MOELORA_TRUE_ON_POLICY", "off")
    assert "true-on-policy mode: off" in doctor.render_text(doctor.collect(import_targets=False))


def test_the_slime_miles_init_path_turns_the_mode_on_from_the_host_flag():
    """miles' --true-on-policy-mode (or ours) reaches MOELORA_TRUE_ON_POLICY through init(args), in a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import argparse, os\n"
        "from moe_lora_plugins.integrations.megatron_init import init, lora_config_from_host_args\n"
        "miles = argparse.Namespace(lora_rank=8, lora_alpha=16, true_on_policy_mode=True)\n"
        "assert lora_config_from_host_args(miles).true_on_policy is True\n"
        "init(miles)\n"
        "print(os.environ.get('MOELORA_TRUE_ON_POLICY'))\n"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "on"

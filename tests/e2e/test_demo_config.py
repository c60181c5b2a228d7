"""Bad demo configurations stop before anything starts, with a message that says what to change."""

from __future__ import annotations

import importlib.util

import pytest

from moe_lora_plugins import cli
from moe_lora_plugins.demo import config as demo_config
from moe_lora_plugins.demo.config import DemoConfig, DemoConfigError, layout_problems, validate


def run_demo(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(["demo", *argv])
    return code, capsys.readouterr().err


def test_default_layout_is_ep2_pp2_in_four_processes():
    config = DemoConfig()
    assert (config.ep, config.pp, config.world_size) == (2, 2, 4)
    assert layout_problems(config) == []


def test_ep_that_does_not_divide_the_experts_names_the_valid_choices(capsys):
    code, err = run_demo(capsys, "--ep", "3", "--samples", "18", "--group-size", "3")
    assert code == 2
    assert "--ep 3 does not divide the model's 4 experts" in err
    assert "choose --ep from [1, 2, 4]" in err


def test_more_processes_than_the_layout_needs_is_refused(capsys):
    code, err = run_demo(capsys, "--trainer-procs", "6")
    assert code == 2
    assert "--trainer-procs 6 is more processes than the layout needs" in err
    assert "EP=2 x PP=2 (TP=1) is 4 trainer processes; pass --trainer-procs 4" in err


def test_pipeline_that_does_not_split_the_layers_is_refused(capsys):
    code, err = run_demo(capsys, "--pp", "3")
    assert code == 2
    assert "do not split the model's 4 layers evenly" in err


def test_vpp_needs_a_pipeline(capsys):
    code, err = run_demo(capsys, "--pp", "1", "--vpp", "2")
    assert code == 2
    assert "virtual pipeline stages need --pp >= 2" in err


def test_samples_must_split_into_groups_and_replicas(capsys):
    code, err = run_demo(capsys, "--samples", "10", "--group-size", "4")
    assert code == 2
    assert "--samples a multiple of --group-size" in err


def test_every_problem_is_reported_at_once():
    with pytest.raises(DemoConfigError) as info:
        validate(DemoConfig(ep=3, pp=3, trainer_procs=2), check_environment=False)
    assert len(info.value.problems) == 4, info.value.problems


def test_missing_vllm_stops_early_and_says_how_to_install(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(demo_config.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    code, err = run_demo(capsys)
    assert code == 2
    assert "vLLM is not installed in" in err
    assert "nox -s demo" in err

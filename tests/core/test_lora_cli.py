"""``moe-lora-plugins convert``: PEFT directory -> engine formats and Megatron names, and back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_lora_plugins.cli import main
from moe_lora_plugins.lora.convert import megatron_to_peft
from moe_lora_plugins.lora.families import ModelDims
from moe_lora_plugins.lora.formats import read_peft_dir, write_peft_dir

REPO = Path(__file__).resolve().parents[2]

HF_CONFIG = {
    "model_type": "qwen3_moe",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 4,
    "hidden_size": 16,
    "num_experts": 2,
    "num_hidden_layers": 1,
    "moe_intermediate_size": 6,
    "intermediate_size": 24,
}


def _peft_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    megatron = {}
    for e in range(2):
        p = f"decoder.layers.0.mlp.experts.local_experts.{e}"
        megatron[f"{p}.linear_fc1.adapter.linear_in.weight"] = torch.randn(2, 16, generator=g)
        megatron[f"{p}.linear_fc1.adapter.linear_out.weight"] = torch.randn(12, 2, generator=g)
        megatron[f"{p}.linear_fc2.adapter.linear_in.weight"] = torch.randn(2, 6, generator=g)
        megatron[f"{p}.linear_fc2.adapter.linear_out.weight"] = torch.randn(16, 2, generator=g)
    adapter = megatron_to_peft(megatron, "qwen3_moe", ModelDims.from_hf_config(HF_CONFIG), alpha=4)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    return write_peft_dir(adapter, tmp_path / "peft"), adapter, megatron


def test_convert_to_3d_writes_fused_expert_tensors(tmp_path, capsys):
    src, _, _ = _peft_dir(tmp_path)
    rc = main(
        [
            "convert",
            str(src),
            str(tmp_path / "v3d"),
            "--to",
            "vllm_3d",
            "--hf-config",
            str(tmp_path / "config.json"),
        ]
    )
    tensors, config = read_peft_dir(tmp_path / "v3d")
    assert rc == 0 and config["r"] == 2
    assert tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (4, 16)
    assert "distinct bytes" in capsys.readouterr().out


def test_convert_to_megatron_and_back_is_identity(tmp_path):
    src, adapter, megatron = _peft_dir(tmp_path)
    cfg = str(tmp_path / "config.json")
    assert main(["convert", str(src), str(tmp_path / "mg"), "--to", "megatron", "--hf-config", cfg]) == 0
    mg_tensors, _ = read_peft_dir(tmp_path / "mg")
    assert sorted(mg_tensors) == sorted(megatron)
    args = [
        "convert",
        str(tmp_path / "mg" / "adapter_model.safetensors"),
        str(tmp_path / "back"),
        "--from",
        "megatron",
    ]
    assert main([*args, "--alpha", "4", "--hf-config", cfg]) == 0
    back, _ = read_peft_dir(tmp_path / "back")
    assert sorted(back) == sorted(adapter.tensors)
    assert all(torch.equal(back[n], adapter.tensors[n]) for n in back)


# --- bad input: exit 2, one line naming the value and the fix, nothing written -----------------------


def _run_cli(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """The command line in a fresh interpreter, as a user runs it (``prelude`` runs first)."""
    code = f"{prelude}\nfrom moe_lora_plugins.cli import main\nraise SystemExit(main({args!r}))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _assert_refused(proc: subprocess.CompletedProcess, out_dir: Path, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-lora-plugins convert: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out_dir.exists(), "nothing may be written for bad input"


def _with_config(tmp_path: Path, config) -> str:
    path = tmp_path / "bad-config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    "case,needles",
    [
        ("missing-dir", ["no-such-dir", "is not a directory", "PEFT adapter directory"]),
        ("malformed-config", ["is not valid JSON", "config.json"]),
        ("list-config", ["holds a JSON list, not an object"]),
        ("empty-config", ["num_attention_heads=None", "positive integer"]),
        ("expert-tp-0", ["--expert-tp 0 must be 1 or more"]),
        ("expert-tp-negative", ["--expert-tp -1 must be 1 or more"]),
        ("tp-not-dividing", ["--tp 3 does not divide num_attention_heads=4"]),
        ("alpha-negative", ["--alpha -1.0 must be a positive number"]),
        ("wrong-shapes", ["experts.0.down_proj", "(out, in) = (16, 6)", "(16, 8)", "is --hf-config the adapter's base model?"]),
        ("dora", ["use_dora=true", "use_dora=false"]),
        ("fan-in-fan-out", ["fan_in_fan_out=true"]),
        ("unknown-family", ["no LoRA naming table for 'gpt2'"]),
    ],
)
def test_bad_convert_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case, needles):
    src, _, _ = _peft_dir(tmp_path)
    cfg = str(tmp_path / "config.json")
    out = tmp_path / "out"
    source, extra = str(src), []
    if case == "missing-dir":
        source = str(tmp_path / "no-such-dir")
    elif case == "malformed-config":
        cfg = _with_config(tmp_path, "{not json")
    elif case == "list-config":
        cfg = _with_config(tmp_path, [1, 2])
    elif case == "empty-config":
        cfg = _with_config(tmp_path, {})
    elif case == "expert-tp-0":
        extra = ["--expert-tp", "0"]
    elif case == "expert-tp-negative":
        extra = ["--expert-tp", "-1"]
    elif case == "tp-not-dividing":
        extra = ["--tp", "3"]
    elif case == "alpha-negative":
        extra = ["--alpha", "-1"]
    elif case == "wrong-shapes":
        cfg = _with_config(tmp_path, {**HF_CONFIG, "moe_intermediate_size": 8})
    elif case in ("dora", "fan-in-fan-out"):
        key = "use_dora" if case == "dora" else "fan_in_fan_out"
        config = json.loads((src / "adapter_config.json").read_text())
        (src / "adapter_config.json").write_text(json.dumps({**config, key: True}))
    elif case == "unknown-family":
        cfg = _with_config(tmp_path, {**HF_CONFIG, "model_type": "gpt2"})
    proc = _run_cli(["convert", source, str(out), "--to", "vllm_2d", "--hf-config", cfg, *extra])
    _assert_refused(proc, out, *needles)


def test_convert_without_torch_names_the_extra_to_install(tmp_path):
    src, _, _ = _peft_dir(tmp_path)
    out = tmp_path / "out"
    proc = _run_cli(["convert", str(src), str(out), "--hf-config", str(tmp_path / "config.json")],
                    prelude="import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None")
    _assert_refused(proc, out, "pip install 'moe-lora-plugins[torch]'")

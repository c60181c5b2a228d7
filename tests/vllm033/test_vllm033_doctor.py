"""`moe-lora-plugins doctor` on a vLLM 0.33.0 install: the patches whose target was found unchanged on
0.33 show `pending` or `applied` with a matching fingerprint, never `incompatible`; the index -1
backports read `superseded` (0.33 carries the fix) and the true-on-policy engine patches `unsupported`
while that mode is off, so `doctor --strict` passes; with the mode on they are `incompatible` and it
fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

WIDENED = ("vllm.tensor_lora_requests", "vllm.cpu_moe_lora_experts")
RETIRED = (
    "vllm.lora_index_minus_one.bgmv_shrink",
    "vllm.lora_index_minus_one.bgmv_expand",
    "vllm.lora_index_minus_one.bgmv_expand_slice",
)


def _doctor(*flags: str, **extra_env: str) -> subprocess.CompletedProcess:
    script = (
        "import moe_lora_plugins, sys\n"
        "moe_lora_plugins.activate()\n"
        "from moe_lora_plugins.cli import main\n"
        f"sys.exit(main(['doctor', *{list(flags)!r}]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**env, **extra_env}, timeout=900
    )


def _doctor_rows(**extra_env: str) -> dict[str, dict]:
    out = _doctor("--json", **extra_env)
    start = out.stdout.index("{")
    report = json.loads(out.stdout[start:])
    return {row["id"]: row for row in report["patches"]}


def test_doctor_shows_the_widened_vllm_patches_pending_or_applied_on_0_33():
    rows = _doctor_rows()
    for patch_id in WIDENED:
        row = rows[patch_id]
        assert row["installed"] == "0.33.0", row
        assert row["status"] in ("pending", "applied"), row
        assert row["resolvable"] is True and row["fingerprint_ok"] is True, row
    for patch_id in RETIRED:
        # Out of range and fixed upstream: never applied, and not a failure.
        assert rows[patch_id]["in_range"] is False, rows[patch_id]
        assert rows[patch_id]["status"] == "superseded", rows[patch_id]
        assert "carries the fix itself" in rows[patch_id]["detail"], rows[patch_id]
    on_policy = [patch_id for patch_id in rows if patch_id.startswith("vllm.onpolicy_")]
    assert on_policy
    for patch_id in on_policy:
        assert rows[patch_id]["status"] == "unsupported", rows[patch_id]


def test_doctor_strict_passes_on_0_33_unless_true_on_policy_mode_is_asked_for():
    plain = _doctor("--strict")
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-2000:]
    asked = _doctor("--strict", MOELORA_TRUE_ON_POLICY="1")
    assert asked.returncode == 1, asked.stdout[-2000:] + asked.stderr[-2000:]
    assert "vllm.onpolicy_linear" in asked.stderr and "lora_index_minus_one" not in asked.stderr.split("failing")[-1]

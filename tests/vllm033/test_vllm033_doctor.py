"""`moe-lora-plugins doctor` on a vLLM 0.33.0 install: the patches whose target was found unchanged on
0.33 show `pending` or `applied` with a matching fingerprint, never `incompatible`; the index -1
backports are out of range there and never applied."""

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


def _doctor_rows() -> dict[str, dict]:
    script = (
        "import moe_lora_plugins, sys\n"
        "moe_lora_plugins.activate()\n"
        "from moe_lora_plugins.cli import main\n"
        "sys.exit(main(['doctor', '--json']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
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
        # Out of range: never applied (the registry marks it incompatible once the ops module is imported).
        assert rows[patch_id]["in_range"] is False, rows[patch_id]
        assert rows[patch_id]["status"] in ("pending", "incompatible"), rows[patch_id]

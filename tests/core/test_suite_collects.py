"""A plain ``pytest`` at the repository root collects every lane's tests in any interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import lane_skip_reason

REPO = Path(__file__).resolve().parents[2]


def test_plain_pytest_at_the_root_collects_without_errors():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    collected = {line.split("/")[1] for line in out.stdout.splitlines() if line.startswith("tests/")}
    assert {"core", "contract", "megatron", "vllm", "sglang", "e2e"} <= collected


@pytest.mark.parametrize("folder", ["megatron", "vllm", "sglang", "e2e"])
def test_a_lane_folder_is_skipped_with_its_lane_named_only_where_its_package_is_missing(folder):
    reason = lane_skip_reason(folder, lane=None)
    if reason is not None:
        assert reason.startswith("needs ") and f"nox -s {folder}" in reason
    assert lane_skip_reason(folder, lane=folder) is None, "inside its own lane a missing package must fail, not skip"
    assert lane_skip_reason("core", lane=None) is None

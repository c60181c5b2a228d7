"""Every built-in PatchSpec against a generated stand-in of its target, each case in a fresh process.

The stand-in module has the spec's target path and fingerprint and a distribution version inside
(or outside) the declared range, so the registry mechanics are checked for every spec on any CPU;
the host lanes run the same cases against the real packages.
"""

from __future__ import annotations

import pytest

from moe_lora_plugins.patches import all_specs
from moe_lora_plugins.registry import MODES
from moe_lora_plugins.testing.contract import is_module_level, make_standin_site, run_case

SPECS = all_specs()
MODULE_LEVEL = [s for s in SPECS if is_module_level(s)]
# Every required symbol of every spec, logged; the first of each spec under MOELORA_STRICT too.
REQUIRING = [(s, symbol, False) for s in SPECS for symbol in s.requires]
REQUIRING += [(s, s.requires[0], True) for s in SPECS if s.requires]


def _ids(spec):
    return spec.id


def _check(result):
    assert "error" not in result, result["error"] + "\n" + result["stderr"]
    return result


@pytest.fixture
def site(tmp_path, spec):
    return make_standin_site(tmp_path, spec)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_import_then_apply_replaces_the_symbol_and_keeps_the_original(spec, site):
    r = _check(run_case(spec.id, "import_then_apply", site=site))
    assert (r["status"], r["replaced"], r["original_kept"]) == ("applied", True, True)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_apply_then_import_waits_for_the_import_and_never_imports_the_target_itself(spec, site):
    r = _check(run_case(spec.id, "apply_then_import", site=site))
    assert r["status_before_import"] == "pending"
    assert r["target_imported_by_apply"] is False
    assert (r["status"], r["replaced"]) == ("applied", True)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_applying_twice_is_a_no_op(spec, site):
    r = _check(run_case(spec.id, "apply_twice", site=site))
    assert (r["status"], r["same_object"], r["wraps_original_directly"]) == ("applied", True, True)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_apply_revert_apply_restores_exactly_and_applies_again(spec, site):
    r = _check(run_case(spec.id, "apply_revert_apply", site=site))
    assert (r["status_after_revert"], r["restored"]) == ("reverted", True)
    assert (r["status"], r["replaced"]) == ("applied", True)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_revert_without_apply_changes_nothing(spec, site):
    r = _check(run_case(spec.id, "revert_without_apply", site=site))
    assert (r["status_before"], r["status"], r["untouched"]) == ("not-activated", "not-activated", True)


@pytest.mark.parametrize("strict", [False, True], ids=["logged", "strict"])
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_out_of_range_version_is_never_applied_and_is_loud(spec, strict, tmp_path):
    """Loud when it matters: a patch serving an opt-in mode is checked with that mode switched on."""
    out_site = make_standin_site(tmp_path, spec, in_range=False)
    mode_on = {MODES[spec.mode]: "1"} if spec.mode else None
    r = _check(run_case(spec.id, "out_of_range", site=out_site, strict=strict, extra_env=mode_on))
    assert (r["status"], r["untouched"]) == ("incompatible", True)
    assert r["raised"] == ("IncompatibleVersionError" if strict else None)
    assert spec.versions in r["detail"]
    if not strict:
        assert "outside the supported range" in r["stderr"]  # logged at ERROR, visible without config


@pytest.mark.parametrize("strict", [False, True], ids=["logged", "strict"])
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_missing_symbol_is_reported_with_what_moved(spec, strict, tmp_path):
    nosym_site = make_standin_site(tmp_path, spec, with_symbol=False)
    r = _check(run_case(spec.id, "missing_symbol", site=nosym_site, strict=strict))
    assert r["status"] == "missing-symbol"
    assert r["raised"] == ("MissingSymbolError" if strict else None)
    assert spec.target_path in r["detail"]


def test_the_specs_that_reach_private_upstream_members_declare_them():
    declared = {s.id: s.requires for s in SPECS}
    assert "vllm.lora.worker_manager:WorkerLoRAManager#_adapter_manager" in declared["vllm.tensor_lora_requests"]
    assert ("megatron.bridge.models.conversion.model_bridge:_get_pp_group"
            in declared["megatron_bridge.local_name_to_global"])
    assert any(r.endswith("._merge_single_adapter_weight")
               for r in declared["megatron_bridge.merge_expert_adapters_per_owner"])


@pytest.mark.parametrize(("spec", "symbol", "strict"), REQUIRING,
                         ids=[f"{s.id}-{r}-{'strict' if strict else 'logged'}" for s, r, strict in REQUIRING])
def test_a_missing_required_symbol_leaves_the_patch_unapplied_and_is_loud(spec, symbol, strict, tmp_path):
    site = make_standin_site(tmp_path, spec, omit_required=symbol)
    r = _check(run_case(spec.id, "missing_required", site=site, strict=strict))
    assert (r["status"], r["untouched"]) == ("missing-symbol", True)
    assert r["raised"] == ("MissingSymbolError" if strict else None)
    assert f"relies on {symbol}" in r["detail"]
    if not strict:
        assert f"relies on {symbol}" in r["stderr"]  # logged at ERROR


@pytest.mark.parametrize("strict", [False, True], ids=["logged", "strict"])
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_signature_drift_is_never_applied(spec, strict, tmp_path):
    drift_site = make_standin_site(tmp_path, spec, signature="(moelora_unexpected, *args, **kwargs)")
    r = _check(run_case(spec.id, "drift", site=drift_site, strict=strict))
    assert (r["status"], r["untouched"]) == ("drift", True)
    assert r["raised"] == ("SignatureDriftError" if strict else None)
    assert spec.fingerprint in r["detail"]


@pytest.mark.parametrize("spec", MODULE_LEVEL, ids=_ids)
def test_stale_from_import_copies_are_rebound_and_restored(spec, site):
    r = _check(run_case(spec.id, "stale_copy", site=site))
    assert (r["status"], r["copy_rebound"], r["copy_restored"]) == ("applied", True, True)


MODE_SPECS = [s for s in SPECS if s.mode]
SUPERSEDED_SPECS = [s for s in SPECS if s.superseded_from]


@pytest.mark.parametrize("spec", MODE_SPECS, ids=_ids)
def test_out_of_range_mode_patch_is_unsupported_and_quiet_while_its_mode_is_off(spec, tmp_path):
    out_site = make_standin_site(tmp_path, spec, in_range=False)
    r = _check(run_case(spec.id, "out_of_range", site=out_site, strict=True))
    assert (r["status"], r["untouched"], r["raised"]) == ("unsupported", True, None)
    assert f"{spec.mode} mode cannot be used" in r["detail"]


@pytest.mark.parametrize("spec", SUPERSEDED_SPECS, ids=_ids)
def test_a_version_that_carries_the_fix_reads_superseded_even_under_strict(spec, tmp_path):
    fixed_site = make_standin_site(tmp_path, spec, in_range=False, version=spec.superseded_from)
    r = _check(run_case(spec.id, "out_of_range", site=fixed_site, strict=True))
    assert (r["status"], r["untouched"], r["raised"]) == ("superseded", True, None)
    assert "carries the fix itself" in r["detail"]


def test_the_matrix_covers_both_retirement_kinds():
    assert MODE_SPECS and SUPERSEDED_SPECS

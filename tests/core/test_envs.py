"""The MOELORA_* switches: accepted values, defaults, and errors that name the variable."""

from __future__ import annotations

import pytest

from moe_lora_plugins.envs import SWITCHES, is_switched_on, load_settings
from moe_lora_plugins.errors import SettingsError


@pytest.mark.parametrize("value", ["1", "on", "ON", " true ", "yes"])
def test_switch_on_values(value):
    assert is_switched_on({"MOELORA_PLUGINS": value})


@pytest.mark.parametrize("value", ["", "0", "off", "False", "no"])
def test_switch_off_values(value):
    assert not is_switched_on({"MOELORA_PLUGINS": value})


def test_switch_unset_is_off():
    assert not is_switched_on({})
    assert load_settings({}) == load_settings({"MOELORA_PLUGINS": "off"})


@pytest.mark.parametrize("name", ["MOELORA_PLUGINS", "MOELORA_STRICT", "MOELORA_DEBUG"])
def test_malformed_boolean_names_the_variable_and_the_accepted_values(name):
    with pytest.raises(SettingsError, match=rf"{name}='enabled' is not an on/off value\. Accepted: 1, on"):
        load_settings({name: "enabled"})


def test_lists_are_split_trimmed_and_deduplicated():
    s = load_settings({"MOELORA_DISABLED_PATCHES": " a, b,,a ", "MOELORA_REQUIRE": "c"})
    assert s.disabled_patches == ("a", "b")
    assert s.require == ("c",)


def test_patches_all_means_no_allow_list():
    assert load_settings({"MOELORA_PATCHES": "all"}).patches is None
    assert load_settings({"MOELORA_PATCHES": "x,y"}).patches == ("x", "y")


def test_deny_list_wins_over_allow_list():
    s = load_settings({"MOELORA_PATCHES": "x,y", "MOELORA_DISABLED_PATCHES": "y"})
    assert (s.patch_enabled("x"), s.patch_enabled("y"), s.patch_enabled("z")) == (True, False, False)


def test_unknown_ids_are_rejected_when_the_known_ids_are_given():
    with pytest.raises(SettingsError, match=r"MOELORA_PATCHES names unknown patch id\(s\) \['nope'\]"):
        load_settings({"MOELORA_PATCHES": "nope"}, known_patch_ids=frozenset({"real"}))


def test_requiring_a_disabled_patch_is_a_contradiction():
    with pytest.raises(SettingsError, match="MOELORA_REQUIRE names \\['real'\\], but"):
        load_settings(
            {"MOELORA_REQUIRE": "real", "MOELORA_DISABLED_PATCHES": "real"}, known_patch_ids=frozenset({"real"})
        )


def test_every_switch_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [s.name for s in SWITCHES if f"`{s.name}`" not in readme]
    assert missing == []


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "lots"])
def test_merge_block_mib_refuses_what_is_not_a_whole_number_naming_it_and_the_fix(value):
    from moe_lora_plugins.envs import parse_merge_block_mib
    from moe_lora_plugins.errors import SettingsError

    with pytest.raises(SettingsError, match=rf"MOELORA_MERGE_BLOCK_MIB='{value}' is not a whole number >= 1\. Set it"):
        parse_merge_block_mib(value)


def test_merge_block_mib_unset_or_blank_is_the_default_and_a_number_is_taken():
    from moe_lora_plugins.envs import parse_merge_block_mib

    assert parse_merge_block_mib(None) is None and parse_merge_block_mib("  ") is None
    assert parse_merge_block_mib(" 512 ") == 512

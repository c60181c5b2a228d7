"""The plugin manager: entry-point autoload, block list, misspelled hook names, export chaining."""

from __future__ import annotations

import pytest

from moe_lora_plugins.envs import load_settings
from moe_lora_plugins.errors import PluginError
from moe_lora_plugins.hooks import hookimpl
from moe_lora_plugins.hooks.context import ExportContext
from moe_lora_plugins.hooks.manager import chain_export_weights, new_plugin_manager

from .fixture_site import build_fixture_site
from .pyrun import run_python


class Misspelled:
    @hookimpl
    def on_build_modle(self, model_chunks, provider, role, config):  # noqa: D401 - misspelled on purpose
        pass


class Upper:
    @hookimpl
    def on_export_weights(self, weights, context):
        return ((name.upper(), t) for name, t in weights)


class Counter:
    def __init__(self):
        self.seen = 0

    @hookimpl
    def on_export_weights(self, weights, context):
        for item in weights:
            self.seen += 1
            yield item


class PassThrough:
    @hookimpl
    def on_export_weights(self, weights, context):
        return None


def test_misspelled_hook_name_is_an_error_that_lists_the_known_hooks():
    with pytest.raises(PluginError, match="on_build_modle") as info:
        new_plugin_manager(load_settings({}), builtin=[("bad", f"{__name__}:Misspelled")], autoload=False)
    assert "on_build_model" in str(info.value)


def test_export_hooks_are_chained_in_call_order_and_none_passes_through(monkeypatch):
    pm = new_plugin_manager(load_settings({}), builtin=(), autoload=False)
    counter = Counter()
    pm.register(Upper(), name="upper")
    pm.register(PassThrough(), name="pass")
    pm.register(counter, name="counter")
    out = list(chain_export_weights(pm, iter([("a", 1), ("b", 2)]), ExportContext(kind="adapter")))
    assert out == [("A", 1), ("B", 2)]
    assert counter.seen == 2


def test_entry_point_plugins_are_loaded_and_can_be_blocked(tmp_path):
    site = build_fixture_site(tmp_path)
    code = """
        import json
        from moe_lora_plugins.envs import load_settings
        from moe_lora_plugins.hooks.manager import loaded_plugin_names, new_plugin_manager
        pm = new_plugin_manager(load_settings())
        print("RESULT " + json.dumps(loaded_plugin_names(pm)))
    """
    loaded, proc = run_python(code, site=site)
    assert loaded is not None and "fixture" in loaded, proc.stderr
    blocked, proc = run_python(code, site=site, env={"MOELORA_BLOCKED_PLUGINS": "fixture"})
    assert blocked is not None and "fixture" not in blocked, proc.stderr


def test_debug_switch_traces_hook_calls(tmp_path):
    site = build_fixture_site(tmp_path)
    result, proc = run_python(
        """
        import json, moe_lora_plugins
        moe_lora_plugins.activate(role="trainer")
        print("RESULT " + json.dumps(True))
        """,
        site=site,
        env={"MOELORA_DEBUG": "1"},
    )
    assert result is True
    assert "moelora_activate [hook]" in proc.stderr
    assert "role: trainer" in proc.stderr


def test_a_hooked_stream_closes_like_upstreams_generator_so_an_abandoned_export_runs_its_cleanup():
    from moe_lora_plugins.hooks.streams import HookedStream

    cleaned: list[str] = []

    def export():
        try:
            yield ("a", 1)
            yield ("b", 2)
        finally:
            cleaned.append("export cleanup")

    stream = HookedStream(export(), ExportContext(kind="full"))
    assert next(stream) == ("a", 1)
    stream.close()
    assert cleaned == ["export cleanup"]
    with pytest.raises(StopIteration):
        next(stream)
    HookedStream(iter([("a", 1)]), ExportContext(kind="full")).close()  # a plain iterator: nothing to close

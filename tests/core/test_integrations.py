"""Host seams: the Ray runtime_env helper, the slime/miles init path, the engine entry points."""

from __future__ import annotations

import pytest

from moe_lora_plugins.integrations.ray import SETUP_HOOK, runtime_env

from .fixture_site import build_fixture_site
from .pyrun import run_python


def test_ray_runtime_env_switches_on_forwards_our_switches_and_keeps_the_callers_values():
    env = runtime_env(
        {"pip": ["x"], "env_vars": {"MOELORA_STRICT": "0", "OTHER": "1"}},
        role="rollout",
        environ={"MOELORA_STRICT": "1", "MOELORA_STATUS_DIR": "/tmp/s", "HOME": "/root"},
    )
    assert env["pip"] == ["x"]
    assert env["worker_process_setup_hook"] == SETUP_HOOK
    assert env["env_vars"] == {
        "MOELORA_PLUGINS": "on",
        "MOELORA_ROLE": "rollout",
        "MOELORA_STRICT": "0",
        "MOELORA_STATUS_DIR": "/tmp/s",
        "OTHER": "1",
    }


def test_ray_runtime_env_refuses_to_replace_someone_elses_setup_hook():
    with pytest.raises(ValueError, match="already has worker_process_setup_hook='theirs.hook'"):
        runtime_env({"worker_process_setup_hook": "theirs.hook"})


@pytest.mark.parametrize(
    "call,env,expected",
    [
        ("from moe_lora_plugins.integrations.ray import setup_worker as f; f()", {"MOELORA_ROLE": "learner"}, "learner"),
        ("from moe_lora_plugins.integrations.megatron_init import init as f; f(object())", {}, "trainer"),
        ("from moe_lora_plugins.integrations.vllm import load_general_plugin as f; f()", {"MOELORA_PLUGINS": "on"}, "vllm"),
        ("from moe_lora_plugins.integrations.vllm import load_general_plugin as f; f()", {}, None),
        ("from moe_lora_plugins.integrations.sglang import load_plugin as f; f()", {"MOELORA_PLUGINS": "1"}, "sglang"),
        ("from moe_lora_plugins.integrations.sglang import load_plugin as f; f()", {"MOELORA_PLUGINS": "0"}, None),
    ],
)
def test_each_seam_activates_with_its_role_and_patches_apply(call, env, expected, tmp_path):
    site = build_fixture_site(tmp_path)
    result, proc = run_python(
        f"""
        import json
        {call}
        from moe_lora_plugins.activation import current
        import moelora_fixture_target.core as t
        state = current()
        print("RESULT " + json.dumps([None if state is None else state.role, t.compute(1)]))
        """,
        site=site,
        env=env,
        no_site=True,
    )
    assert result == [expected, 12 if expected else 2], proc.stderr


def test_no_vllm_worker_method_shares_a_name_with_a_hook_spec():
    """vLLM mixes the extension into its worker: a method named like a hook would read as that hook."""
    import ast
    import inspect
    from pathlib import Path

    import moe_lora_plugins.hooks.hookspec as hookspec
    import moe_lora_plugins.integrations as integrations

    hooks = {name for name, fn in vars(hookspec).items() if inspect.isfunction(fn) and hasattr(fn, "moelora_spec")}
    assert "moelora_activate" in hooks and "on_build_model" in hooks, sorted(hooks)
    # Read, not imported: importing the extension activates the suite in this process.
    worker_source = (Path(integrations.__file__).parent / "vllm_worker.py").read_text()
    extension = next(node for node in ast.walk(ast.parse(worker_source))
                     if isinstance(node, ast.ClassDef) and node.name == "MoeLoraWorkerExtension")
    methods = {node.name for node in extension.body if isinstance(node, ast.FunctionDef)}
    assert "moelora_swap_adapter" in methods
    assert methods & hooks == set()

"""A fake installed world for registry tests: a target distribution and a third-party plugin.

``build_fixture_site(root, target_version)`` writes, under ``root``:
- ``moelora_fixture_target`` (distribution ``moelora-fixture-target``): a module function, a
  class whose method is inherited from a base, a classmethod and a staticmethod;
- ``moelora_fixture_plugin``: a plugin registered in the ``moelora.plugins`` entry-point group whose
  ``moelora_patch_specs`` hook contributes one PatchSpec per kind of target, and whose
  implementations change results observably (so a test can tell patched from original).
"""

from __future__ import annotations

from pathlib import Path

from moe_lora_plugins.testing.contract import write_distribution, write_module

TARGET = '''
"""Fixture target module."""


def compute(x, y=1):
    return x + y


class Base:
    def scale(self, x):
        return x * 2


class Child(Base):
    @classmethod
    def make(cls, n):
        return ("made", n)

    @staticmethod
    def helper(a, b=0):
        return a - b
'''

CONSUMER = '''
"""Fixture consumer that copies the function at import time (the stale from-import case)."""

from moelora_fixture_target.core import compute
'''

PLUGIN = '''
"""Fixture third-party plugin contributing PatchSpecs."""

from moe_lora_plugins.hooks import hookimpl
from moe_lora_plugins.registry import PatchSpec

COMMON = dict(
    distribution="moelora-fixture-target",
    versions=">=1.0,<2",
    target="moelora_fixture_target.core",
    why="fixture",
    upstream="none",
    remove_when="never",
)


def add_ten(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs) + 10


def scale_by_three(self, x):
    return x * 3


def make_patched(cls, n):
    return ("patched", n)


def helper_patched(a, b=0):
    return a + b


@hookimpl
def moelora_patch_specs():
    return [
        PatchSpec(id="fixture.compute", attribute="compute", kind="wrap",
                  implementation="moelora_fixture_plugin:add_ten", fingerprint="(x, y=)",
                  aliases=("moelora_fixture_consumer:compute",), **COMMON),
        PatchSpec(id="fixture.inherited", attribute="Child.scale", kind="replace",
                  implementation="moelora_fixture_plugin:scale_by_three", fingerprint="(self, x)", **COMMON),
        PatchSpec(id="fixture.classmethod", attribute="Child.make", kind="replace",
                  implementation="moelora_fixture_plugin:make_patched", fingerprint="(cls, n)", **COMMON),
        PatchSpec(id="fixture.staticmethod", attribute="Child.helper", kind="wrap",
                  implementation="moelora_fixture_plugin:add_ten", fingerprint="(a, b=)", **COMMON),
    ]
'''


def build_fixture_site(root: Path, target_version: str = "1.4.0") -> Path:
    site = root / f"fixture-site-{target_version}"
    write_module(site, "moelora_fixture_target.core", TARGET)
    (site / "moelora_fixture_target" / "__init__.py").write_text("")
    write_module(site, "moelora_fixture_consumer", CONSUMER)
    write_module(site, "moelora_fixture_plugin", PLUGIN)
    write_distribution(site, "moelora-fixture-target", target_version)
    write_distribution(
        site, "moelora-fixture-plugin", "0.1", entry_points="[moelora.plugins]\nfixture = moelora_fixture_plugin\n"
    )
    return site

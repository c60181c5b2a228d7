"""pytest plugin loaded by compare.py (``-p harness``) into both runs of upstream's own unit tests.

Megatron-Bridge 0.6 imports Transformer Engine unconditionally, so the CPU stand-in of
moe_lora_plugins.testing.megatron_cpu is installed when pytest loads this plugin: before upstream's
conftest or any test module imports Megatron-Bridge, in the run without the suite and the run with
it alike.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.bridge") is not None:
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()

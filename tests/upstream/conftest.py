"""Harness for upstream's own unit tests (tests/upstream/<package>/, copied from upstream, see README.md).

They are collected only when tests/upstream/compare.py runs them (MOELORA_UPSTREAM_RUN=1): a plain
`pytest` elsewhere skips this folder. Megatron-Bridge 0.6 imports Transformer Engine unconditionally,
so the CPU stand-in of moe_lora_plugins.testing.megatron_cpu is installed first, in both runs alike.
"""

from __future__ import annotations

import importlib.util
import os

if os.environ.get("MOELORA_UPSTREAM_RUN") != "1":
    collect_ignore_glob = ["*"]
elif importlib.util.find_spec("megatron.bridge") is not None:
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()

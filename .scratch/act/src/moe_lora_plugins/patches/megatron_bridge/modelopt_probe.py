"""Patch: Megatron-Bridge's "is this a modelopt DynamicModule?" check imports modelopt once, not per call.

``megatron.bridge.models.conversion.utils.is_modelopt_dynamic_module`` runs ``from modelopt... import
DynamicModule`` on every call and answers ``False`` on ``ImportError``. Without modelopt installed
(the usual RL trainer) each call is a failed import, a scan of every ``sys.path`` entry, and every
export calls it once per auto-mapped conversion task. On the anchor model (2 x H200) the patched
plain export went from 0.90x to 0.63x upstream's time with this patch (benchmarks/RESULTS-export.md). The replacement gives the same answers and remembers the failed
import; it tries again only once some ``modelopt`` module has been imported since.
"""

from __future__ import annotations

import sys
from typing import Any

from moe_lora_plugins.registry import PatchSpec

SPECS = (
    PatchSpec(
        id="megatron_bridge.modelopt_probe_once",
        distribution="megatron-bridge",
        versions=">=0.6,<0.7",
        target="megatron.bridge.models.conversion.utils",
        attribute="is_modelopt_dynamic_module",
        kind="replace",
        implementation="moe_lora_plugins.patches.megatron_bridge.modelopt_probe:is_modelopt_dynamic_module",
        fingerprint="(module)",
        why=(
            "Without modelopt installed, every conversion task of every export retries a failed "
            "`import modelopt`, a scan of sys.path: about a quarter of a plain export's time, on every rank."
        ),
        upstream="Megatron-Bridge 0.6.2 models/conversion/utils.is_modelopt_dynamic_module",
        remove_when="Megatron-Bridge caches the modelopt import (or checks sys.modules first)",
        aliases=("megatron.bridge.models.conversion.param_mapping:is_modelopt_dynamic_module",),
        verified="megatron-bridge 0.6.2: same answers for plain modules; CPU tests count the failed modelopt "
        "lookups of one export (upstream: one per task; patched: none after the first); 2xH200 anchor "
        "benchmark.",
    ),
)

_UNKNOWN = object()
_dynamic_module: Any = _UNKNOWN  # modelopt's DynamicModule class, None when it cannot be imported


def _dynamic_module_class() -> Any:
    global _dynamic_module
    if _dynamic_module is _UNKNOWN or (_dynamic_module is None and "modelopt" in sys.modules):
        try:
            from modelopt.torch.opt.dynamic import DynamicModule
        except ImportError:
            _dynamic_module = None
        else:
            _dynamic_module = DynamicModule
    return _dynamic_module


def is_modelopt_dynamic_module(module: Any) -> bool:
    """Whether ``module`` is a modelopt ``DynamicModule`` (``False`` when modelopt is not installed)."""
    cls = _dynamic_module_class()
    return cls is not None and isinstance(module, cls)

"""Merge-on-export: ``W + (alpha / r) * B @ A`` per tensor while weights stream to an engine.

``math`` holds the one-tensor arithmetic (float32, cast to the export dtype, fused gate/up and
per-expert helpers); ``stream`` folds an adapter table into a stream of base weights;
``bridge_export`` drives both exports of a Megatron-Bridge model. Nothing here mutates a parameter or
keeps a copy of the model.
"""

from moe_lora_plugins.merge.math import (
    MergeShapeError,
    expert_factor,
    fused_row_blocks,
    lora_scale,
    merged_weight,
)
from moe_lora_plugins.merge.stream import AdapterTable, MergeStreamError, merge_weight_stream, module_key

__all__ = [
    "AdapterTable",
    "MergeShapeError",
    "MergeStreamError",
    "expert_factor",
    "fused_row_blocks",
    "lora_scale",
    "merge_weight_stream",
    "merged_weight",
    "module_key",
]

"""The context object handed to ``on_export_weights`` implementations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ExportContext:
    """Which export is streaming, from which model and rank, under which layout.

    ``kind`` is ``"full"`` (plain weights), ``"merged"`` (W + scale * B @ A) or ``"adapter"``
    (LoRA tensors only). ``layout`` maps parallel sizes and ranks (``pp``, ``vpp``, ``ep``, ``etp``,
    ``tp`` and ``*_rank``); ``extra`` is for plugin-to-plugin data (audit reports, byte counts).
    """

    kind: Literal["full", "merged", "adapter"]
    model: Any = None
    bridge: Any = None
    layout: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

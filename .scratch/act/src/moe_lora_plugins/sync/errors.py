"""Errors of an adapter sync; each says what was wrong, with the values, and what to do."""

from __future__ import annotations

from moe_lora_plugins.errors import MoeLoraError


class AdapterSyncError(MoeLoraError, RuntimeError):
    """A sync broke the protocol (duplicated or out-of-order bucket, bad header, mixed versions)."""


class IncompleteSyncError(AdapterSyncError):
    """The sync stopped before every sender's end marker arrived."""


class AdapterValidationError(MoeLoraError, ValueError):
    """A received adapter is not servable: missing or unexpected tensors, wrong shape, dtype or rank."""

    def __init__(self, problems: list[str], context: str = "") -> None:
        self.problems = list(problems)
        shown = "\n  - ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        head = f"{context}: " if context else ""
        super().__init__(
            f"{head}the adapter was rejected ({len(self.problems)} problem(s)); the adapter being served "
            f"stays active:\n  - {shown}{more}"
        )

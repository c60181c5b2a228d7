"""Checks that run on every export: each global (layer, expert, projection) exactly once, right shape."""

from moe_lora_plugins.audit.export_audit import AuditReport, ExportAudit, ExportAuditError, audited

__all__ = ["AuditReport", "ExportAudit", "ExportAuditError", "audited"]

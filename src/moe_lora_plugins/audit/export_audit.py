"""The export audit: every global (layer, expert, projection) appears exactly once with its shape.

:class:`ExportAudit` watches one rank's stream of ``(hf_name, tensor)`` items. At the end it
raises :class:`ExportAuditError` naming every duplicate, every expert missing from a group
``...experts.{0..E-1}.<projection>``, every layer missing from ``0..L-1``, and every tensor whose
shape differs from the shape expected for it (given explicitly, or shared by the other experts of
its group). It keeps only names and shapes, so it costs a few dict updates per item (names are parsed once per
process, since every export repeats them).
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.errors import MoeLoraError

_HF_EXPERT = re.compile(r"(\.experts\.)(\d+)(\.)")
_HF_LAYER = re.compile(r"(?<![A-Za-z0-9_])(layers\.)(\d+)(\.)")


@functools.lru_cache(maxsize=1 << 16)
def _parse(name: str) -> tuple[int | None, tuple[int, str] | None]:
    """``(layer, (expert, group pattern))`` of an HF name; cached, since every export repeats its names."""
    layer = _HF_LAYER.search(name)
    expert = _HF_EXPERT.search(name)
    return (
        int(layer.group(2)) if layer is not None else None,
        (int(expert.group(2)), name[: expert.start(2)] + "*" + name[expert.end(2):]) if expert is not None else None,
    )


class ExportAuditError(MoeLoraError, AssertionError):
    """An export stream has a gap, a duplicate or a wrongly shaped tensor."""


@dataclass
class AuditReport:
    """What one audited stream held."""

    kind: str
    tensors: int = 0
    nbytes: int = 0
    layers: set[int] = field(default_factory=set)
    experts: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def _shown(items: Iterable[str], limit: int = 8) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class ExportAudit:
    """Collects names and shapes of one rank's export and checks them in :meth:`finish`.

    ``num_experts`` / ``num_layers`` (when known) fix the expected ranges; ``expected_shapes``
    maps names to the shapes they must have. ``kind`` labels the report (plain, merged, adapter).
    """

    def __init__(
        self,
        kind: str,
        num_layers: int | None = None,
        num_experts: int | None = None,
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
        label: str = "",
    ) -> None:
        self.kind = kind
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.expected_shapes = dict(expected_shapes or {})
        self.label = label
        self._counts: Counter[str] = Counter()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._groups: dict[str, dict[int, tuple[int, ...]]] = defaultdict(dict)
        self.report = AuditReport(kind=kind)

    def observe(self, name: str, tensor: Any) -> None:
        shape = tuple(tensor.shape)
        self._counts[name] += 1
        self._shapes[name] = shape
        self.report.tensors += 1
        self.report.nbytes += tensor.numel() * tensor.element_size()
        layer, expert = _parse(name)
        if layer is not None:
            self.report.layers.add(layer)
        if expert is not None:
            index, group = expert
            self.report.experts.add(index)
            self._groups[group][index] = shape

    def problems(self) -> list[str]:
        problems: list[str] = []
        duplicates = [name for name, count in self._counts.items() if count > 1]
        if duplicates:
            problems.append(f"emitted more than once: {_shown(duplicates)}")
        missing_experts: list[str] = []
        unexpected_experts: list[str] = []
        shape_mismatch: list[str] = []
        for group, members in self._groups.items():
            expected_range = set(range(self.num_experts if self.num_experts else max(members) + 1))
            missing_experts += [group.replace("*", str(e)) for e in sorted(expected_range - members.keys())]
            unexpected_experts += [group.replace("*", str(e)) for e in sorted(members.keys() - expected_range)]
            common = Counter(members.values()).most_common(1)[0][0]
            shape_mismatch += [
                f"{group.replace('*', str(e))} {shape} (its group has {common})"
                for e, shape in members.items()
                if shape != common
            ]
        if missing_experts:
            problems.append(f"missing experts: {_shown(missing_experts)}")
        if unexpected_experts:
            problems.append(f"expert numbers beyond {self.num_experts} experts: {_shown(unexpected_experts)}")
        if self.num_layers is not None and self.report.layers:
            missing_layers = set(range(self.num_layers)) - self.report.layers
            extra_layers = self.report.layers - set(range(self.num_layers))
            if missing_layers:
                problems.append(f"missing layers: {sorted(missing_layers)} of 0..{self.num_layers - 1}")
            if extra_layers:
                problems.append(f"layer numbers beyond {self.num_layers} layers: {sorted(extra_layers)}")
        for name, shape in self.expected_shapes.items():
            got = self._shapes.get(name)
            if got is not None and got != tuple(shape):
                shape_mismatch.append(f"{name} {got} (expected {tuple(shape)})")
        if shape_mismatch:
            problems.append(f"wrong shapes: {_shown(shape_mismatch)}")
        return problems

    def finish(self) -> AuditReport:
        """Check everything observed; raise :class:`ExportAuditError` naming each problem."""
        self.report.problems = self.problems()
        if self.report.problems:
            where = f" ({self.label})" if self.label else ""
            raise ExportAuditError(
                f"{self.kind} export audit failed{where}: " + "; ".join(self.report.problems)
                + ". The export is incomplete or wrong for this parallel layout; report it with the layout "
                "(PP/VPP/EP/ETP/TP) and `moe-lora-plugins doctor`, or set MOELORA_EXPORT_AUDIT=off to "
                "stream anyway."
            )
        return self.report


def audited(items: Iterable[Any], audit: ExportAudit) -> Iterator[Any]:
    """Pass ``items`` (2- or 3-tuples ``(hf_name, tensor, ...)``) through, auditing them; check at the end."""
    for item in items:
        audit.observe(item[0], item[1])
        yield item
    audit.finish()

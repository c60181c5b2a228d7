"""The export audit: every global (layer, expert, projection) appears exactly once with its shape.

:class:`ExportAudit` watches one rank's stream of ``(hf_name, tensor)`` items. At the end it
raises :class:`ExportAuditError` naming every duplicate, every expert missing from a group
``...experts.{0..E-1}.<projection>``, every layer missing from ``0..L-1``, and every tensor whose
shape differs from the shape expected for it (given explicitly, or shared by the other experts of
its group). It keeps only names and shapes, so it costs a few dict updates per item (names are parsed once per
process, since every export repeats them).

The audit never breaks an export it does not understand: an item that is not ``(name, tensor, ...)``,
a tensor-like without a readable integer shape or size (whatever the tensor class: DTensor and
quantized tensors expose both), and a layer or expert count that is not a positive int (a config
without MoE fields, a mock) are passed through unchecked. What was skipped and why is kept in
``AuditReport.skipped`` and said in one log line at the end; only what was checked can fail.
"""

from __future__ import annotations

import functools
import logging
import numbers
import operator
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.errors import MoeLoraError

logger = logging.getLogger("moe_lora_plugins.audit")

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
    """What one audited stream held, and what the audit could not check (reason -> how many times)."""

    kind: str
    tensors: int = 0
    nbytes: int = 0
    layers: set[int] = field(default_factory=set)
    experts: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def _shown(items: Iterable[str], limit: int = 8) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _count_or_reason(value: Any, what: str) -> tuple[int | None, str | None]:
    """``(value, None)`` for a positive int; ``(None, why it is not used)`` otherwise (None: not given)."""
    if value is None:
        return None, None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0:
        return int(value), None
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return None, f"{what} not checked: the model config gives {type(value).__name__} {shown}, not a positive int"


def _shape(tensor: Any) -> tuple[int, ...] | None:
    """The tensor's shape as ints, or None when it has none that reads as a tuple of integers."""
    try:
        shape = tensor.shape
        if not isinstance(shape, tuple):
            return None
        return tuple(operator.index(dim) for dim in shape)
    except Exception:  # a tensor-like whose shape cannot be read is passed through unchecked
        return None


def _nbytes(tensor: Any) -> int | None:
    try:
        size = tensor.numel() * tensor.element_size()
    except Exception:  # not a torch tensor: try the numpy-style attribute
        size = getattr(tensor, "nbytes", None)
    return size if isinstance(size, numbers.Integral) and not isinstance(size, bool) else None


class ExportAudit:
    """Collects names and shapes of one rank's export and checks them in :meth:`finish`.

    ``num_experts`` / ``num_layers`` (when positive ints) fix the expected ranges; anything else
    (None, a mock, a list) leaves that range unchecked and is recorded in ``report.skipped``.
    ``expected_shapes`` maps names to the shapes they must have. ``kind`` labels the report (plain,
    merged, adapter).
    """

    def __init__(
        self,
        kind: str,
        num_layers: Any = None,
        num_experts: Any = None,
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
        label: str = "",
    ) -> None:
        self.kind = kind
        self.report = AuditReport(kind=kind)
        self.num_layers, why_layers = _count_or_reason(num_layers, "layer range")
        self.num_experts, why_experts = _count_or_reason(num_experts, "expert range")
        for reason in (why_layers, why_experts):
            if reason:
                self.skip(reason)
        self.expected_shapes = dict(expected_shapes or {})
        self.label = label
        self._counts: Counter[str] = Counter()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._groups: dict[str, dict[int, tuple[int, ...] | None]] = defaultdict(dict)

    def skip(self, reason: str) -> None:
        """Record something the audit passes through unchecked."""
        self.report.skipped[reason] = self.report.skipped.get(reason, 0) + 1

    def observe(self, name: Any, tensor: Any) -> None:
        if not isinstance(name, str):
            self.skip(f"items whose name is a {type(name).__name__}, not a str")
            return
        self._counts[name] += 1
        self.report.tensors += 1
        shape = _shape(tensor)
        if shape is None:
            self.skip(f"shapes of {type(tensor).__name__} items (no integer shape)")
        else:
            self._shapes[name] = shape
        nbytes = _nbytes(tensor)
        if nbytes is None:
            self.skip(f"sizes of {type(tensor).__name__} items (no numel/element_size or nbytes)")
        else:
            self.report.nbytes += int(nbytes)
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
            known = Counter(shape for shape in members.values() if shape is not None)
            if not known:
                continue
            common = known.most_common(1)[0][0]
            shape_mismatch += [
                f"{group.replace('*', str(e))} {shape} (its group has {common})"
                for e, shape in members.items()
                if shape is not None and shape != common
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
        where = f" ({self.label})" if self.label else ""
        if self.report.skipped:
            logger.warning(
                "moe-lora-plugins: %s export audit%s checked %d items; not checked: %s",
                self.kind, where, self.report.tensors,
                "; ".join(f"{reason} (x{count})" for reason, count in sorted(self.report.skipped.items())),
            )
        if self.report.problems:
            raise ExportAuditError(
                f"{self.kind} export audit failed{where}: " + "; ".join(self.report.problems)
                + ". The export is incomplete or wrong for this parallel layout; report it with the layout "
                "(PP/VPP/EP/ETP/TP) and `moe-lora-plugins doctor`, or set MOELORA_EXPORT_AUDIT=off to "
                "stream anyway."
            )
        return self.report


def _name_and_tensor(item: Any) -> tuple[Any, Any] | None:
    if isinstance(item, (str, bytes)):
        return None
    try:
        return item[0], item[1]
    except Exception:  # not a (name, tensor, ...) sequence: passed through unchecked
        return None


def audited(items: Iterable[Any], audit: ExportAudit) -> Iterator[Any]:
    """Pass ``items`` (2- or 3-tuples ``(hf_name, tensor, ...)``) through, auditing them; check at the end."""
    for item in items:
        pair = _name_and_tensor(item)
        if pair is None:
            audit.skip(f"stream items of type {type(item).__name__} (not (name, tensor, ...))")
        else:
            audit.observe(*pair)
        yield item
    audit.finish()

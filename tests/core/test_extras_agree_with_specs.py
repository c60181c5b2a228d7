"""pyproject's extras and the PatchSpecs' version ranges agree: `pip install "moe-lora-plugins[vllm]"`
(or [megatron]) can only resolve to a version that some patch of that distribution supports.

Ranges are read as intervals: each spec's ``versions`` is one interval; the specs of a distribution
give a union of intervals; every extra requirement on a distribution that a spec targets must lie
inside that union (bounded above too: an open range would admit every future release).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from moe_lora_plugins.patches import all_specs

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@dataclass(frozen=True)
class Interval:
    """Versions between ``low`` and ``high``; None is unbounded; the flags say whether an end is included."""

    low: Version | None = None
    low_closed: bool = True
    high: Version | None = None
    high_closed: bool = False

    def contains(self, other: Interval) -> bool:
        if self.low is not None:
            if other.low is None or other.low < self.low:
                return False
            if other.low == self.low and other.low_closed and not self.low_closed:
                return False
        if self.high is not None:
            if other.high is None or other.high > self.high:
                return False
            if other.high == self.high and other.high_closed and not self.high_closed:
                return False
        return True

    def joins(self, later: Interval) -> bool:
        """True when ``later`` (starting at or after this one's start) continues this one with no gap."""
        if self.high is None or later.low is None:
            return True
        if later.low < self.high:
            return True
        return later.low == self.high and (self.high_closed or later.low_closed)


def interval(specifiers: str) -> Interval:
    """The interval of a specifier set made of >=, >, <=, <, == (no wildcard) clauses."""
    low, low_closed, high, high_closed = None, True, None, False
    for spec in SpecifierSet(specifiers):
        version = Version(spec.version)
        if spec.operator in (">=", ">", "=="):
            closed = spec.operator != ">"
            if low is None or version > low or (version == low and not closed):
                low, low_closed = version, closed
        if spec.operator in ("<=", "<", "=="):
            closed = spec.operator != "<"
            if high is None or version < high or (version == high and not closed):
                high, high_closed = version, closed
        if spec.operator not in (">=", ">", "<=", "<", "=="):
            raise ValueError(f"{specifiers!r}: operator {spec.operator!r} is not read as an interval here")
    return Interval(low, low_closed, high, high_closed)


def union(intervals: list[Interval]) -> list[Interval]:
    """Merge overlapping or touching intervals (all specs here have a lower bound)."""
    ordered = sorted(intervals, key=lambda i: (i.low or Version("0"), not i.low_closed))
    merged: list[Interval] = []
    for item in ordered:
        if merged and merged[-1].joins(item):
            last = merged[-1]
            if last.high is None or item.high is None:
                high, high_closed = None, False
            elif item.high > last.high or (item.high == last.high and item.high_closed):
                high, high_closed = item.high, item.high_closed
            else:
                high, high_closed = last.high, last.high_closed
            merged[-1] = Interval(last.low, last.low_closed, high, high_closed)
        else:
            merged.append(item)
    return merged


def _spec_ranges() -> dict[str, list[Interval]]:
    ranges: dict[str, list[Interval]] = {}
    for spec in all_specs():
        for dist in spec.distributions:
            ranges.setdefault(dist, []).append(interval(spec.versions))
    return ranges


def _extra_requirements() -> list[tuple[str, Requirement]]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    return [(extra, Requirement(line)) for extra, lines in extras.items() for line in lines]


def _patched_extra_requirements() -> list[tuple[str, Requirement]]:
    patched = set(_spec_ranges())
    return [(extra, req) for extra, req in _extra_requirements() if req.name in patched]


def test_the_interval_reading_itself():
    assert interval(">=0.32.0,<0.34") == Interval(Version("0.32.0"), True, Version("0.34"), False)
    assert union([interval(">=0.32,<0.33"), interval(">=0.33,<0.34")]) == [interval(">=0.32,<0.34")]
    assert union([interval(">=0.32,<0.33"), interval(">0.33,<0.34")]) == [
        interval(">=0.32,<0.33"), interval(">0.33,<0.34")
    ]
    assert interval(">=0.32,<0.34").contains(interval(">=0.32,<0.33"))
    assert not interval(">=0.32,<0.33").contains(interval(">=0.32"))
    assert not interval(">=0.32,<0.33").contains(interval(">=0.19,<0.33"))


def test_the_vllm_and_megatron_extras_name_patched_distributions():
    named = {req.name for _, req in _patched_extra_requirements()}
    assert {"vllm", "megatron-bridge"} <= named


@pytest.mark.parametrize(
    ("extra", "requirement"), _patched_extra_requirements(), ids=lambda v: str(v)
)
def test_each_extra_range_lies_within_the_union_of_its_patch_ranges(extra, requirement):
    covered = union(_spec_ranges()[requirement.name])
    wanted = interval(str(requirement.specifier))
    assert any(part.contains(wanted) for part in covered), (
        f"pyproject extra [{extra}] allows {requirement}, but the patches for {requirement.name} support only "
        f"{[str(SpecifierSet(s.versions)) for s in all_specs() if requirement.name in s.distributions]}: "
        f"narrow the extra (or widen a spec after checking that release)"
    )

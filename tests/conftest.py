"""Shared pytest configuration.

Every test starts with no MOELORA_* switch from the caller's shell. A plain ``pytest`` at the repository
root collects every lane's tests and skips, with the reason, those whose real packages this interpreter
lacks; inside a lane (``MOELORA_LANE`` set by nox) that lane's tests are never skipped this way, so a lane
missing its own package fails instead of passing empty.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# tests/<folder> -> (the lane that runs it, the modules it needs)
LANE_NEEDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "megatron": ("megatron", ("megatron.core", "megatron.bridge")),
    "vllm": ("vllm", ("vllm",)),
    "sglang": ("sglang", ("sglang",)),
    "e2e": ("e2e", ("megatron.core", "megatron.bridge", "vllm")),
    "vllm033": ("vllm033", ("vllm",)),
    "areal": ("areal", ("areal", "vllm")),
    "verl": ("verl", ("verl", "megatron.core", "megatron.bridge")),
}


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is absent
            found = False
        if not found:
            missing.append(name)
    return missing


def lane_skip_reason(folder: str, lane: str | None) -> str | None:
    """Why the tests in ``tests/<folder>`` cannot run in this interpreter, or None if they can."""
    if folder not in LANE_NEEDS:
        return None
    own_lane, modules = LANE_NEEDS[folder]
    missing = _missing(modules)
    if not missing or lane == own_lane:
        return None
    return f"needs {', '.join(missing)}, which this interpreter lacks: run the {own_lane} lane (nox -s {own_lane})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lane = os.environ.get("MOELORA_LANE")
    reasons: dict[str, str | None] = {}
    for item in items:
        try:
            folder = Path(item.path).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if folder not in reasons:
            reasons[folder] = lane_skip_reason(folder, lane)
        if reasons[folder]:
            item.add_marker(pytest.mark.skip(reason=reasons[folder]))


@pytest.fixture(autouse=True)
def _clean_moelora_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MOELORA_") and name != "MOELORA_LANE":
            monkeypatch.delenv(name)

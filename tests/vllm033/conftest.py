"""The vllm033 lane: vLLM 0.33.0's own Python modules (a CUDA wheel installed without its CUDA-only
requirements beside the CPU torch). Outside that lane, every test here skips with the reason."""

from __future__ import annotations

import importlib.metadata

import pytest


def installed_vllm() -> str | None:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    version = installed_vllm()
    if version is not None and version.startswith("0.33."):
        return
    skip = pytest.mark.skip(reason=f"needs the vllm 0.33 lane (`nox -s vllm033`); installed vllm: {version}")
    for item in items:
        if "vllm033" in item.nodeid.split("/") and "needs_any_vllm" not in item.keywords:
            item.add_marker(skip)

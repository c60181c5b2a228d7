"""Shared pytest configuration: every test starts with no MOELORA_* switch from the caller's shell."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_moelora_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MOELORA_") and name != "MOELORA_LANE":
            monkeypatch.delenv(name)

"""Shared fixtures: every test gets its own vivarium state; the image cache may be shared."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_state(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("integration"):
        yield  # integration tests share one session-wide state (tests/integration/conftest.py)
        return
    monkeypatch.delenv("VIVARIUM_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    if "VIVARIUM_TEST_CACHE" not in os.environ:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", os.environ["VIVARIUM_TEST_CACHE"])
    monkeypatch.delenv("VIVARIUM_ACCEL", raising=False)
    yield

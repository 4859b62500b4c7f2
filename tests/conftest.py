"""Shared fixtures: every unit test gets its own vivarium state and cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium.vm import caps


def pytest_report_header(config: pytest.Config) -> str:
    """Which host the tests run on: its Debian and its QEMU (the integration tests run on Debian 12 and 13)."""
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    try:
        q = caps.ask()
        qemu = f"QEMU {q.version} (machine {q.machine})"
    except Exception as e:  # noqa: BLE001 - a header, never a failure
        qemu = f"QEMU unknown ({e})"
    return f"host: Debian {debian}, {qemu}"


@pytest.fixture(autouse=True)
def _isolated_state(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("integration"):
        yield  # integration tests share one session-wide state (tests/integration/conftest.py)
        return
    monkeypatch.delenv("VIVARIUM_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VIVARIUM_ACCEL", raising=False)
    yield

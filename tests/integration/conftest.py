"""Integration fixtures: one real image, one real VM per test session.

The image cache is VIVARIUM_TEST_CACHE when set (CI keeps it between runs;
an unchanged recipe is then a cache hit), else a fresh temporary directory.
State (instances) is always fresh. Everything booted is destroyed at the end,
also when a test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import Sandbox
from vivarium import config as cfg
from vivarium.sandbox import free_port

from ..fakenet import PUBLIC, FakeNet


@pytest.fixture(scope="session")
def session_env() -> Iterator[dict[str, str]]:
    keep = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "VIVARIUM_HOME")}
    with tempfile.TemporaryDirectory(prefix="vivarium-it-") as tmp:
        cache = os.environ.get("VIVARIUM_TEST_CACHE") or str(Path(tmp) / "cache")
        os.environ.pop("VIVARIUM_HOME", None)
        os.environ["XDG_CACHE_HOME"] = cache
        os.environ["XDG_STATE_HOME"] = str(Path(tmp) / "state")
        try:
            yield dict(os.environ)
        finally:
            for box in list_all():
                box.destroy()
            for k, v in keep.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def list_all() -> list[Sandbox]:
    from vivarium.sandbox import list_sandboxes

    return list_sandboxes()


def vv(*args: str, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI."""
    proc = subprocess.run([sys.executable, "-m", "vivarium", *args], capture_output=True, text=True, cwd=cwd, env=env, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"vivarium {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def net(session_env: dict[str, str]) -> Iterator[FakeNet]:
    """The made-up LAN, metadata service, public hosts and DNS (tests/fakenet.py)."""
    with FakeNet() as n:
        yield n


@pytest.fixture(scope="session")
def project(session_env: dict[str, str], net: FakeNet) -> Path:
    """A project directory with a vivarium.toml sized for a TCG test VM, its fence
    pointed at the made-up network (198.51.100.7 opened on purpose)."""
    assert net.dns is not None
    d = Path(os.environ["XDG_STATE_HOME"]).parent / "project"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vivarium.toml").write_text(
        f"""
[vm]
memory = "2G"
cpus = 2
disk = "20G"
swap = "1G"

[[forward]]
host = {free_port()}
guest = 22

[[forward]]
host = {free_port()}
guest = 3000

[network]
allow_cidrs = ["{PUBLIC}/32"]
dns_upstream = "{net.dns.address}"
"""
    )
    return d


@pytest.fixture(scope="session")
def built(project: Path) -> subprocess.CompletedProcess[str]:
    """`vivarium build` for real, on the default recipe."""
    return vv("build", cwd=project)


@pytest.fixture(scope="session")
def box(project: Path, built: subprocess.CompletedProcess[str]) -> Iterator[Sandbox]:
    """One booted VM shared by the session's tests."""
    result = vv("up", "itest", cwd=project)
    assert "is up" in result.stderr
    sandbox = Sandbox("itest")
    yield sandbox
    sandbox.destroy()


def load(project: Path) -> cfg.Config:
    return cfg.load(project / "vivarium.toml")

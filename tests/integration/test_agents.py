"""Agents inside: the agent CLI in the image, `run` in tmux sessions that outlive the CLI, secrets by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from vivarium import Sandbox

from .conftest import vv

pytestmark = pytest.mark.integration


def test_claude_code_is_installed(box: Sandbox) -> None:
    r = vv("exec", "itest", "--", "claude", "--version")
    assert "Claude Code" in r.stdout
    status = json.loads(vv("status", "itest", "--json").stdout)
    assert status["agents"]["claude-code"] in r.stdout


def _pid_of(box: Sandbox, name: str) -> int:
    """The newest process named exactly `name` (not the tmux client whose argv mentions it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = box.exec(["pgrep", "-n", "-x", name], capture=True)
        if r.returncode == 0:
            return int(r.stdout.split()[0])
        time.sleep(0.5)
    raise AssertionError(f"no process named {name!r}")


def test_run_detached_outlives_the_cli_and_gets_the_secret_only_in_memory(box: Sandbox, project: Path) -> None:
    secret = f"vivarium-secret-{uuid.uuid4().hex}"
    env = dict(os.environ, VIVARIUM_TEST_SECRET=secret)
    r = subprocess.run(
        [sys.executable, "-m", "vivarium", "run", "itest", "-d", "--session", "sleeper", "--env", "VIVARIUM_TEST_SECRET",
         "--", "sh", "-c", "sleep 600"],
        cwd=project, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout + r.stderr
    # The CLI has exited; the agent runs on.
    pid = _pid_of(box, "sleep")
    sessions = json.loads(vv("sessions", "itest", "--json").stdout)
    mine = [s for s in sessions if s["session"] == "sleeper"]
    assert mine and mine[0]["state"] == "running" and "sleep 600" in mine[0]["command"]
    # The process sees the secret...
    environ = box.exec(["sudo", "cat", f"/proc/{pid}/environ"], capture=True).stdout
    assert f"VIVARIUM_TEST_SECRET={secret}" in environ.split("\0")
    # ...in the project directory (the first share)...
    cwd = box.exec(["sudo", "readlink", f"/proc/{pid}/cwd"], capture=True).stdout.strip()
    assert cwd == str(project.resolve())
    # ...and it is nowhere on the guest's disk (the pattern goes over stdin: a command line would be logged).
    found = box.exec(["sudo", "grep", "-rlF", "-f", "/dev/stdin", "/etc", "/home", "/root", "/var", "/tmp"], capture=True, input=secret + "\n")
    assert found.returncode == 1 and found.stdout == "", found.stdout
    # ...nor in the instance's state on the host.
    for path in box.dir.path.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert secret.encode() not in path.read_bytes(), path


def test_attach_in_a_terminal(box: Sandbox, project: Path) -> None:
    vv("run", "itest", "-d", "--session", "hello", "--", "sh", "-c", "echo attached-ok; sleep 600", cwd=project)
    host_session = f"vivarium-attach-{os.getpid()}"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", host_session, "-x", "120", "-y", "30", f"{sys.executable} -m vivarium attach itest hello"],
        check=True,
    )
    try:
        deadline = time.monotonic() + 60
        screen = ""
        while time.monotonic() < deadline and "attached-ok" not in screen:
            time.sleep(1)
            screen = subprocess.run(["tmux", "capture-pane", "-t", host_session, "-p"], capture_output=True, text=True).stdout
        assert "attached-ok" in screen, screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", host_session], check=False, capture_output=True)
    # Closing the terminal does not stop the agent.
    time.sleep(1)
    assert any(s["session"] == "hello" and s["state"] == "running" for s in json.loads(vv("sessions", "itest", "--json").stdout))


def test_an_agent_brings_its_domains_into_the_allowlist(box: Sandbox) -> None:
    rules = {r["rule"]: r["source"] for r in json.loads((box.dir.path / "policy.json").read_text())["allow"]}
    assert rules["api.anthropic.com:443"] == "claude-code"
    box.set_network_mode("allowlist")
    try:
        time.sleep(0.5)
        r = box.exec(["getent", "hosts", "api.anthropic.com"], capture=True)
        assert r.returncode == 0 and r.stdout.split()[0] == "198.51.100.7", r
        assert box.exec(["getent", "hosts", "unlisted.example"], capture=True).returncode != 0  # NXDOMAIN from the fence
        check = vv("egress", "check", box.name, "api.anthropic.com:443")
        assert "allow api.anthropic.com:443 (claude-code)" in check.stdout
        assert "deny allowlist: unlisted.example is not listed" in vv("egress", "check", box.name, "unlisted.example", check=False).stdout
    finally:
        box.set_network_mode("lan-block")

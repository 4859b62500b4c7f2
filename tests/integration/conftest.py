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
from vivarium.ports import free_port

from ..fakenet import PUBLIC, FakeNet


@pytest.fixture(scope="session")
def session_env() -> Iterator[dict[str, str]]:
    keep = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "VIVARIUM_HOME", "SUDO_UID", "SUDO_GID", "SUDO_USER")}
    for k in ("SUDO_UID", "SUDO_GID", "SUDO_USER"):  # the tests run vivarium as root (under sudo it would be the sudoer)
        os.environ.pop(k, None)
    with tempfile.TemporaryDirectory(prefix="vivarium-it-") as tmp:
        # Projects in here belong to the agent's uid (1000), as yours would under a home you can enter: their
        # share servers reach them as their owner (share/userns.py), who must be able to pass through.
        os.chmod(tmp, 0o711)
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


def write_config(d: Path, text: str) -> Path:
    """A project's vivarium.toml, trusted as its user would trust it (`vivarium config trust`)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "vivarium.toml").write_text(text)
    vv("config", "trust", cwd=d)
    return d / "vivarium.toml"


# The agent user of the tests' sandboxes, whoever runs them: root's default, set for a normal user too
# (tests/as_user.py), whose own default is themselves (by name and uid). The guest's image then is the same
# for both (it has the agent made in it): built once.
AGENT = 'user = "agent"\n'


def small_vm(**vm: str) -> str:
    """The [vm] table (and SSH forward) of a small sandbox for a vivarium.toml: 1G, 2 CPUs (TCG), with `vm` added.
    The agent is `agent` (1000) whoever runs the tests (AGENT)."""
    extra = "".join(f'{k} = "{v}"\n' for k, v in {"user": "agent", **vm}.items())
    return f'[vm]\n{extra}memory = "1G"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n'


def fenced(net: FakeNet) -> str:
    """The [network] table of a sandbox fenced against the made-up network, its public host opened on purpose."""
    assert net.dns is not None
    return f'[network]\nallow_cidrs = ["{PUBLIC}/32"]\ndns_upstream = "{net.dns.address}"\n'


# Paths in a project that run on the host; the project fixture has each, as a user's repository would.
PROTECTED = {
    "vivarium.toml": None,  # written by the fixture
    ".git/config": "[core]\n\trepositoryformatversion = 0\n\tbare = false\n",
    ".git/hooks/pre-commit.sample": "#!/bin/sh\nexit 0\n",
    ".envrc": "export FOO=bar\n",
    ".vscode/settings.json": "{}\n",
    ".idea/workspace.xml": "<project/>\n",
}


def vv(*args: str, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI."""
    proc = subprocess.run([sys.executable, "-m", "vivarium", *args], capture_output=True, text=True, cwd=cwd, env=env, check=False,
                          stdin=subprocess.DEVNULL)  # `exec` passes its stdin through: none here  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"vivarium {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def net(session_env: dict[str, str]) -> Iterator[FakeNet]:
    """The made-up LAN, metadata service, public hosts and DNS (tests/fakenet.py); run by a normal user
    (tests/as_user.py), the one root made for it."""
    given = os.environ.get("VIVARIUM_TEST_NET")
    if given:
        yield FakeNet.given(given)
        return
    with FakeNet() as n:
        yield n


@pytest.fixture(scope="session")
def project(session_env: dict[str, str], net: FakeNet) -> Path:
    """A project directory with a vivarium.toml sized for a TCG test VM (small_vm's shape: one template serves
    both), its fence pointed at the made-up network (198.51.100.7 opened on purpose)."""
    assert net.dns is not None
    d = Path(os.environ["XDG_STATE_HOME"]).parent / "project"
    d.mkdir(parents=True, exist_ok=True)
    for rel, text in PROTECTED.items():
        if text is not None:
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
    write_config(
        d,
        f"""
[vm]
user = "agent"
memory = "1G"
cpus = 2
disk = "10G"
swap = "256M"

[[forward]]
host = {free_port()}
guest = 22

[[forward]]
host = {free_port()}
guest = 3000

[network]
allow_cidrs = ["{PUBLIC}/32"]
dns_upstream = "{net.dns.address}"
""",
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


@pytest.fixture(scope="session")
def shared(project: Path, built: object) -> Iterator[tuple[Sandbox, Path, Path]]:
    """A sandbox with every kind of share: rw, ro at another path, review, and a second review
    share that the attack tests (test_host_trust.py) play with."""
    d = project.parent / "shared-project"
    (d / "rw").mkdir(parents=True, exist_ok=True)
    (d / "ro").mkdir(exist_ok=True)
    (d / "ro" / "readme.txt").write_text("from the host\n")
    (d / "review" / "src").mkdir(parents=True, exist_ok=True)
    for name, text in (("keep.txt", "keep\n"), ("edit.txt", "one\ntwo\n"), ("gone.txt", "bye\n"), ("src/both.txt", "base\n")):
        (d / "review" / name).write_text(text)
    attack = d / "attack"
    (attack / "src").mkdir(parents=True, exist_ok=True)
    (d / "victim").mkdir(exist_ok=True)
    (d / "victim" / "precious.txt").write_text("outside the share\n")
    for name, text in (("same.txt", "aaaa\n"), ("swap.txt", "orig\n"), ("src/keep.txt", "k\n")):
        (attack / name).write_text(text)
    if not (attack / "hostlink").is_symlink():
        (attack / "hostlink").symlink_to("../victim")  # the user's own symlink, pointing out of the share
    write_config(
        d,
        small_vm() + '[[share]]\nhost = "rw"\n'
        '[[share]]\nhost = "ro"\nguest = "/mnt/ro"\nmode = "ro"\n'
        '[[share]]\nhost = "review"\nmode = "review"\n'
        '[[share]]\nhost = "attack"\nmode = "review"\n'
        "[kube]\nlink_into_share = true\n",
    )
    # The project belongs to the user the agent runs as (agent, 1000, where the tests run as root; else the
    # user running them), as it does when you run vivarium as yourself in your own project.
    if os.geteuid() == 0:
        os.chown(d / "rw", 1000, 1000)
        for top in ("review", "attack"):
            for p in [d / top, *(d / top).rglob("*")]:
                os.lchown(p, 1000, 1000)
    vv("up", "sharebox", cwd=d)
    box = Sandbox("sharebox")
    yield box, (d / "rw").resolve(), (d / "ro").resolve()
    box.destroy()


def load(project: Path) -> cfg.Config:
    return cfg.load(project / "vivarium.toml")

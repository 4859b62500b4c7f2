"""Warm start: new sandboxes restored from one ready template are each their own machine."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import Sandbox

from .conftest import vv, write_config

pytestmark = pytest.mark.integration

IDENTITY = "ssh-keygen -lf /run/vivarium/ssh_host_ed25519_key.pub 2>/dev/null || sudo ssh-keygen -yf /run/vivarium/ssh_host_ed25519_key; " \
           "cat /etc/machine-id; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname"  # fmt: skip


@pytest.fixture(scope="module")
def twins(project: Path, built: object) -> Iterator[tuple[Sandbox, Sandbox]]:
    d = project.parent / "twins"
    d.mkdir(exist_ok=True)
    write_config(d, (project / "vivarium.toml").read_text())
    boxes = []
    try:
        for name in ("twin-a", "twin-b"):
            r = vv("up", name, "--auto-ports", cwd=d)
            assert "is up" in r.stderr
            boxes.append(Sandbox(name))
        yield boxes[0], boxes[1]
    finally:
        for b in boxes:
            b.destroy()


def test_clones_of_one_template_are_different_machines(twins: tuple[Sandbox, Sandbox], box: Sandbox) -> None:
    a, b = twins
    ia, ib = (x.exec(["sh", "-c", IDENTITY], capture=True).stdout.splitlines() for x in (a, b))
    assert ia[0] != ib[0]  # SSH host keys
    assert ia[1] != ib[1]  # machine-ids
    assert ia[2] != ib[2] and len(ia[2]) == 64  # the first 32 bytes from /dev/urandom
    assert (ia[3], ib[3]) == ("twin-a", "twin-b")
    # both came from the same template as the session's sandbox (same shape)
    assert a.record().instance.template == b.record().instance.template == box.record().instance.template is not None


def test_each_clone_takes_only_its_own_key(twins: tuple[Sandbox, Sandbox]) -> None:
    a, b = twins
    wrong = a.target_at(b.status().ssh_port or 0)  # a's key and a's pinned host key, at b's port
    r = subprocess.run(wrong.argv(["true"], tty=False), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert a.exec(["true"]).returncode == 0 and b.exec(["true"]).returncode == 0


def test_a_clone_starts_with_docker_running_and_its_shares_mounted(twins: tuple[Sandbox, Sandbox], project: Path) -> None:
    a, _ = twins
    assert a.exec(["systemctl", "is-active", "docker"], capture=True).stdout.strip() == "active"
    share = str((project.parent / "twins").resolve())
    r = a.exec(["sh", "-c", f"mount | grep -c ' {share} type virtiofs'"], capture=True)
    assert r.stdout.strip() == "1", r.stdout
    assert a.status().gateway is not None


def test_cold_skips_the_template(project: Path) -> None:
    d = project.parent / "twins"
    r = vv("up", "frosty", "--cold", "--auto-ports", cwd=d)
    try:
        assert "is up" in r.stderr
        assert Sandbox("frosty").record().instance.template is None
    finally:
        vv("destroy", "frosty")

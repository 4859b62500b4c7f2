"""The host's view of the sandbox: its Docker daemon as a Docker context, its Kind cluster's kubeconfig."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from vivarium import Sandbox
from vivarium.ports import free_port

from .conftest import vv

pytestmark = pytest.mark.integration

IMPORT = (
    "set -e; d=$(mktemp -d); mkdir -p $d/bin; cp /bin/busybox $d/bin/; ln -s busybox $d/bin/sh; ln -s busybox $d/bin/sleep; "
    "tar -C $d -c . | docker import - vv-busybox >/dev/null; rm -rf $d"
)


@pytest.fixture
def ssh_config() -> Iterator[Path]:
    """The real ~/.ssh/config (ssh reads no other); put back as it was afterwards."""
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    config = home / ".ssh" / "config"
    before = config.read_text() if config.exists() else None
    yield config
    if before is None:
        config.unlink(missing_ok=True)
    else:
        config.write_text(before)
    for f in (home / ".ssh" / "vivarium").glob("itest.conf"):
        f.unlink()


def test_docker_context_lists_the_guests_containers(box: Sandbox, ssh_config: Path) -> None:
    r = box.exec(["sh", "-c", IMPORT + " && docker run -d --name vv-offline vv-busybox sleep 600"], capture=True, timeout=600)
    assert r.returncode == 0, r.stderr
    try:
        assert "docker context vivarium-itest created" in vv("docker-context", "itest").stderr
        ps = subprocess.run(["docker", "--context", "vivarium-itest", "ps", "--format", "{{.Names}} {{.Image}}"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
        assert ps.returncode == 0, ps.stderr
        assert "vv-offline vv-busybox" in ps.stdout
        assert f"Include {ssh_config.parent}/vivarium/*.conf" in ssh_config.read_text()
    finally:
        subprocess.run(["docker", "context", "rm", "-f", "vivarium-itest"], capture_output=True, check=False)
        box.exec(["docker", "rm", "-f", "vv-offline"], capture=True)


def test_kubeconfig_points_at_the_forwarded_api_port(box: Sandbox) -> None:
    r = vv("kubeconfig", "itest", check=False)
    assert r.returncode == 2 and "no host port forwards to the Kind API server (guest port 45631)" in r.stderr
    port = free_port()
    vv("port", "itest", "add", f"{port}:45631")
    try:
        r = vv("kubeconfig", "itest", check=False)
        assert r.returncode == 1 and "has no Kind cluster yet" in r.stderr and "Traceback" not in r.stderr
        # Where Kind would have written it (the cluster itself needs node images from the internet)
        fake = (
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kind-kind\n  cluster: {server: 'https://0.0.0.0:45631'}\n"
            "users:\n- name: kind-kind\n  user: {token: t}\n"
        )
        assert box.exec(["sh", "-c", "mkdir -p ~/.kube && cat > ~/.kube/config"], input=fake).returncode == 0
        config = yaml.safe_load(vv("kubeconfig", "itest").stdout)
        assert config["clusters"][0]["cluster"]["server"] == f"https://127.0.0.1:{port}"
        assert config["current-context"] == "vivarium-itest"
    finally:
        vv("port", "itest", "rm", str(port))
        box.exec(["rm", "-rf", ".kube"])
    assert box.exec(["test", "-f", "/etc/vivarium/kind.yaml"]).returncode == 0

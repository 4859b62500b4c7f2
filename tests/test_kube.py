"""The host's kubeconfig for a sandbox's Kind cluster, and the ssh config include (no VM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vivarium import kube, ssh
from vivarium.errors import UsageError

KIND = """
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0E=
    server: https://0.0.0.0:45631
  name: kind-kind
contexts:
- context:
    cluster: kind-kind
    user: kind-kind
  name: kind-kind
current-context: kind-kind
kind: Config
preferences: {}
users:
- name: kind-kind
  user:
    client-certificate-data: Q0VSVA==
    client-key-data: S0VZ
"""


def test_rewrite_points_at_the_host_side_of_the_forward() -> None:
    c = kube.rewrite(KIND, "demo", 45999)
    assert c["clusters"] == [{"name": "vivarium-demo", "cluster": {"certificate-authority-data": "Q0E=", "server": "https://127.0.0.1:45999"}}]
    assert c["contexts"][0] == {"name": "vivarium-demo", "context": {"cluster": "vivarium-demo", "user": "vivarium-demo"}}
    assert c["users"][0]["user"]["client-key-data"] == "S0VZ"
    assert c["current-context"] == "vivarium-demo"
    assert kube.rewrite(KIND, "demo", 45631, "0.0.0.0")["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:45631"
    with pytest.raises(UsageError):
        kube.rewrite("apiVersion: v1\nkind: Config\n", "demo", 1)


def test_merge_keeps_other_entries_and_replaces_ours(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "prod",
                                    "clusters": [{"name": "prod", "cluster": {"server": "https://prod"}}],
                                    "contexts": [{"name": "prod", "context": {"cluster": "prod", "user": "prod"}}],
                                    "users": [{"name": "prod", "user": {"token": "t"}}]}))  # fmt: skip
    kube.merge_into_file(path, kube.rewrite(KIND, "demo", 45999))
    kube.merge_into_file(path, kube.rewrite(KIND, "demo", 46000))  # again: replaced, not doubled
    data = yaml.safe_load(path.read_text())
    assert [c["name"] for c in data["clusters"]] == ["prod", "vivarium-demo"]
    assert data["clusters"][1]["cluster"]["server"] == "https://127.0.0.1:46000"
    assert data["current-context"] == "prod"  # the user's choice stays
    assert path.stat().st_mode & 0o777 == 0o600


def test_ssh_include_is_added_once_at_the_top(tmp_path: Path) -> None:
    config = tmp_path / ".ssh" / "config"
    config.parent.mkdir()
    config.write_text("Host *\n  ServerAliveInterval 30\n")
    assert ssh.ensure_include(config, tmp_path / ".ssh" / "vivarium")
    assert not ssh.ensure_include(config, tmp_path / ".ssh" / "vivarium")
    lines = config.read_text().splitlines()
    assert lines[1] == f"Include {tmp_path}/.ssh/vivarium/*.conf" and lines.count(lines[1]) == 1
    assert "ServerAliveInterval 30" in lines[-1]

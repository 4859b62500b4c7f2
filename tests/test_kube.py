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


@pytest.mark.parametrize(
    "evil",
    [
        {"user": {"exec": {"command": "/bin/sh", "args": ["-c", "touch /tmp/pwned"]}}},
        {"user": {"auth-provider": {"name": "gcp"}}},
        {"user": {"tokenFile": "/etc/shadow"}},
        {"user": {"client-key": "/root/.ssh/id_ed25519"}},
        {"user": {"token": "a\nb"}},
        {"cluster": {"insecure-skip-tls-verify": True}},
        {"cluster": {"proxy-url": "http://example.org:3128"}},
        {"cluster": {"tls-server-name": "example.org"}},
        {"cluster": {"certificate-authority": "/etc/ssl/private/key.pem"}},
        {"cluster": {"certificate-authority-data": "not base64!"}},
    ],
)
def test_rewrite_takes_credentials_only_and_refuses_the_rest(evil: dict[str, dict[str, object]]) -> None:
    data = yaml.safe_load(KIND)
    for where, extra in evil.items():
        (data["users"] if where == "user" else data["clusters"])[0][where].update(extra)
    with pytest.raises(UsageError) as e:
        kube.rewrite(yaml.safe_dump(data), "demo", 45999)
    assert "\n" not in e.value.message


def test_the_ssh_config_block_gives_the_guest_nothing_of_the_host(tmp_path: Path) -> None:
    t = ssh.Target("vivarium-demo", "agent", 2222, tmp_path / "k", tmp_path / "kh")
    block = t.config_block().splitlines()
    for line in ("  ForwardAgent no", "  ForwardX11 no", "  IdentityAgent none", "  PermitLocalCommand no"):
        assert line in block
    assert block[0] == "Host vivarium-demo"

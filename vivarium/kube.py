"""The host's view of the sandbox's Kind cluster and Docker daemon.

The image carries /etc/vivarium/kind.yaml, which puts the cluster's API server
on guest port 45631 on all guest addresses; the default forward carries that
port to the host. `kubeconfig` rewrites the cluster's kubeconfig to point at
the host side of that forward; `--merge` folds it into ~/.kube/config.
"""

from __future__ import annotations

import base64
import binascii
import os
import pwd
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from vivarium import ssh
from vivarium.errors import InstanceError, UsageError
from vivarium.printable import printable
from vivarium.record import Forward
from vivarium.run import find_program, run

API_PORT = 45631
KIND_CONFIG = "/etc/vivarium/kind.yaml"


# From the guest's kubeconfig only these are taken: credentials as data. Everything else there
# (exec and auth-provider commands kubectl would run on the host, file paths it would read there,
# proxies, insecure-skip-tls-verify, a server name) is the guest's to choose, so it is refused.
CLUSTER_KEYS = ("certificate-authority-data",)
USER_KEYS = ("client-certificate-data", "client-key-data", "token")
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=:-]{1,8192}")


def rewrite(text: str, name: str, host_port: int, bind: str = "127.0.0.1") -> dict[str, Any]:
    """A kubeconfig from the guest, made to reach the API server through the host's forward:
    its CA and client credentials, nothing else; the server is always the loopback forward."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UsageError("the sandbox's kubeconfig is not YAML") from None
    if not isinstance(data, dict) or not isinstance(data.get("clusters"), list) or not data["clusters"]:
        raise UsageError("the sandbox's kubeconfig has no cluster in it", hint=f"create one with `kind create cluster --config {KIND_CONFIG}`")
    label = f"vivarium-{name}"
    first = data["clusters"][0]
    theirs = first.get("cluster") if isinstance(first, dict) else None
    cluster = _only(theirs, CLUSTER_KEYS, {"server"}, "cluster")
    cluster["server"] = f"https://{'127.0.0.1' if bind in ('0.0.0.0', '') else bind}:{host_port}"
    users = data.get("users") or []
    first_user = users[0] if isinstance(users, list) and users else {}
    user = _only(first_user.get("user") if isinstance(first_user, dict) else None, USER_KEYS, set(), "user")
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": label, "cluster": cluster}],
        "users": [{"name": label, "user": user}],
        "contexts": [{"name": label, "context": {"cluster": label, "user": label}}],
        "current-context": label,
        "preferences": {},
    }


def _only(entry: object, keys: tuple[str, ...], ignored: set[str], what: str) -> dict[str, str]:
    """The `keys` of a guest's cluster or user entry, each checked; any other key refused in one line."""
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise UsageError(f"the sandbox's kubeconfig {what} entry is not a mapping")
    out: dict[str, str] = {}
    for key, value in entry.items():
        if key in ignored:
            continue
        if key not in keys:
            raise UsageError(
                f"the sandbox's kubeconfig has {printable(str(key))!r} in its {what}: refused (only {', '.join(keys)} are taken from the guest)",
                hint="kubectl would act on it on this host; recreate the cluster with Kind's own kubeconfig",
            )
        if not isinstance(value, str) or not (_TOKEN.fullmatch(value) if key == "token" else _base64(value)):
            raise UsageError(f"the sandbox's kubeconfig {what}.{key} is not {'a token' if key == 'token' else 'base64 data'}")
        out[key] = value
    return out


def _base64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return bool(value)


def merge(existing: dict[str, Any] | None, new: dict[str, Any], *, use: bool = False) -> dict[str, Any]:
    """`new`'s entries in `existing`, replacing entries of the same name and keeping every other."""
    out = dict(existing or {"apiVersion": "v1", "kind": "Config", "preferences": {}})
    for key in ("clusters", "users", "contexts"):
        names = {e["name"] for e in new.get(key, [])}
        out[key] = [e for e in (out.get(key) or []) if e.get("name") not in names] + list(new.get(key, []))
    if use or not out.get("current-context"):
        out["current-context"] = new["current-context"]
    return out


def merge_into_file(path: Path, new: dict[str, Any]) -> None:
    existing = yaml.safe_load(path.read_text()) if path.exists() else None
    merged = merge(existing, new)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.vivarium")
    tmp.write_text(yaml.safe_dump(merged, sort_keys=False))
    os.chmod(tmp, 0o600)
    if path.exists():
        st = path.stat()
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
    tmp.replace(path)


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


class Exec(Protocol):
    def __call__(self, command: Sequence[str], *, capture: bool = ..., timeout: float | None = ...) -> subprocess.CompletedProcess[str]: ...


def kubeconfig(name: str, ports: Sequence[Forward], exec_: Exec) -> dict[str, Any]:
    """The Kind cluster's kubeconfig from the guest, checked and pointed at the host side of the API server's forward."""
    fwd = next((p for p in ports if p.guest == API_PORT), None)
    if fwd is None:
        raise UsageError(f"no host port forwards to the Kind API server (guest port {API_PORT})",
                         hint=f"vivarium port {name} add {API_PORT}:{API_PORT}")  # fmt: skip
    r = exec_(["sh", "-c", "kind get kubeconfig 2>/dev/null || cat ~/.kube/config"], capture=True, timeout=120)
    if r.returncode != 0 or not r.stdout.strip():
        raise InstanceError(f"sandbox {name!r} has no Kind cluster yet",
                            hint=f"vivarium exec {name} -- kind create cluster --config {KIND_CONFIG}")  # fmt: skip
    return rewrite(r.stdout, name, fwd.host, fwd.bind)


def docker_context(name: str, target: ssh.Target) -> str:
    """A Docker context on the host that reaches the sandbox's daemon over SSH. Returns its name."""
    docker = find_program("docker")
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)  # where ssh itself looks, whatever $HOME says
    conf_dir = home / ".ssh" / "vivarium"
    conf_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (conf_dir / f"{name}.conf").write_text(target.config_block())
    ssh.ensure_include(home / ".ssh" / "config", conf_dir)
    context = f"vivarium-{name}"
    subprocess.run([docker, "context", "rm", "-f", context], capture_output=True, check=False)
    run([docker, "context", "create", context, "--description", f"vivarium sandbox {name}", "--docker", f"host=ssh://{target.alias}"])
    return context

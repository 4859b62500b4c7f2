"""The host's view of the sandbox's Kind cluster and Docker daemon.

The image carries /etc/vivarium/kind.yaml, which puts the cluster's API server
on guest port 45631 on all guest addresses; the default forward carries that
port to the host. `kubeconfig` rewrites the cluster's kubeconfig to point at
the host side of that forward; `--merge` folds it into ~/.kube/config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from vivarium.errors import UsageError

API_PORT = 45631
KIND_CONFIG = "/etc/vivarium/kind.yaml"


def rewrite(text: str, name: str, host_port: int, bind: str = "127.0.0.1") -> dict[str, Any]:
    """A kubeconfig from the guest, made to reach the API server through the host's forward."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not data.get("clusters"):
        raise UsageError("the sandbox's kubeconfig has no cluster in it", hint=f"create one with `kind create cluster --config {KIND_CONFIG}`")
    label = f"vivarium-{name}"
    cluster = dict(data["clusters"][0]["cluster"])
    cluster["server"] = f"https://{'127.0.0.1' if bind in ('0.0.0.0', '') else bind}:{host_port}"
    user = data["users"][0]["user"] if data.get("users") else {}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": label, "cluster": cluster}],
        "users": [{"name": label, "user": user}],
        "contexts": [{"name": label, "context": {"cluster": label, "user": label}}],
        "current-context": label,
        "preferences": {},
    }


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

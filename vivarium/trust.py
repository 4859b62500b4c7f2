"""Which project configs the user trusted, by their exact content (like `direnv allow`).

A vivarium.toml found in the current directory decides what the host does for
the sandbox: which host directories it shares, which addresses the fence opens,
which host ports listen on the network, what runs at build time. That
directory is usually the project, shared read-write with a guest whose root is
assumed hostile. So such a file is used only when the user has trusted its
content: `vivarium config trust` records its sha256 (and a copy, to show what
changed later) in the user's state directory, which no share reaches.
A file named with --config is trusted by being named.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from vivarium import config as cfg
from vivarium import state
from vivarium.defaults import DEFAULT_DOWNLOADS
from vivarium.errors import ConfigError


def store() -> Path:
    return state.state_dir() / "trusted"


def _record(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return store() / f"{key}.json"


def _trusted(path: Path) -> dict[str, str] | None:
    try:
        data = json.loads(_record(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("path") == str(path.resolve()) else None


def is_trusted(path: Path, raw: bytes) -> bool:
    rec = _trusted(path)
    return rec is not None and rec.get("sha256") == hashlib.sha256(raw).hexdigest()


def require(path: Path, raw: bytes) -> None:
    """Refuse `raw` (the content of `path`) unless the user trusted exactly it."""
    if is_trusted(path, raw):
        return
    changed = " (it changed since you trusted it)" if _trusted(path) else ""
    raise ConfigError(
        f"{path} is not trusted{changed}: it decides what the sandbox may reach on this host",
        hint=f"read it (`vivarium config trust --show {path}`), then `vivarium config trust {path}`; or name a file with --config",
    )


def trust(path: Path, raw: bytes) -> None:
    rec = _record(path)
    rec.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = raw.decode(errors="replace")
    state.write_atomic(rec, json.dumps({"path": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest(), "text": text}), 0o600)


def changes(path: Path, raw: bytes) -> str:
    """What changed since the trusted version, as a unified diff (all of it when none was trusted)."""
    rec = _trusted(path)
    old = (rec or {}).get("text", "").splitlines(keepends=True)
    new = raw.decode(errors="replace").splitlines(keepends=True)
    label = "trusted" if rec else "nothing trusted"
    return "".join(difflib.unified_diff(old, new, f"{path} ({label})", f"{path} (now)"))


def reaching_out(config: cfg.Config) -> list[str]:
    """The settings of `config` that reach outside the sandbox, one line each."""
    project = config.source.parent.resolve() if config.source else None
    out = []
    for s in config.share:
        inside = project is not None and (s.host == project or project in s.host.parents)
        where = "" if inside else " (outside the project)"
        protect = f", protected: {', '.join(s.protect) or 'nothing'}" if s.mode == "rw" else ""
        out.append(f"shares {s.host}{where} {s.mode} at {s.guest}{protect}")
    out.append(f"network mode {config.network.mode}")
    if config.network.allow:
        out.append(f"allows names: {', '.join(config.network.allow)}")
    if config.network.allow_cidrs:
        out.append(f"opens address ranges: {', '.join(config.network.allow_cidrs)}")
    if config.network.dns_upstream:
        out.append(f"asks DNS of {config.network.dns_upstream}")
    for f in config.forward:
        if f.bind not in ("127.0.0.1", "::1"):
            out.append(f"listens on {f.bind}:{f.host} (reachable from your network) for guest port {f.guest}")
    if config.image.setup:
        out.append(f"runs at build time, as root in the image: {config.image.setup!r}")
    default_urls = {d["url"] for d in DEFAULT_DOWNLOADS}
    for d in config.image.download:
        if d.url not in default_urls:
            out.append(f"downloads {d.name} from {d.url} into {d.dest}")
    if config.image.mirror:
        out.append(f"builds from the mirror {config.image.mirror}")
    return out


def discover(explicit: Path | None, cwd: Path, overrides: Mapping[str, object] | None = None) -> cfg.Config:
    """The settings a command in `cwd` runs with: `explicit` (--config FILE: the user named it,
    so it is trusted), else ./vivarium.toml, used only when the user trusted its exact content
    (trust.py): a project directory is often shared with the guest, and root there can write it.
    The bytes checked are the bytes parsed."""
    path = cfg.find_config(explicit, cwd)
    if path is None:
        return cfg.load(None, overrides, cwd=cwd)
    raw = cfg.read_bytes(path)
    if explicit is None:
        require(path, raw)
    return cfg.load_data(cfg.parse_toml(raw, path), str(path), path.parent.resolve(), overrides, source=path)

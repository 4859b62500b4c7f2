"""Review mode: the guest writes into an overlay on its own disk; the host decides what comes back.

The host directory is served read-only (virtiofs); inside, it is the lower
layer of an overlay whose upper layer is /var/lib/vivarium/review/TAG/upper
on the guest's disk, mounted at the share's path. `diff` reads the upper
layer (files, whiteouts, opaque directories) and compares it with the host;
`apply` copies chosen changes to the host, refusing any path the host changed
since the sandbox started (the snapshot taken then), and leaving both versions.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

UPPER = "/var/lib/vivarium/review/{tag}/upper"

# Runs as root in the guest: every entry of the upper layer, one JSON list.
SCAN = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = []
for base, dirs, files in os.walk(root):
    for name in sorted(dirs) + sorted(files):
        p = os.path.join(base, name)
        rel = os.path.relpath(p, root)
        st = os.lstat(p)
        e = {"path": rel, "mode": stat.S_IMODE(st.st_mode)}
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            e["type"] = "whiteout"
        elif stat.S_ISLNK(st.st_mode):
            e["type"], e["target"] = "symlink", os.readlink(p)
        elif stat.S_ISDIR(st.st_mode):
            e["type"] = "dir"
            try:
                e["opaque"] = os.getxattr(p, "trusted.overlay.opaque") == b"y"
            except OSError:
                e["opaque"] = False
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            e["type"], e["sha256"], e["size"] = "file", h.hexdigest(), st.st_size
        else:
            continue
        out.append(e)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Change:
    path: str  # relative to the share
    kind: str  # added | modified | deleted
    what: str  # file | dir | symlink

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path) -> dict[str, list[int]]:
    """What the host directory looked like: path → [size, mtime_ns, mode] (lstat), for conflict checks."""
    out: dict[str, list[int]] = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(base) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            out[str(p.relative_to(root))] = [st.st_size, st.st_mtime_ns, st.st_mode]
    return out


def changes(host: Path, entries: Sequence[dict[str, Any]]) -> list[Change]:
    """The upper layer's entries against the host directory: what the guest added, modified and deleted."""
    out: list[Change] = []
    in_upper = {e["path"] for e in entries}
    for e in entries:
        rel, kind = e["path"], e["type"]
        h = host / rel
        exists = h.is_symlink() or h.exists()
        if kind == "whiteout":
            if exists:
                out += _deleted(host, rel)
        elif kind == "file":
            if not exists:
                out.append(Change(rel, "added", "file"))
            elif h.is_symlink() or not h.is_file() or file_sha256(h) != e["sha256"]:
                out.append(Change(rel, "modified", "file"))
        elif kind == "symlink":
            if not exists:
                out.append(Change(rel, "added", "symlink"))
            elif not h.is_symlink() or os.readlink(h) != e["target"]:
                out.append(Change(rel, "modified", "symlink"))
        elif kind == "dir":
            if not exists:
                out.append(Change(rel, "added", "dir"))
            elif e.get("opaque") and h.is_dir():
                # a directory removed and made again: what the host has under it and the guest does not is gone
                for child in sorted(h.rglob("*")):
                    crel = str(child.relative_to(host))
                    if crel not in in_upper:  # an opaque directory hides everything below it on the host
                        out.append(Change(crel, "deleted", "dir" if child.is_dir() and not child.is_symlink() else "file"))
    return sorted(out, key=lambda c: c.path)


def _deleted(host: Path, rel: str) -> list[Change]:
    h = host / rel
    if h.is_dir() and not h.is_symlink():
        below = [Change(str(p.relative_to(host)), "deleted", "dir" if p.is_dir() and not p.is_symlink() else "file") for p in h.rglob("*")]
        return [Change(rel, "deleted", "dir"), *below]
    return [Change(rel, "deleted", "symlink" if h.is_symlink() else "file")]


def unified(rel: str, old: bytes | None, new: bytes | None) -> str:
    """A unified diff of one text file ('' for binary files, with a note)."""
    if (old and b"\0" in old) or (new and b"\0" in new):
        return f"Binary files a/{rel} and b/{rel} differ\n"
    a = (old or b"").decode(errors="replace").splitlines(keepends=True)
    b = (new or b"").decode(errors="replace").splitlines(keepends=True)
    return "".join(difflib.unified_diff(a, b, f"a/{rel}" if old is not None else "/dev/null", f"b/{rel}" if new is not None else "/dev/null"))


@dataclass
class ApplyResult:
    applied: list[str]
    conflicts: list[str]  # changed on the host since the sandbox started: left alone, both versions kept


def changed_since(host: Path, rel: str, snap: dict[str, list[int]]) -> bool:
    h = host / rel
    try:
        st = h.lstat()
    except FileNotFoundError:
        return rel in snap  # it was there at the start and is gone now
    was = snap.get(rel)
    if was is None:
        return True  # created on the host since
    if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(was[2]):
        return False  # a directory's own mtime moves with its entries; those are checked one by one
    return [st.st_size, st.st_mtime_ns, st.st_mode] != was


def apply(
    host: Path,
    chosen: Iterable[Change],
    entries: Sequence[dict[str, Any]],
    snap: dict[str, list[int]],
    fetch: Callable[[str], bytes],
    owner: tuple[int, int] | None,
) -> ApplyResult:
    """Bring `chosen` changes to the host; `fetch(rel)` reads a file from the guest's upper layer."""
    by_path = {e["path"]: e for e in entries}
    result = ApplyResult([], [])
    ordered = sorted(chosen, key=lambda c: (c.kind == "deleted", -c.path.count("/") if c.kind == "deleted" else c.path.count("/"), c.path))
    for c in ordered:
        if changed_since(host, c.path, snap):
            result.conflicts.append(c.path)
            continue
        h = host / c.path
        if c.kind == "deleted":
            if h.is_dir() and not h.is_symlink():
                if any(h.iterdir()):
                    result.conflicts.append(c.path)  # something under it was kept
                    continue
                h.rmdir()
            else:
                h.unlink(missing_ok=True)
            snap.pop(c.path, None)
        else:
            e = by_path[c.path]
            h.parent.mkdir(parents=True, exist_ok=True)
            if c.what == "dir":
                h.mkdir(mode=e["mode"], exist_ok=True)
            elif c.what == "symlink":
                tmp = h.with_name(f".{h.name}.vivarium-apply")
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(e["target"])
                os.replace(tmp, h)
            else:
                tmp = h.with_name(f".{h.name}.vivarium-apply")
                tmp.write_bytes(fetch(c.path))
                os.chmod(tmp, e["mode"])
                if owner is not None:
                    os.chown(tmp, *owner)
                os.replace(tmp, h)
            if owner is not None and c.what == "dir":
                os.chown(h, *owner)
            st = h.lstat()
            snap[c.path] = [st.st_size, st.st_mtime_ns, st.st_mode]
        result.applied.append(c.path)
    return result


def save_snapshot(path: Path, snap: dict[str, list[int]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snap))
    tmp.replace(path)


def load_snapshot(path: Path) -> dict[str, list[int]]:
    data: dict[str, list[int]] = json.loads(path.read_text())
    return data

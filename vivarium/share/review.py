"""Review mode: the guest writes into an overlay on its own disk; the host decides what comes back.

The host directory is served read-only (virtiofs); inside, it is the lower
layer of an overlay whose upper layer is /var/lib/vivarium/review/TAG/upper
on the guest's disk, mounted at the share's path. `diff` reads the upper
layer (files, whiteouts, opaque directories) and compares it with the host;
`apply` copies chosen changes to the host.

Everything the scan reports is the guest's word, and root in the guest can
make it say anything. So: every path is checked (relative, no `..`, no empty
component, valid UTF-8) before it is used; only files, directories and
symlinks are applied (anything else is listed as skipped, with its type);
modes keep their permission bits only; writes walk the share one component
at a time from a directory descriptor, never following a symlink on the host
(O_NOFOLLOW, dir_fd); a fetched file must have the sha256 that `diff`
showed; and a host file changed since the sandbox started (size, mtime,
ctime or inode) is never overwritten.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

UPPER = "/var/lib/vivarium/review/{tag}/upper"

# Runs as root in the guest: every entry of the upper layer, one JSON list. (The host trusts none of it.)
SCAN = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = []
kinds = {stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFBLK: "block device", stat.S_IFCHR: "character device"}
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
            e["type"] = kinds.get(stat.S_IFMT(st.st_mode), "unknown")
        out.append(e)
print(json.dumps(out))
"""

APPLIED = ("file", "dir", "symlink")
MAX_PATH = 4096

# Changes a reviewer should read first: they run on the host when the user next builds, commits or opens a shell.
HOST_RUN = re.compile(
    r"(^|/)(\.git|\.github/workflows|\.gitlab-ci\.yml|\.envrc|\.vscode|\.idea|\.husky|Makefile|GNUmakefile|makefile|"
    r"package\.json|setup\.py|pyproject\.toml|Cargo\.toml|build\.rs|go\.mod|\.pre-commit-config\.yaml|\.npmrc|\.pypirc|"
    r"\.bashrc|\.bash_profile|\.profile|\.zshrc|\.zprofile|vivarium\.toml|Dockerfile|docker-compose\.ya?ml)(/|$)"
)


def unsafe(path: object) -> str | None:
    """Why a path from the guest cannot be used on the host, or None when it can."""
    if not isinstance(path, str) or not path:
        return "not a path"
    if len(path) > MAX_PATH:
        return "too long"
    if "\0" in path:
        return "a NUL byte in the name"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8"
    if path.startswith("/"):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "'..', '.' or an empty component"
    return None


@dataclass(frozen=True)
class Change:
    path: str  # relative to the share, checked by unsafe()
    kind: str  # added | modified | deleted
    what: str  # file | dir | symlink
    sha256: str = ""  # a file's new content
    mode: int = 0  # its permission bits (0o777 at most)
    target: str = ""  # a symlink's new target, as text

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["runs_on_host"] = runs_on_host(self)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Change:
        return cls(d["path"], d["kind"], d["what"], d.get("sha256", ""), int(d.get("mode", 0)), d.get("target", ""))


def runs_on_host(c: Change) -> bool:
    return bool(HOST_RUN.search(c.path)) or (c.what == "file" and c.kind != "deleted" and bool(c.mode & 0o111))


@dataclass
class Scan:
    changes: list[Change]
    skipped: list[dict[str, str]]  # {path, why}: what the guest has that is never applied


# ------------------------------------------------------------ the host tree, never through a symlink


@contextlib.contextmanager
def _dir_beneath(root: Path, rel: str) -> Iterator[int]:
    """A descriptor of the directory root/rel, walked one component at a time, never through a symlink."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for name in rel.split("/") if rel else []:
            nxt = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def lstat_beneath(root: Path, rel: str) -> os.stat_result | None:
    """lstat of root/rel, or None when it is missing or any directory above it is not a real directory."""
    head, _, name = rel.rpartition("/")
    try:
        with _dir_beneath(root, head) as fd:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None


def _walk_below(root: Path, rel: str) -> Iterator[tuple[str, bool]]:
    """(relative path, is a real directory) of everything under the real directory root/rel, symlinks not followed."""
    for base, dirs, files in os.walk(root / rel, followlinks=False):
        for name in dirs + files:
            p = Path(base) / name
            yield str(p.relative_to(root)), p.is_dir() and not p.is_symlink()


def file_sha256(path: Path | int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", closefd=not isinstance(path, int)) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def host_sha256(root: Path, rel: str) -> str | None:
    with contextlib.suppress(OSError), _open_beneath(root, rel) as fd:
        return file_sha256(fd)
    return None


@contextlib.contextmanager
def _open_beneath(root: Path, rel: str) -> Iterator[int]:
    head, _, name = rel.rpartition("/")
    with _dir_beneath(root, head) as fd:
        leaf = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    try:
        yield leaf
    finally:
        os.close(leaf)


def read_host(root: Path, rel: str) -> bytes | None:
    try:
        with _open_beneath(root, rel) as fd, open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError:
        return None


# ------------------------------------------------------------ what changed


def changes(host: Path, entries: object) -> Scan:
    """The upper layer's entries (the guest's word) against the host directory."""
    if not isinstance(entries, list):
        return Scan([], [{"path": "", "why": "the scan is not a list"}])
    out: list[Change] = []
    skipped: list[dict[str, str]] = []
    in_upper = {e.get("path") for e in entries if isinstance(e, dict)}
    for e in entries:
        why = unsafe(e.get("path")) if isinstance(e, dict) else "not an entry"
        rel = e["path"] if why is None else str(e.get("path", "") if isinstance(e, dict) else "")
        kind = e.get("type") if isinstance(e, dict) else None
        if why is None and kind not in (*APPLIED, "whiteout"):
            why = str(kind) if isinstance(kind, str) else "unknown type"
        if why is None and kind == "file" and not (isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])):
            why = "no sha256"
        if why is None and kind == "symlink" and (not isinstance(e.get("target"), str) or unsafe_text(e["target"])):
            why = "a symlink target that is not text"
        if why is not None:
            skipped.append({"path": rel, "why": why})
            continue
        mode = int(e.get("mode", 0)) & 0o777 if isinstance(e.get("mode", 0), int) else 0o644
        st = lstat_beneath(host, rel)
        exists = st is not None
        if kind == "whiteout":
            if exists:
                out += _deleted(host, rel, st)
        elif kind == "file":
            if st is None:
                out.append(Change(rel, "added", "file", e["sha256"], mode))
            elif not stat.S_ISREG(st.st_mode) or host_sha256(host, rel) != e["sha256"] or stat.S_IMODE(st.st_mode) != mode:
                out.append(Change(rel, "modified", "file", e["sha256"], mode))
        elif kind == "symlink":
            if st is None:
                out.append(Change(rel, "added", "symlink", target=e["target"]))
            elif not stat.S_ISLNK(st.st_mode) or _readlink_beneath(host, rel) != e["target"]:
                out.append(Change(rel, "modified", "symlink", target=e["target"]))
        elif kind == "dir":
            if st is None:
                out.append(Change(rel, "added", "dir", mode=mode))
            elif not stat.S_ISDIR(st.st_mode):
                out.append(Change(rel, "modified", "dir", mode=mode))  # a symlink or file on the host, a directory now
            elif e.get("opaque"):
                # a directory removed and made again: what the host has under it and the guest does not is gone
                for crel, is_dir in sorted(_walk_below(host, rel)):
                    if crel not in in_upper:
                        out.append(Change(crel, "deleted", "dir" if is_dir else "file"))
    return Scan(sorted(out, key=lambda c: c.path), skipped)


def unsafe_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return "\0" in text or len(text) > MAX_PATH


def _readlink_beneath(root: Path, rel: str) -> str | None:
    head, _, name = rel.rpartition("/")
    try:
        with _dir_beneath(root, head) as fd:
            return os.readlink(name, dir_fd=fd)
    except OSError:
        return None


def _deleted(host: Path, rel: str, st: os.stat_result | None) -> list[Change]:
    if st is not None and stat.S_ISDIR(st.st_mode):
        below = [Change(crel, "deleted", "dir" if is_dir else "file") for crel, is_dir in _walk_below(host, rel)]
        return [Change(rel, "deleted", "dir"), *below]
    return [Change(rel, "deleted", "symlink" if st is not None and stat.S_ISLNK(st.st_mode) else "file")]


def unified(rel: str, old: bytes | None, new: bytes | None) -> str:
    """A unified diff of one text file ('' for binary files, with a note)."""
    if (old and b"\0" in old) or (new and b"\0" in new):
        return f"Binary files a/{rel} and b/{rel} differ\n"
    a = (old or b"").decode(errors="replace").splitlines(keepends=True)
    b = (new or b"").decode(errors="replace").splitlines(keepends=True)
    return "".join(difflib.unified_diff(a, b, f"a/{rel}" if old is not None else "/dev/null", f"b/{rel}" if new is not None else "/dev/null"))


# ------------------------------------------------------------ the reviewed set


def set_id(shares: dict[str, dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(shares, sort_keys=True).encode()).hexdigest()[:12]


def under(path: str, rels: Sequence[str] | None) -> bool:
    """Is `path` at or under one of `rels` (whole path components; "." is everything)? Always, when rels is None."""
    return rels is None or any(r == "." or path == r or path.startswith(r + "/") for r in rels)


def select(chosen: Iterable[Change], rels: Sequence[str] | None) -> list[Change]:
    """The changes at or under `rels`; all when rels is None."""
    return [c for c in chosen if under(c.path, rels)]

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
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
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


def _host_sha256(root: Path, rel: str) -> str | None:
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
            elif not stat.S_ISREG(st.st_mode) or _host_sha256(host, rel) != e["sha256"] or stat.S_IMODE(st.st_mode) != mode:
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


# ------------------------------------------------------------ apply


Snapshot = dict[str, list[int]]


def snapshot(root: Path) -> Snapshot:
    """What the host directory looked like: path → [size, mtime_ns, ctime_ns, inode, mode] (lstat), for conflict checks."""
    out: Snapshot = {}
    for base, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(base) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            out[str(p.relative_to(root))] = _noted(st)
    return out


def _noted(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode]


def changed_since(host: Path, c: Change, snap: Snapshot) -> bool:
    """Did the user change this path on the host since the sandbox started? Only an exact size, mtime,
    ctime and inode say no (ctime cannot be put back by cp -p, rsync -a or touch -r); a file that already
    has the guest's content is no conflict either."""
    st = lstat_beneath(host, c.path)
    if st is None:
        return c.path in snap  # it was there at the start and is gone now
    if c.what == "file" and c.sha256 and stat.S_ISREG(st.st_mode) and _host_sha256(host, c.path) == c.sha256:
        return False
    was = snap.get(c.path)
    if was is None or len(was) != 5:
        return True  # created on the host since (or noted by an older vivarium, which kept too little)
    if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(was[4]):
        return False  # a directory's own times move with its entries; those are checked one by one
    return _noted(st) != was


@dataclass
class ApplyResult:
    applied: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # changed on the host since the sandbox started: left alone
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, why): never written


@contextlib.contextmanager
def as_owner(owner: tuple[int, int] | None) -> Iterator[None]:
    """Write as the share's owner (effective ids), not as root; nothing changes when not root."""
    if owner is None or os.geteuid() != 0:
        yield
        return
    groups = os.getgroups()
    os.setgroups([owner[1]])
    os.setegid(owner[1])
    os.seteuid(owner[0])
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def _parent(root_fd: int, rel: str, made: set[str]) -> int:
    """A descriptor of rel's directory, walked from root_fd one component at a time, never through a symlink.
    A directory the change set makes where the host has a symlink replaces that symlink (`made`)."""
    fd = os.dup(root_fd)
    parts = rel.split("/")[:-1]
    for i, name in enumerate(parts):
        here = "/".join(parts[: i + 1])
        try:
            nxt = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR) or here not in made:
                os.close(fd)
                raise PermissionError(errno.EPERM, f"{here} is not a directory on the host") from None
            _replace_with_dir(fd, name, 0o755)
            nxt = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def _replace_with_dir(fd: int, name: str, mode: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            return
        os.unlink(name, dir_fd=fd)  # a symlink (never followed) or a file in the way
    os.mkdir(name, mode, dir_fd=fd)


def _write(fd: int, name: str, c: Change, data: bytes | None) -> None:
    tmp = f".{name[:200]}.vivarium-apply"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=fd)
    if c.what == "symlink":
        os.symlink(c.target, tmp, dir_fd=fd)
    else:
        assert data is not None
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        try:
            with open(out, "wb", closefd=False) as f:
                f.write(data)
            os.fchmod(out, c.mode & 0o777)
        finally:
            os.close(out)
    try:
        os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)  # replaces a symlink there, never what it points to
    except OSError:
        os.unlink(tmp, dir_fd=fd)
        raise


def _one(root_fd: int, c: Change, data: bytes | None, made: set[str]) -> None:
    name = c.path.rsplit("/", 1)[-1]
    fd = _parent(root_fd, c.path, made)
    try:
        if c.kind == "deleted":
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
        elif c.what == "dir":
            _replace_with_dir(fd, name, c.mode & 0o777)
            d = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                os.fchmod(d, c.mode & 0o777)
            finally:
                os.close(d)
        else:
            _write(fd, name, c, data)
    finally:
        os.close(fd)


def apply(
    host: Path,
    chosen: Iterable[Change],
    snap: Snapshot,
    content: Mapping[str, bytes],
    owner: tuple[int, int] | None,
) -> ApplyResult:
    """Bring `chosen` changes to the host. `content[path]` is a file's, already checked against its sha256."""
    result = ApplyResult()
    ordered = sorted(chosen, key=lambda c: (c.kind == "deleted", -c.path.count("/") if c.kind == "deleted" else c.path.count("/"), c.path))
    made = {c.path for c in ordered if c.what == "dir" and c.kind != "deleted"}
    root_fd = os.open(host, os.O_PATH | os.O_DIRECTORY)
    try:
        for c in ordered:
            if unsafe(c.path):
                result.refused.append((c.path, unsafe(c.path) or ""))
                continue
            if changed_since(host, c, snap):
                result.conflicts.append(c.path)
                continue
            data = content[c.path] if c.what == "file" and c.kind != "deleted" else None
            try:
                with as_owner(owner):
                    _one(root_fd, c, data, made)
            except OSError as e:
                result.refused.append((c.path, e.strerror or str(e)))
                continue
            st = lstat_beneath(host, c.path)
            if st is None:
                snap.pop(c.path, None)
            else:
                snap[c.path] = _noted(st)
            result.applied.append(c.path)
    finally:
        os.close(root_fd)
    return result


def save_snapshot(path: Path, snap: Snapshot) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snap))
    tmp.replace(path)


def load_snapshot(path: Path) -> Snapshot:
    data: Snapshot = json.loads(path.read_text())
    return data

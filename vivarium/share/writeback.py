"""Writing reviewed changes back to the host: what the host directory looked like when the sandbox started
(to leave alone what the user changed since), and applying a change set one path at a time, beneath the
share's root, never following a link, as the directory's owner."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vivarium.share.review import Change, host_sha256, lstat_beneath, unsafe

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
    if c.what == "file" and c.sha256 and stat.S_ISREG(st.st_mode) and host_sha256(host, c.path) == c.sha256:
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

"""The user namespace every share server runs in: never root of the host, whoever runs vivarium.

The guest's user (uid A in the guest) is a host uid inside it, as rootless Podman's `keep-id` maps
a container's user: a normal user's own uid, or, where root runs vivarium, the uid that owns the
shared directory. What the agent writes in a share is that user's on the host, and that user's
files are the agent's in the guest (root's 0700 `mktemp -d` included). Every other id the guest
may use lands on a subordinate range (a normal user's in /etc/subuid and /etc/subgid, mapped by
the setuid newuidmap and newgidmap; root's own there, else ROOT_RANGE): a file root in the guest
makes is owned by a subordinate uid, never by root.

The server is root of that namespace: on the host, the range's first uid with no supplementary
groups. Its capabilities reach only files whose owners the namespace maps, and it can neither
signal nor trace the user's processes (another uid), nor use the user's groups (docker, kvm);
the user, who owns the namespace, can still stop it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

# (inside, outside, count) triples, as uid_map has them
Mapping = tuple[tuple[int, int, int], ...]

CLONE_NEWUSER = 0x10000000


def subordinate(path: Path, user: str, uid: int) -> tuple[int, int] | None:
    """The first subordinate range (start, count) that `path` (/etc/subuid, /etc/subgid) gives the user."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)) and parts[1].isdigit() and parts[2].isdigit():
            if int(parts[2]) > 0:
                return int(parts[1]), int(parts[2])
    return None


def keep_id(inside: int, outside: int, start: int, count: int) -> Mapping:
    """`inside` (the guest's user) is `outside` (the host user); the ids below and above it, as many as the
    subordinate range holds, are that range."""
    below = min(inside, count)
    out = [(0, start, below)] if below else []
    out.append((inside, outside, 1))
    if count > below:
        out.append((inside + 1, start + below, count - below))
    return tuple(out)


def format_map(m: Mapping) -> str:
    return ",".join(f"{a}:{b}:{c}" for a, b, c in m)


def parse_map(text: str) -> Mapping:
    out = []
    for part in text.split(","):
        a, b, c = (int(x) for x in part.split(":"))
        out.append((a, b, c))
    return tuple(out)


# Root's share servers, where root has no subordinate range of its own: the ids systemd sets aside for
# "foreign" files (0x7FFE0000, 65536 of them), which no user of the host is.
ROOT_RANGE = (0x7FFE0000, 0x10000)
# Where QEMU, the gateway and the console's keeper started by root itself (no sudo) drop to: ids of each
# sandbox's own in the 65536 just above ROOT_RANGE, owned by no one, in no group; chosen by a digest of the
# sandbox's directory, four per sandbox: QEMU's a multiple of 4, then the gateway's, the console keeper's and the
# network namespace holder's (one uid each: none can signal another, or write where another writes).
QEMU_RANGE = (0x7FFF0000, 0x10000)


def sandbox_uid(key: str) -> int:
    """The uid QEMU of the sandbox `key` (its directory) runs as when root starts it."""
    return QEMU_RANGE[0] + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % (QEMU_RANGE[1] // 4) * 4


def gateway_uid(key: str) -> int:
    """The uid the gateway of the sandbox `key` serves as when root starts it (and its gid)."""
    return sandbox_uid(key) + 1


def keeper_uid(key: str) -> int:
    """The uid the console's keeper of the sandbox `key` writes as when root starts it (and its gid)."""
    return sandbox_uid(key) + 2


def holder_uid(key: str) -> int:
    """The uid the holder of the sandbox `key`'s network namespace becomes once QEMU runs, when root starts it."""
    return sandbox_uid(key) + 3


def drop_to(uid: int, gid: int) -> None:
    """Become `uid`:`gid` for good, in no other group, with no capability left and none to regain (no new privileges)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


def own_dir(directory: Path, uid: int) -> None:
    """`directory` (made 0700 if it is not there) and the plain files in it `uid`'s alone, for a process dropped
    to `uid` that keeps its files there (an earlier one's of another uid, or root's, become its); anything in it
    but a plain file or a directory is not one of its files, and goes (never followed)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chown(directory, uid, uid, follow_symlinks=False)
    os.chmod(directory, 0o700, follow_symlinks=False)
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                os.chown(entry.path, uid, uid, follow_symlinks=False)
            elif not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)


def maps(user: str, uid: int, gid: int, guest_uid: int, guest_gid: int) -> tuple[Mapping, Mapping] | str:
    """The uid and gid maps of a share server run by `user` (uid), where the guest's user is the host's uid
    and gid, or why there can be none. Root maps what it likes (its own range, else ROOT_RANGE); a normal
    user needs its subordinate ranges and newuidmap."""
    me = os.geteuid()
    if me != 0 and (shutil.which("newuidmap") is None or shutil.which("newgidmap") is None):
        return "newuidmap and newgidmap are missing (package uidmap)"
    subuid = subordinate(Path("/etc/subuid"), user, me) or (ROOT_RANGE if me == 0 else None)
    subgid = subordinate(Path("/etc/subgid"), user, me) or (ROOT_RANGE if me == 0 else None)
    if subuid is None or subgid is None:
        return f"user {user} has no subordinate {'uids' if subuid is None else 'gids'} (/etc/subuid, /etc/subgid)"
    return keep_id(guest_uid, uid, *subuid), keep_id(guest_gid, gid, *subgid)


libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    """A libc call's result: OSError with its errno unless it is 0."""
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def enter(uid_map: Mapping, gid_map: Mapping) -> None:
    """Move this process into a new user namespace with these maps, as its root."""
    ready_r, ready_w = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:  # stays in the host's namespace: newuidmap's setuid works only from there
        ok = False
        try:
            os.close(ready_w)
            os.read(ready_r, 1)
            if os.geteuid() == 0:  # root writes the maps itself
                for name, m in (("uid_map", uid_map), ("gid_map", gid_map)):
                    Path(f"/proc/{me}/{name}").write_text("".join(f"{a} {b} {c}\n" for a, b, c in m))
                ok = True
            else:
                ok = all(
                    subprocess.run([tool, str(me), *(str(x) for t in m for x in t)], check=False).returncode == 0
                    for tool, m in (("newuidmap", uid_map), ("newgidmap", gid_map))
                )
        finally:
            os._exit(0 if ok else 1)
    os.close(ready_r)
    try:
        check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    finally:
        os.write(ready_w, b"x")
        os.close(ready_w)
    _, status = os.waitpid(helper, 0)
    if status != 0:
        raise OSError(1, "newuidmap or newgidmap refused the namespace's maps (see above)")
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)  # root here: every capability of the namespace, kept across exec

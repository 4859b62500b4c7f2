"""What a share server may do to the host tree, enforced on the host before it starts.

    python -m vivarium.share.confine --root DIR [--ro] [--protect REL]... -- virtiofsd ARGS...

It first raises its open-file limit (open_files below). Given --uid-map, it then enters a user namespace
of the share's own (userns.py: the guest's user is the host user there, the guest's other ids subordinate
ones). Then, in a private
mount namespace of its own (so nothing here shows on the host), it
  - makes DIR read-only (--ro), or makes each existing --protect path read-only
    (a read-only bind mount: root in the guest remounting its own view changes
    nothing here) and pins the directories above it (a mount point cannot be
    renamed or removed, so `.git` cannot be moved aside and made again);
  - installs a seccomp filter that refuses to set setuid/setgid bits (chmod,
    and a create's mode) and to make device nodes, fifos and sockets;
then execs the server. The guest's file operations are carried out by that
server, as root of that user namespace: these are the limits root in the guest
meets on the host.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import resource
import stat
import struct
import sys
from collections.abc import Sequence

from vivarium.share import userns

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_PRIVATE, MS_STRICTATIME = 1024, 2048, 1 << 18, 1 << 24
CLONE_NEWNS = 0x00020000

# ------------------------------------------------------------ the seccomp filter

# seccomp_data: int nr; u32 arch; u64 ip; u64 args[6] (the low 32 bits first: little-endian)
_NR, _ARCH = 0, 4
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD, _JEQ, _JGE, _JSET, _AND, _RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
SPECIAL_BITS = 0o6000  # setuid, setgid
CREATE_FLAGS = 0o100 | 0o20000000  # O_CREAT, __O_TMPFILE

# arch: (AUDIT_ARCH, x32 bit or 0, {syscall: (kind, arg indexes)})
# kinds: mode (the arg may not carry SPECIAL_BITS), open (flags, mode: the mode checked when creating),
# mknod (only regular files, no SPECIAL_BITS), nosys (cannot be inspected: refused, callers fall back)
ARCHES: dict[str, tuple[int, int, dict[int, tuple[str, tuple[int, ...]]]]] = {
    "x86_64": (0xC000003E, 0x40000000, {
        90: ("mode", (1,)), 91: ("mode", (1,)), 268: ("mode", (2,)), 452: ("mode", (2,)),  # chmod fchmod fchmodat fchmodat2
        85: ("mode", (1,)), 2: ("open", (1, 2)), 257: ("open", (2, 3)), 437: ("nosys", ()),  # creat open openat openat2
        133: ("mknod", (1,)), 259: ("mknod", (2,)),  # mknod mknodat
    }),
    "aarch64": (0xC00000B7, 0, {
        52: ("mode", (1,)), 53: ("mode", (2,)), 452: ("mode", (2,)),  # fchmod fchmodat fchmodat2
        56: ("open", (2, 3)), 437: ("nosys", ()), 33: ("mknod", (2,)),  # openat openat2 mknodat
    }),
}  # fmt: skip


def _ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def _arg(i: int) -> int:
    return 16 + 8 * i


def _block(nr: int, kind: str, args: tuple[int, ...]) -> list[bytes]:
    """One syscall's check; it falls through to the next block when the number differs."""
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    if kind == "mode":
        body = [_ins(_LD, _arg(args[0])), _ins(_JSET, SPECIAL_BITS, 0, 1), _ins(_RET, eperm), _ins(_RET, _RET_ALLOW)]
    elif kind == "open":
        body = [
            _ins(_LD, _arg(args[0])), _ins(_JSET, CREATE_FLAGS, 0, 3),
            _ins(_LD, _arg(args[1])), _ins(_JSET, SPECIAL_BITS, 0, 1),
            _ins(_RET, eperm), _ins(_RET, _RET_ALLOW),
        ]  # fmt: skip
    elif kind == "mknod":
        body = [
            _ins(_LD, _arg(args[0])), _ins(_JSET, SPECIAL_BITS, 4, 0),
            _ins(_AND, 0o170000), _ins(_JEQ, 0, 1, 0), _ins(_JEQ, stat.S_IFREG, 0, 1),
            _ins(_RET, _RET_ALLOW), _ins(_RET, eperm),
        ]  # fmt: skip
    elif kind == "nosys":
        body = [_ins(_RET, enosys)]
    else:
        raise ValueError(kind)
    return [_ins(_LD, _NR), _ins(_JEQ, nr, 0, len(body)), *body]


def seccomp_program(arch: str) -> bytes:
    """The filter as a classic BPF program (sock_filter[]) for `arch`."""
    audit, x32, calls = ARCHES[arch]
    eperm = _RET_ERRNO | errno.EPERM
    prog = [_ins(_LD, _ARCH), _ins(_JEQ, audit, 1, 0), _ins(_RET, eperm)]  # another ABI (i386 on x86_64): nothing
    if x32:
        prog += [_ins(_LD, _NR), _ins(_JGE, x32, 0, 1), _ins(_RET, eperm)]
    for nr, (kind, args) in calls.items():
        prog += _block(nr, kind, args)
    prog.append(_ins(_RET, _RET_ALLOW))
    return b"".join(prog)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp() -> None:
    program = seccomp_program(platform.machine())
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _Fprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    userns.check(userns.libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    userns.check(userns.libc.prctl(22, 2, ctypes.byref(fprog), 0, 0), "PR_SET_SECCOMP")


# ------------------------------------------------------------ the mounts


def _mount(source: str | None, target: str, flags: int) -> None:
    userns.check(userns.libc.mount(source.encode() if source else None, target.encode(), None, flags, None), f"mount {target}")


def _readonly_flags(path: str) -> int:
    """A read-only remount's flags for what `path` names: its own noexec and atime kept, which a user
    namespace may not clear (the kernel locks them on mounts it inherited)."""
    has = os.statvfs(path).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | (MS_NOEXEC if has & os.ST_NOEXEC else 0)
    if has & os.ST_NOATIME:
        flags |= MS_NOATIME
    elif not has & os.ST_RELATIME:
        flags |= MS_STRICTATIME
    return flags | (MS_NODIRATIME if has & os.ST_NODIRATIME else 0)


def _bind(fd: int, readonly: bool, reopen: tuple[int, str] | None = None) -> None:
    """A bind mount of what `fd` (O_PATH) is onto itself: the exact object checked, no path walked again.
    Made read-only through `reopen` (its parent's fd and its name): `fd` still names what lies under the new mount."""
    here = f"/proc/self/fd/{fd}"
    _mount(here, here, MS_BIND)
    if readonly:
        assert reopen is not None
        top = os.open(reopen[1], os.O_PATH | os.O_NOFOLLOW, dir_fd=reopen[0])
        try:
            _mount(None, f"/proc/self/fd/{top}", _readonly_flags(f"/proc/self/fd/{top}"))
        finally:
            os.close(top)


def _mnt_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOENT, "no mnt_id in fdinfo")


def protect(root: str, rel: str) -> str:
    """Make root/rel read-only and pin the directories between; never following a symlink. What was done, in words."""
    parts = rel.strip("/").split("/")
    fds = [os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)]
    try:
        for i, name in enumerate(parts):
            try:
                st = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
            except FileNotFoundError:
                return f"{rel}: absent"
            if stat.S_ISLNK(st.st_mode):
                return f"{rel}: a symlink, left as it is"
            last = i == len(parts) - 1
            if not last and not stat.S_ISDIR(st.st_mode):
                return f"{rel}: absent"
            child = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fds[-1])
            if not last and _mnt_id(child) == _mnt_id(fds[-1]):
                _bind(child, readonly=False)  # pinned: a mount point cannot be renamed away
                os.close(child)
                child = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fds[-1])  # the pin itself, to walk on in it
            fds.append(child)
        _bind(fds[-1], readonly=True, reopen=(fds[-2], parts[-1]))
        return f"{rel}: read-only"
    finally:
        for fd in fds:
            os.close(fd)


NOFILE = 1_000_000  # what both daemons ask for themselves, which in a user namespace they cannot get past the hard limit


def open_files() -> tuple[int, int]:
    """Raise this process's open-file limit for the server: it holds a descriptor for each inode the guest has
    looked up, and a login session's 1024 (systemd's soft limit) ran out at the guest's 1007th new file. Root
    raises both limits to NOFILE (at most fs.nr_open) while it still may, before the user namespace; anyone
    raises the soft limit to the hard one. The sandbox's cgroup bounds the kernel memory those descriptors take.
    Returns the limits it leaves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < NOFILE:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                most = int(f.read())
        except (OSError, ValueError):
            most = NOFILE
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(NOFILE, most)), max(hard, min(NOFILE, most))))
        except (OSError, ValueError):
            pass  # not root of the host's namespace after all (a container): the soft limit below still rises
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vivarium.share.confine")
    p.add_argument("--root", required=True)
    p.add_argument("--ro", action="store_true")
    p.add_argument("--protect", action="append", default=[])
    p.add_argument("--uid-map", type=userns.parse_map, help="enter a user namespace: inside:outside:count,...")
    p.add_argument("--gid-map", type=userns.parse_map)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command")
    open_files()
    if args.uid_map:
        userns.enter(args.uid_map, args.gid_map or ())
        try:
            os.stat(args.root)
        except PermissionError:  # a directory above it that only someone the namespace does not map may enter
            raise SystemExit(f"{args.root} is out of reach of its owner: a directory above it is closed to them") from None
    userns.check(userns.libc.unshare(CLONE_NEWNS), "unshare")
    _mount(None, "/", MS_REC | MS_PRIVATE)
    if args.ro:
        fd = os.open(args.root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        _bind(fd, readonly=False)
        os.close(fd)
        _mount(None, args.root, _readonly_flags(args.root))
    else:
        for rel in args.protect:
            print(f"vivarium: {protect(args.root, rel)}", file=sys.stderr)
    install_seccomp()
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())

"""Host directories into the guest over virtiofs.

QEMU's own virtiofsd (bookworm ships the C one at /usr/lib/qemu/virtiofsd;
newer systems the Rust one) serves each share on a vhost-user socket; QEMU's
guest RAM must then be shared memory (memfd). Each server starts behind
confine.py, in a private mount namespace: a read-only share is a read-only
bind mount there, and an rw share's protected paths are, so nothing the guest
does, as root or not, can write through them; and a seccomp filter keeps
setuid/setgid bits, device nodes and fifos off the host. The server is root of a
user namespace (userns.py), never of the host: there the guest's user is the host
user (or the shared directory's owner, where root runs vivarium).
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vivarium.errors import MissingProgram, VMError
from vivarium.run import spawn
from vivarium.share import userns

CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "/usr/lib/virtiofsd")


@dataclass(frozen=True)
class ShareSpec:
    tag: str  # the mount tag the guest sees
    source: Path  # host directory
    guest: Path  # mount point in the guest
    mode: str  # rw | ro | review (served read-only; the guest writes into an overlay on its own disk)
    socket: Path
    protect: tuple[str, ...] = ()  # paths under source kept read-only in an rw share
    guest_uid: int = 1000  # the guest's user: the host user (or, run by root, the shared directory's owner) in the server's namespace

    @property
    def readonly(self) -> bool:
        return self.mode != "rw"


# Capabilities the share server does not get: no device nodes, no file capabilities, and
# setuid/setgid bits cleared on every write (confine.py's filter refuses to set them).
MODCAPS = "-mknod:-setfcap:-fsetid"


def find_virtiofsd() -> str:
    for c in CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which("virtiofsd")
    if found:
        return found
    raise MissingProgram("virtiofsd", "qemu-system-common (Debian 12) or virtiofsd (Debian 13 and later)")


def is_c_daemon(binary: str) -> bool:
    """QEMU's own virtiofsd (C, Debian 12's qemu-system-common), not the Rust one: their options differ."""
    return binary.endswith("/qemu/virtiofsd")


@functools.cache
def migrates() -> bool:
    """Can this host's share server hand its state to a migration, so that a snapshot keeps the shares?
    The Rust virtiofsd can from 1.11 (`--migration-mode`; Debian 13 has 1.13); QEMU's own C one cannot."""
    try:
        binary = find_virtiofsd()
    except MissingProgram:
        return False
    if is_c_daemon(binary):
        return False
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--migration-mode" in out


def namespace_maps(guest_uid: int, source: Path | None = None) -> tuple[userns.Mapping, userns.Mapping] | str:
    """The share server's user namespace (userns.py), or why there can be none: the guest's user (and its
    group, of the same number) is this user, or where root runs vivarium, whoever owns `source`."""
    me = pwd.getpwuid(os.getuid())
    uid, gid = me.pw_uid, me.pw_gid
    if os.geteuid() == 0 and source is not None:
        try:
            st = source.stat()
        except OSError as e:
            return e.strerror or str(e)
        uid, gid = st.st_uid, st.st_gid
    return userns.maps(me.pw_name, uid, gid, guest_uid, guest_uid)


def virtiofsd_argv(binary: str, share: ShareSpec, fd: int, ids: tuple[userns.Mapping, userns.Mapping]) -> list[str]:
    """The virtiofsd command line, behind confine.py: its user namespace (`ids`), its mounts (read-only,
    protected paths), its seccomp filter; its socket (`fd`) made by vivarium."""
    if is_c_daemon(binary):
        daemon = [binary, f"--fd={fd}", "-o", f"source={share.source}", "-o", "cache=auto", "-o", f"modcaps={MODCAPS}"]
    else:  # the Rust daemon
        daemon = [binary, f"--fd={fd}", f"--shared-dir={share.source}", "--cache=auto", f"--modcaps={MODCAPS}"]
    limits = ["--ro"] if share.readonly else [x for rel in share.protect for x in ("--protect", rel)]
    limits += ["--uid-map", userns.format_map(ids[0]), "--gid-map", userns.format_map(ids[1])]
    return [sys.executable, "-m", "vivarium.share.confine", "--root", str(share.source), *limits, "--", *daemon]


def prepare(share: ShareSpec) -> None:
    """An empty .git/hooks where a repository has none, so that it can be protected (git makes one itself)."""
    git = share.source / ".git"
    hooks = git / "hooks"
    if ".git/hooks" in share.protect and git.is_dir() and not git.is_symlink() and not os.path.lexists(hooks):
        st = git.stat()
        hooks.mkdir(mode=0o755)
        os.chown(hooks, st.st_uid, st.st_gid)


def supported(guest_uid: int = 1000) -> str | None:
    """Why shares cannot be served here, or None when they can."""
    try:
        find_virtiofsd()
    except MissingProgram as e:
        return f"{e.message} ({e.hint})"
    ids = namespace_maps(guest_uid)
    return f"{ids}, which the share server's user namespace needs" if isinstance(ids, str) else None


READY = b"Waiting for vhost-user socket connection"  # what both daemons print once they listen


def start(share: ShareSpec, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Start virtiofsd for one share and wait until it listens."""
    share.socket.unlink(missing_ok=True)
    binary = find_virtiofsd()
    if not share.readonly:
        prepare(share)
    log = share.socket.with_suffix(".log")
    offset = log.stat().st_size if log.exists() else 0
    ids = namespace_maps(share.guest_uid, share.source)
    if isinstance(ids, str):
        raise VMError(f"cannot share {share.source}: {ids}", hint="`vivarium doctor` says what this host lacks")
    # The socket is vivarium's, handed over open: the C daemon would otherwise keep a lock file under /run.
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(share.socket))
        listener.listen(1)
        # In its own session so it outlives the CLI; it exits when QEMU goes away.
        # (The C daemon's --daemonize only returns once QEMU has connected.)
        with log.open("ab") as logfile:
            proc = spawn(virtiofsd_argv(binary, share, listener.fileno(), ids), stdout=logfile, stderr=subprocess.STDOUT,
                         start_new_session=True, pass_fds=(listener.fileno(),))  # fmt: skip
    finally:
        listener.close()
    deadline = time.monotonic() + timeout
    while not _said(log, offset, READY):
        if proc.poll() is not None:
            last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise VMError(f"virtiofsd for {share.source} exited: {last}", hint=f"log: {log}")
        if time.monotonic() > deadline:
            proc.kill()
            raise VMError(f"virtiofsd for {share.source} did not start", hint="run with --debug to see its command line")
        time.sleep(0.05)
    return proc


def _said(log: Path, offset: int, what: bytes) -> bool:
    with log.open("rb") as f:
        f.seek(offset)
        return what in f.read()

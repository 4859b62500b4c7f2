"""Host directories into the guest over virtiofs.

QEMU's own virtiofsd (bookworm ships the C one at /usr/lib/qemu/virtiofsd;
newer systems the Rust one) serves each share on a vhost-user socket; QEMU's
guest RAM must then be shared memory (memfd). A read-only share is served
from a read-only bind mount in a private mount namespace, so nothing the
guest does, as root or not, can write through it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vivarium.errors import MissingProgram, VMError
from vivarium.run import spawn

CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "/usr/lib/virtiofsd")


@dataclass(frozen=True)
class ShareSpec:
    tag: str  # the mount tag the guest sees
    source: Path  # host directory
    guest: Path  # mount point in the guest
    mode: str  # rw | ro | review (served read-only; the guest writes into an overlay on its own disk)
    socket: Path

    @property
    def readonly(self) -> bool:
        return self.mode != "rw"


def find_virtiofsd() -> str:
    for c in CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which("virtiofsd")
    if found:
        return found
    raise MissingProgram("virtiofsd", "qemu-system-common (Debian 12) or virtiofsd (Debian 13 and later)")


def virtiofsd_argv(binary: str, share: ShareSpec) -> list[str]:
    """The virtiofsd command line; read-only shares get a read-only bind mount first."""
    if binary.endswith("/qemu/virtiofsd"):  # the C daemon
        daemon = [binary, f"--socket-path={share.socket}", "-o", f"source={share.source}", "-o", "cache=auto"]
    else:  # the Rust daemon
        daemon = [binary, f"--socket-path={share.socket}", f"--shared-dir={share.source}", "--cache=auto"]
    if not share.readonly:
        return daemon
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "vivarium-ro", str(share.source), *daemon]


def supported() -> str | None:
    """Why shares cannot be served here, or None when they can."""
    if os.geteuid() != 0:
        return "virtiofsd needs root"
    try:
        find_virtiofsd()
    except MissingProgram as e:
        return f"{e.message} ({e.hint})"
    return None


def start(share: ShareSpec, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Start virtiofsd for one share and wait for its socket."""
    share.socket.unlink(missing_ok=True)
    binary = find_virtiofsd()
    argv = virtiofsd_argv(binary, share)
    # In its own session so it outlives the CLI; it exits when QEMU goes away.
    # (The C daemon's --daemonize only returns once QEMU has connected.)
    log = share.socket.with_suffix(".log")
    with log.open("ab") as logfile:
        proc = spawn(argv, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not share.socket.exists():
        if proc.poll() is not None:
            last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise VMError(f"virtiofsd for {share.source} exited: {last}", hint=f"log: {log}")
        if time.monotonic() > deadline:
            proc.kill()
            raise VMError(f"virtiofsd for {share.source} did not start", hint="run with --debug to see its command line")
        time.sleep(0.05)
    return proc

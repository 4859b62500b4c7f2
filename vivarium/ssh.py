"""SSH into an instance: keys, the ssh argv, readiness.

Each instance has its own client key and its own host key, both made on the
host; the guest gets them at boot over fw_cfg. So the host knows the guest's
host key before the first connection and checks it strictly.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vivarium.errors import UsageError
from vivarium.run import find_program, run

# The key exchange for a connection that never leaves this host (127.0.0.1 to
# QEMU's forward): plain X25519. OpenSSH's default adds post-quantum sntrup761,
# against recording traffic now to break it later; on loopback there is no one
# to record it who is not root here already, and under TCG it costs the guest
# ~0.2 s per login.
KEX = "curve25519-sha256,curve25519-sha256@libssh.org"
CONTROL_PERSIST = 60  # seconds a shared connection outlives its last command
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; ssh adds a suffix while it sets the socket up


def make_keys(client_key: Path, host_key: Path, known_hosts: Path, alias: str) -> None:
    """Generate the instance's client key and host key, and pin the host key."""
    for key, comment in ((client_key, f"vivarium-{alias}"), (host_key, f"vivarium-{alias}-host")):
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key])
    pub = host_key.with_suffix(".pub").read_text().split()
    known_hosts.write_text(f"{alias} {pub[0]} {pub[1]}\n")


@dataclass(frozen=True)
class Target:
    """Where and as whom to connect."""

    alias: str  # HostKeyAlias, also the ssh-config Host name
    user: str
    port: int
    key: Path
    known_hosts: Path
    host: str = "127.0.0.1"
    # One SSH connection shared by every command for a while (OpenSSH's
    # multiplexing): a login costs a TCG guest ~0.5 s of sshd work, a command
    # over an open connection a few ms. None (or a path too long for a unix
    # socket) connects afresh each time.
    control_path: Path | None = None

    def options(self) -> list[str]:
        return [
            *self._mux(),
            "-o", f"HostKeyAlias={self.alias}",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "ForwardAgent=no",
            "-o", "ForwardX11=no",
            "-o", "PermitLocalCommand=no",
            "-o", f"KexAlgorithms={KEX}",
            "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10",
            "-o", "ServerAliveInterval=15",
            "-i", str(self.key),
            "-p", str(self.port),
        ]  # fmt: skip

    def _mux(self) -> list[str]:
        if self.control_path is None or len(str(self.control_path)) > MAX_SOCKET_PATH:
            return []
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}", "-o", f"ControlPersist={CONTROL_PERSIST}"]

    def argv(self, command: Sequence[str] = (), *, tty: bool | None = None, batch: bool = True) -> list[str]:
        """ssh argv; `command` keeps its word boundaries on the far side."""
        flags = ["-t"] if tty else ["-T"] if tty is False else []
        if batch:
            flags += ["-o", "BatchMode=yes"]
        remote = [shlex.join(command)] if command else []
        return [find_program("ssh"), *self.options(), *flags, "--", f"{self.user}@{self.host}", *remote]

    def config_block(self) -> str:
        return "\n".join([
            f"Host {self.alias}",
            f"  HostName {self.host}",
            f"  Port {self.port}",
            f"  User {self.user}",
            f"  IdentityFile {self.key}",
            "  IdentitiesOnly yes",
            f"  HostKeyAlias {self.alias}",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  StrictHostKeyChecking yes",
            f"  KexAlgorithms {KEX}",
            # Nothing of this host for the guest, whatever a later `Host *` says (ssh takes the first value):
            # root in the guest could use a forwarded agent to sign as you, or a forwarded X display to watch you.
            "  ForwardAgent no",
            "  ForwardX11 no",
            "  IdentityAgent none",
            "  PermitLocalCommand no",
            "",
        ])  # fmt: skip


def execute(
    target: Target, command: Sequence[str], *, capture: bool = False, input: str | None = None, timeout: float | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command over SSH as the target's user; its exit code is returned as is. In the guest directory
    `cwd` if given and there, else in the user's home."""
    if not command:
        raise UsageError("exec needs a command", hint="vivarium exec NAME -- CMD...")
    if cwd is not None:
        command = ["sh", "-c", 'cd -- "$0" 2>/dev/null || cd; exec "$@"', cwd, *command]
    return subprocess.run(
        target.argv(command, tty=False), input=input, stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=capture, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def banner(host: str, port: int, timeout: float = 3.0) -> bool:
    """Does an SSH server answer on host:port? (No ssh process: cheap to poll.)"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def check(target: Target, timeout: float = 20.0) -> bool:
    """One real login: sshd up is not enough, the key must be in place."""
    try:
        proc = subprocess.run(target.argv(["true"]), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def ensure_include(config: Path, conf_dir: Path) -> bool:
    """Make ~/.ssh/config include vivarium's per-sandbox blocks (once, at the top). True if it was added."""
    line = f"Include {conf_dir}/*.conf"
    text = config.read_text() if config.exists() else ""
    if line in text.splitlines():
        return False
    config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Include must come before any Host block to apply to every host
    config.write_text(f"# added by vivarium: sandboxes by name (vivarium-NAME)\n{line}\n\n{text}")
    os.chmod(config, 0o600)
    return True

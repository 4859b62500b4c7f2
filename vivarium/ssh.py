"""SSH into an instance: keys, the ssh argv, readiness.

Each instance has its own client key and its own host key, both made on the
host; the guest gets them at boot over fw_cfg. So the host knows the guest's
host key before the first connection and checks it strictly.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vivarium.errors import UsageError
from vivarium.run import find_program, run

# The key exchange for a connection that never leaves this host (127.0.0.1 to
# QEMU's forward): plain X25519. OpenSSH's default adds post-quantum sntrup761,
# against recording traffic now to break it later; on loopback there is no one
# to record it who is not root here already, and under TCG it costs the guest
# ~0.2 s per login.
KEX = "curve25519-sha256,curve25519-sha256@libssh.org"
CONTROL_PERSIST = 60  # seconds a shared connection outlives its last command
MAX_SOCKET_PATH = 90  # sun_path holds 107 bytes; ssh first binds the path plus ".XXXXXXXXXXXXXXXX" (17 more)


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
        flags = ["-tt"] if tty else ["-T"] if tty is False else []  # -tt: a terminal even when ours is not one
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


Input = str | bytes | IO[bytes] | None
Output = Callable[[bytes], None]
INHERIT = "inherit"  # exec's stdin is this process's (ssh's own default): `vivarium exec` passes yours through


def execute(
    target: Target, command: Sequence[str], *, capture: bool = False, input: Input = None, stdin: str | None = None,
    tty: bool | None = False, timeout: float | None = None, cwd: str | None = None,
    on_stdout: Output | None = None, on_stderr: Output | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a command over SSH as the target's user; its exit code is returned as is. In the guest directory
    `cwd` if given and there, else in the user's home.

    Its input: `input` (text, bytes or a binary file, to its end: the command then reads EOF), or with
    stdin=INHERIT this process's own, else nothing. `tty`: True forces a terminal, False none, None as ssh
    decides. Output goes to `on_stdout` / `on_stderr` as it comes, and is kept (as text) with `capture`."""
    if not command:
        raise UsageError("exec needs a command", hint="vivarium exec NAME -- CMD...")
    if cwd is not None:
        command = ["sh", "-c", 'cd -- "$0" 2>/dev/null || cd; exec "$@"', cwd, *command]
    argv = target.argv(command, tty=tty)
    if on_stdout is None and on_stderr is None and not isinstance(input, (bytes, bytearray)) and not hasattr(input, "read"):
        return subprocess.run(argv, input=input, stdin=_stdin(input, stdin), capture_output=capture, text=True, timeout=timeout, check=False)
    return _stream(argv, capture, input, stdin, timeout, on_stdout, on_stderr)


def _stdin(input: Input, stdin: str | None) -> Any:
    if input is not None:
        return None  # subprocess makes the pipe
    return None if stdin == INHERIT else subprocess.DEVNULL


def _stream(argv: list[str], capture: bool, input: Input, stdin: str | None, timeout: float | None,
            on_stdout: Output | None, on_stderr: Output | None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """exec's general case: bytes or a file in, output to callbacks as it comes."""
    fileno = None
    if hasattr(input, "fileno"):
        with contextlib.suppress(OSError, ValueError):
            fileno = input.fileno()  # type: ignore[union-attr]
    feed = input is not None and fileno is None
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE if feed else fileno if fileno is not None else _stdin(None, stdin),
        stdout=subprocess.PIPE if capture or on_stdout else None, stderr=subprocess.PIPE if capture or on_stderr else None,
    )  # fmt: skip
    writer = None
    if feed:
        writer = threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True)
        writer.start()
    kept: dict[int, list[bytes]] = {1: [], 2: []}
    calls = {1: on_stdout, 2: on_stderr}
    deadline = None if timeout is None else time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for n, pipe in ((1, proc.stdout), (2, proc.stderr)):
            if pipe is not None:
                sel.register(pipe, selectors.EVENT_READ, n)
        while sel.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(argv, timeout or 0)
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if (call := calls[key.data]) is not None:
                    call(data)
                if capture:
                    kept[key.data].append(data)
    code = proc.wait(None if deadline is None else max(0.1, deadline - time.monotonic()))
    if writer is not None:
        writer.join(5)
    return subprocess.CompletedProcess(argv, code, b"".join(kept[1]).decode(errors="replace") if capture else None,
                                       b"".join(kept[2]).decode(errors="replace") if capture else None)  # fmt: skip


def _feed(pipe: IO[bytes] | None, input: Input) -> None:
    """Write `input` to the command's stdin, then close it (its EOF); a command that stops reading ends it."""
    assert pipe is not None
    try:
        if isinstance(input, str):
            pipe.write(input.encode())
        elif isinstance(input, (bytes, bytearray)):
            pipe.write(input)
        elif input is not None:
            while chunk := input.read(65536):
                pipe.write(chunk)
    except (BrokenPipeError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


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

"""The gateway's processes: a supervisor that keeps one serving process alive for as long as
QEMU runs, and the serving process itself (gateway.Gateway), which never outlives it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from vivarium import state
from vivarium.errors import VMError
from vivarium.logfile import Rotating
from vivarium.net import terminate
from vivarium.net.gateway import (
    AUDIT,
    AUDIT_CAP,
    CHILD_PIDFILE,
    LAUNCHED,
    NO_NAMESPACE,
    PIDFILE,
    POLICY,
    SECRETS_SOCKET,
    SERVING,
    Gateway,
    Handed,
    Settings,
)
from vivarium.share import userns

ACK_TIMEOUT = 10.0  # for the serving process to take a secret
PIPE_SIZE = 1 << 20  # the audit pipe's: the serving process writes on while the file is being rotated
F_SETPIPE_SZ = 1031
CLIENT_TIMEOUT = 5.0  # for `run --secret` to say what it hands over


def serve(directory: Path, supervisor: int | None = None, handed: Handed | None = None) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop handles it: a reload must never kill us
    if supervisor is not None:
        # Never serve unsupervised: when the supervisor dies (killed), so does this process, at once
        # (egress fails closed until `vivarium up` starts a gateway again).
        watch = os.pidfd_open(supervisor)
        if os.getppid() != supervisor:
            sys.exit(1)
        threading.Thread(target=_exit_with, args=(watch,), daemon=True).start()
    # two descriptors per relayed connection: take what the hard limit allows
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536 if hard == resource.RLIM_INFINITY else min(hard, 65536), hard))
    try:
        asyncio.run(Gateway(directory, handed).serve())
    except VMError as e:  # the sandbox's namespace is gone: no restart can help
        print(f"gateway: {e}", file=sys.stderr, flush=True)
        sys.exit(NO_NAMESPACE)


def _exit_with(pidfd: int) -> None:
    select.select([pidfd], [], [])
    print("gateway: the supervisor is gone; the serving process stops", file=sys.stderr, flush=True)
    os._exit(1)


class Keeper:
    """The secrets `run --secret` hands over (an owner-only socket), held in this process's memory, which
    parses none of the guest's bytes, and given to every serving process it starts: one restarted after a
    crash puts them in as the first did. Never written down."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / SECRETS_SOCKET
        self.path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # the socket that takes real values: owner-only
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        self.listener.listen(8)
        self.held: dict[str, bytes] = {}  # name → its line, as handed over
        self.child: socket.socket | None = None
        self.replies: BinaryIO | None = None  # the child's replies, a line per secret sent
        self.unanswered = 0

    def for_child(self) -> socket.socket:
        """The end a new serving process inherits; every secret held is already on its way to it."""
        if self.child is not None:
            self.child.close()
        mine, theirs = socket.socketpair()
        mine.settimeout(ACK_TIMEOUT)
        self.child, self.replies, self.unanswered = mine, mine.makefile("rb"), 0
        for line in self.held.values():
            self._send(line)
        return theirs

    def _send(self, line: bytes) -> None:
        assert self.child is not None
        self.child.sendall(line)
        self.unanswered += 1

    def _answer(self) -> str:
        """The serving process's reply to the last secret sent (the earlier ones' read and passed over)."""
        reply = ""
        while self.unanswered:
            assert self.replies is not None
            reply = self.replies.readline().decode(errors="replace").strip()
            if not reply:
                raise OSError("the serving process is gone")
            self.unanswered -= 1
        return reply

    def serve_one(self) -> None:
        """One `run --secret`: a JSON line per secret, each answered "ok" or why not."""
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            try:
                for line in conn.makefile("rb"):
                    conn.sendall(self._take(line if line.endswith(b"\n") else line + b"\n").encode() + b"\n")
            except OSError:
                pass

    def _take(self, line: bytes) -> str:
        try:
            name = terminate.parse_secret(line).name
        except ValueError as e:
            return f"refused: {e}"
        self.held[name] = line
        if self.child is None:
            return "ok"  # the serving process about to start gets it
        try:
            self._send(line)
            reply = self._answer()
        except OSError as e:
            reply = f"the serving process did not answer ({e}); try again"
        if reply != "ok":
            del self.held[name]
            return reply if reply.startswith("refused") else f"refused: {reply}"
        return "ok"

    def close(self, unlink: bool) -> None:
        self.listener.close()
        if self.child is not None:
            self.child.close()
        if unlink:
            self.path.unlink(missing_ok=True)


class Child:
    """A serving process and what it was handed: the pipe of its audit records (copied into the log by a thread
    of the supervisor's, whole lines: whatever the child writes, it cannot write past the log's cap or outside
    it), and the pipe the policy goes down when it changes (it may not read the policy file: it dropped root)."""

    def __init__(self, directory: Path, keeper: Keeper, log: Rotating, lock: threading.Lock) -> None:
        audit_r, audit_w = os.pipe2(os.O_CLOEXEC)
        policy_r, self.policy = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.policy, False)  # a child that is stuck misses a change rather than stall the supervisor
        with contextlib.suppress(OSError):
            fcntl.fcntl(audit_w, F_SETPIPE_SZ, PIPE_SIZE)
        theirs = keeper.for_child()
        uid = userns.gateway_uid(str(directory)) if os.geteuid() == 0 else None
        fds = (theirs.fileno(), audit_w, policy_r)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "vivarium.net", "--dir", str(directory), "--serve",
                                          "--supervisor", str(os.getpid()), "--secrets-fd", str(fds[0]), "--audit-fd", str(audit_w),
                                          "--policy-fd", str(policy_r), *(["--uid", str(uid)] if uid is not None else [])],
                                         pass_fds=fds)  # fmt: skip
        finally:
            theirs.close()
            os.close(audit_w)
            os.close(policy_r)
        threading.Thread(target=_copy, args=(audit_r, log, lock), daemon=True).start()

    def hand(self, data: dict[str, object]) -> None:
        """The policy, changed: a JSON line down its pipe (a child that is gone or stuck misses it)."""
        line = json.dumps(data, separators=(",", ":")).encode() + b"\n"
        with contextlib.suppress(OSError):
            os.write(self.policy, line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.policy)


def _copy(source: int, log: Rotating, lock: threading.Lock) -> None:
    """A serving process's audit records into the log, a whole line per write, until it is gone (a line it was
    cut off in goes in as it is: the next one starts on a line of its own)."""
    rest = b""
    try:
        while data := os.read(source, 1 << 16):
            *lines, rest = (rest + data).split(b"\n")
            if len(rest) > log.cap.size:
                lines, rest = [*lines, rest], b""
            with lock, contextlib.suppress(OSError):  # a full disk loses records, not the gateway
                for line in lines:
                    log.write(line + b"\n")
        if rest:
            with lock, contextlib.suppress(OSError):
                log.write(rest + b"\n")
    finally:
        os.close(source)


def supervise(directory: Path, qemu_pidfile: Path | None) -> int:
    """Keep a serving child alive until told to stop or until QEMU is gone."""
    child: Child | None = None
    stopping = reloading = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def reload(signum: int, frame: object) -> None:
        nonlocal reloading
        reloading = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    keeper = Keeper(directory)
    log, lock = Rotating(directory / AUDIT, AUDIT_CAP), threading.Lock()  # its cap: the policy's, at each child's start
    state.write_pid(directory / PIDFILE)  # only now: signals are handled
    qemu: int | None = None  # a pidfd: QEMU's exit, without mistaking a later process for it
    restarts = 0
    try:
        while not stopping:
            if child is None or child.proc.poll() is not None:
                if child is not None and child.proc.returncode == NO_NAMESPACE:
                    break
                if child is not None:
                    child.close()
                    restarts += 1
                    print(f"gateway: serving process exited ({child.proc.returncode}); restart {restarts}", file=sys.stderr, flush=True)
                    time.sleep(min(2.0, 0.1 * restarts))
                (directory / SERVING).unlink(missing_ok=True)
                with lock, contextlib.suppress(OSError, ValueError, KeyError):  # the log's cap: the policy's now
                    log.cap = Settings.load(directory / POLICY).audit
                child = Child(directory, keeper, log, lock)  # it reads the policy file itself at its start
                reloading = False
                state.write_pid(directory / CHILD_PIDFILE, child.proc.pid)
            if reloading:
                reloading = False
                try:
                    child.hand(Settings.read(directory / POLICY))
                except (OSError, ValueError) as e:  # the serving process keeps the last good policy
                    print(f"gateway: policy not reloaded: {e}", file=sys.stderr, flush=True)
            if qemu is None and qemu_pidfile is not None and state.pid_running(qemu_pidfile):
                with contextlib.suppress(OSError, ValueError):
                    qemu = os.pidfd_open(int(qemu_pidfile.read_text().strip()))
            if qemu is not None and select.select([qemu], [], [], 0)[0]:
                break  # QEMU is gone
            if select.select([keeper.listener], [], [], 0.1)[0]:
                keeper.serve_one()
    finally:
        if child is not None and child.proc.poll() is None:
            child.proc.terminate()
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:
                child.proc.kill()
        # Only while the sandbox is still ours: a gateway started since (its pid in PIDFILE) serves now,
        # and unlinking its mark would make the start that made it wait for ever (an `up` right after QEMU died).
        ours = state.names_me(directory / PIDFILE)
        keeper.close(unlink=ours)
        if ours:
            (directory / SERVING).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vivarium-gateway")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--serve", action="store_true", help="serve (the child); otherwise supervise")
    ap.add_argument("--qemu-pidfile", type=Path)
    ap.add_argument("--supervisor", type=int, help="(the child) the supervisor's pid: serve only while it lives")
    ap.add_argument("--secrets-fd", type=int, help="(the child) where the supervisor hands it the secrets it holds")
    ap.add_argument("--audit-fd", type=int, help="(the child) where its audit records go")
    ap.add_argument("--policy-fd", type=int, help="(the child) where the policy comes, as it changes")
    ap.add_argument("--uid", type=int, help="(the child, started by root) the uid and gid it serves as")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.dir, args.supervisor, Handed(args.secrets_fd, args.audit_fd, args.policy_fd, args.uid))
        return 0
    # Detach: whoever started us (a CLI that exits, or a long-lived program using
    # the Python API) must not have to reap the supervisor.
    child = os.fork()
    if child:
        # Named before this half exits, so that a start that fails at once can stop the supervisor
        # even before it has written its own pid file (and it would otherwise wait for a QEMU for ever).
        state.write_pid(args.dir / LAUNCHED, child)
        os._exit(0)
    return supervise(args.dir, args.qemu_pidfile)

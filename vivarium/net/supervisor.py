"""The gateway's processes: a supervisor that keeps one serving process alive for as long as
QEMU runs, and the serving process itself (gateway.Gateway), which never outlives it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from vivarium.net import terminate
from vivarium.net.gateway import CHILD_PIDFILE, LAUNCHED, NO_NAMESPACE, PIDFILE, SECRETS_SOCKET, SERVING, Gateway

ACK_TIMEOUT = 10.0  # for the serving process to take a secret
CLIENT_TIMEOUT = 5.0  # for `run --secret` to say what it hands over


def serve(directory: Path, supervisor: int | None = None, secrets_fd: int | None = None) -> None:
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
        asyncio.run(Gateway(directory, secrets_fd).serve())
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


def supervise(directory: Path, qemu_pidfile: Path | None) -> int:
    """Keep a serving child alive until told to stop or until QEMU is gone."""
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def reload(signum: int, frame: object) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    keeper = Keeper(directory)
    state.write_pid(directory / PIDFILE)  # only now: signals are handled
    qemu: int | None = None  # a pidfd: QEMU's exit, without mistaking a later process for it
    restarts = 0
    try:
        while not stopping:
            if child is None or child.poll() is not None:
                if child is not None and child.returncode == NO_NAMESPACE:
                    break
                if child is not None:
                    restarts += 1
                    print(f"gateway: serving process exited ({child.returncode}); restart {restarts}", file=sys.stderr, flush=True)
                    time.sleep(min(2.0, 0.1 * restarts))
                (directory / SERVING).unlink(missing_ok=True)
                theirs = keeper.for_child()
                with theirs:
                    child = subprocess.Popen([sys.executable, "-m", "vivarium.net", "--dir", str(directory), "--serve",
                                              "--supervisor", str(os.getpid()), "--secrets-fd", str(theirs.fileno())],
                                             pass_fds=(theirs.fileno(),))  # fmt: skip
                state.write_pid(directory / CHILD_PIDFILE, child.pid)
            if qemu is None and qemu_pidfile is not None and state.pid_running(qemu_pidfile):
                with contextlib.suppress(OSError, ValueError):
                    qemu = os.pidfd_open(int(qemu_pidfile.read_text().strip()))
            if qemu is not None and select.select([qemu], [], [], 0)[0]:
                break  # QEMU is gone
            if select.select([keeper.listener], [], [], 0.1)[0]:
                keeper.serve_one()
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
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
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.dir, args.supervisor, args.secrets_fd)
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

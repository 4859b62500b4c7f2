"""Starting QEMU so that it outlives whoever started it, under its seccomp filter: what QEMU's own
-daemonize did, which the filter forbids (daemonizing forks and calls setsid once the filter is in place).

`python -m vivarium.vm.spawn QMP LOG FDS -- QEMU-ARGV…` starts QEMU in a session of its own, in /, its
stdout and stderr appended to LOG, the descriptors FDS (comma-separated) inherited; waits until QEMU greets
on its QMP socket (it has finished starting: its main loop runs) or exits; then exits itself: 0, QEMU runs
on (a child of init now); 1, what QEMU said is on stderr.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT = 60.0


def greeted(path: str, proc: subprocess.Popen[bytes], deadline: float) -> bool | None:
    """True once QEMU's monitor greets a client on `path`; None if QEMU exited; False: not yet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None
            if select.select([s], [], [], 0.05)[0]:
                try:
                    return s.recv(1) == b"{"
                except OSError:
                    return False
    return False


def main(argv: list[str]) -> int:
    qmp, log, fds, sep, *cmd = argv
    if sep != "--" or not cmd:
        print("usage: python -m vivarium.vm.spawn QMP LOG FDS -- QEMU-ARGV...", file=sys.stderr)
        return 2
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/", start_new_session=True,
                                pass_fds=tuple(int(fd) for fd in fds.split(",") if fd))  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        ready = greeted(qmp, proc, deadline) if Path(qmp).exists() else False
        if ready:
            return 0
        if ready is None or proc.poll() is not None:
            sys.stderr.write(Path(log).read_text(errors="replace")[-4000:] or f"exit code {proc.wait()}\n")
            return 1
        time.sleep(0.02)
    proc.kill()
    print(f"QEMU did not finish starting within {READY_TIMEOUT:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

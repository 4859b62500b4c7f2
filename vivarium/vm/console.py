"""The guest's serial console on the host, within a size: QEMU writes it into a pipe; a small process of
its own (one per running sandbox, gone at once when QEMU is: the pipe's end) writes it to the console log,
rotated at `logs.console_size` with `logs.console_keep` old files (logfile.py).

A file chardev would grow for as long as the guest prints: a guest writing to /dev/ttyS0 for ever would
fill the host's disk. A pipe also holds the guest back to the pace the host writes at, rather than
dropping what it says.

Started by root itself, the keeper copies the guest's bytes as a uid of the sandbox's own (not QEMU's, not
the gateway's: `userns.keeper_uid`), which alone may write the log's directory; it opens that directory
before it drops root, and needs no way through the sandbox's directory (root's, 0700) above it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vivarium.logfile import Cap, Rotating
from vivarium.share import userns


def start(path: Path, cap: Cap, uid: int | None = None) -> int:
    """Start the console's keeper for the log at `path`; returns the pipe's write end, for QEMU (the caller
    closes it once QEMU has it: then QEMU's exit is the keeper's end). `uid`: started by root, the keeper
    writes as this uid and gid, which alone owns the log's directory (`path`'s parent, made here)."""
    directory = path.parent
    if uid is not None:
        userns.own_dir(directory, uid)
    else:
        directory.mkdir(mode=0o700, exist_ok=True)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        # it detaches at once (its first half exits): nobody need reap it
        subprocess.run([sys.executable, "-m", "vivarium.vm.console", str(path), str(cap.size), str(cap.keep), str(uid or "")],
                       stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=30)  # fmt: skip
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    return w


def keep(path: Path, cap: Cap, source: int = 0, directory: int | None = None) -> None:
    """Copy what comes from `source` into the rotating log until it ends."""
    log = Rotating(path, cap, directory)
    try:
        while data := os.read(source, 65536):
            log.write(data)
    finally:
        log.close()


def main(argv: list[str]) -> int:
    path, size, count, uid = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]) if argv[3:] and argv[3] else None
    if os.fork():
        os._exit(0)
    os.setsid()  # not the terminal's: a ^C meant for the CLI is not for it
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if uid is not None:  # started by root: the guest's bytes are copied by no one who could do more with them
        userns.drop_to(uid, uid)
    keep(path, Cap(size, count), directory=directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

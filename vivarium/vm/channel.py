"""The host's end of the guest's control channel (a virtio-serial port).

QEMU's pipe chardev joins the port to two FIFOs in the instance directory:
BASE.in (host to guest) and BASE.out (guest to host). The guest's agent
(guest/rootfs/usr/local/lib/vivarium/control) answers one request at a time
with "ok NONCE" or "fail NONCE WHY". The guest is untrusted: whatever else it
writes is skipped, and a reply is read for a bounded time and size.

It is how a guest restored from a saved state is told what it must know
before anyone logs in (its identity, the time), without an SSH login.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from vivarium.errors import VMError

MAX_REPLY = 1 << 20  # what the guest may write before an answer counts as none
LOG_HINT = "the guest's console log (`vivarium logs NAME`) may say why"


def fifos(base: Path) -> tuple[Path, Path]:
    return base.with_name(base.name + ".in"), base.with_name(base.name + ".out")


def make(base: Path) -> None:
    """Fresh FIFOs for a QEMU about to start (nothing left over from an earlier run)."""
    for path in fifos(base):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.mkfifo(path, 0o600)


def request(base: Path, verb: str, arg: str = "", body: Iterable[tuple[str, str]] | None = None, *, timeout: float = 30.0) -> None:
    """Send one request and wait for its answer; VMError if it fails or none comes in time.

    `body` (NAME, VALUE) lines follow the request line, closed by "end"."""
    nonce = secrets.token_hex(8)
    lines = [f"{verb} {nonce} {arg}".rstrip()]
    if body is not None:
        for name, value in body:
            if "\n" in value or " " in name:
                raise ValueError(f"a control request line cannot hold {name!r}")
            lines.append(f"{name} {value}")
        lines.append("end")
    message = ("\n".join(lines) + "\n").encode()
    to_guest, from_guest = fifos(base)
    for path in (to_guest, from_guest):
        if not (path.exists() and stat.S_ISFIFO(path.stat().st_mode)):
            raise VMError(f"the guest's control channel is missing ({path})", hint="restart the sandbox with `vivarium stop` and `vivarium up`")
    deadline = time.monotonic() + timeout
    rfd = os.open(from_guest, os.O_RDONLY | os.O_NONBLOCK)
    try:
        try:
            wfd = os.open(to_guest, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no reader: QEMU is not running
                raise VMError("QEMU is not running: nothing reads the guest's control channel", hint="start it with `vivarium up`") from None
            raise
        try:
            _write_all(wfd, message, deadline)
        finally:
            os.close(wfd)
        answer = _read_answer(rfd, nonce, deadline)
    finally:
        os.close(rfd)
    if answer is None:
        raise VMError(f"the guest did not answer {verb!r} on its control channel within {timeout:.0f}s", hint=LOG_HINT)
    status, why = answer
    if status != "ok":
        raise VMError(f"the guest could not {verb}: {why or 'no reason given'}", hint=LOG_HINT)


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise VMError("the guest's control channel does not take requests (QEMU is not reading it)", hint=LOG_HINT)
        _, ready, _ = select.select([], [fd], [], left)
        if ready:
            view = view[os.write(fd, view) :]


def _read_answer(fd: int, nonce: str, deadline: float) -> tuple[str, str] | None:
    """("ok"|"fail", why) for our nonce; None if the time or the size allowance runs out."""
    buf = b""
    seen = 0
    while seen < MAX_REPLY:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:  # QEMU holds the FIFO open while it runs: no writer left means it is gone
            raise VMError("QEMU exited before the guest answered on its control channel", hint=LOG_HINT)
        seen += len(chunk)
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            words = raw.decode(errors="replace").split(" ", 2)
            if len(words) >= 2 and words[1] == nonce and words[0] in ("ok", "fail"):
                return words[0], words[2].strip()[:300] if len(words) > 2 else ""
    return None

"""Guest RAM as a file: how a template's memory is kept and how a copy of it starts.

A template is saved with QEMU's x-ignore-shared migration capability: the
migration stream then carries only the device state (under a MiB), and the
RAM is read straight out of QEMU's memfd into a sparse file (pages of zeros
left as holes). A new sandbox's RAM is a fresh memfd holding a copy of the
file's data extents, handed to QEMU as the memory backend's file: the guest
runs as soon as the device state is loaded, with no page parsed out of a
stream. (A private, copy-on-write mapping of the template's file would save
even the copy, but virtiofsd must map the guest's RAM shared.) A booting guest's
RAM is a memfd of ours too, handed over the same way: QEMU 8.2 and later skip
only shared RAM backed by a named file under x-ignore-shared.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

from vivarium.errors import VMError

PAGE = 4096
RAM_HINT = "vivarium reads a running guest's RAM through /proc: QEMU must run as you, started by vivarium"
CHUNK = 1 << 20


def qemu_ram_fd(pid: int, size: int) -> Path:
    """The /proc path of QEMU's guest-RAM memfd (the only memfd of that size it holds)."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        for fd in fds.iterdir():
            try:
                if os.readlink(fd).startswith("/memfd:") and fd.stat().st_size == size:
                    return fd
            except OSError:
                continue
    except OSError as e:
        raise VMError(f"cannot look at QEMU's open files ({fds}): {e.strerror}", hint=RAM_HINT) from None
    raise VMError(f"QEMU (pid {pid}) holds no memfd of {size >> 20} MiB to read the guest's RAM from", hint=RAM_HINT)


def save_sparse(src: Path, dest: Path) -> int:
    """Copy `src` to a new file `dest`, leaving pages of zeros as holes. Returns the bytes of data written."""
    try:
        return _save_sparse(src, dest)
    except OSError as e:
        dest.unlink(missing_ok=True)
        hint = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise VMError(f"cannot save the guest's memory to {dest}: {e.strerror}", hint=hint) from None


def _save_sparse(src: Path, dest: Path) -> int:
    written = 0
    with open(src, "rb", buffering=0) as fin:
        s = fin.fileno()
        size = os.fstat(s).st_size
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            for start, end in extents(s, size):  # never-touched guest RAM is a hole in the memfd: not even read
                for offset in range(start, end, CHUNK):
                    chunk = os.pread(s, min(CHUNK, end - offset), offset)
                    written += _write_data_pages(fd, chunk, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    return written


def extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of `fd` that hold data (SEEK_DATA/SEEK_HOLE), page-aligned."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        start -= start % PAGE
        yield start, end
        offset = max(end, start + PAGE)


def _write_data_pages(fd: int, chunk: bytes, offset: int) -> int:
    """Write the pages of `chunk` (at `offset`) that are not all zeros, in runs. Returns the bytes written."""
    if chunk.count(0) == len(chunk):
        return 0
    zero = bytes(PAGE)
    written = 0
    run = -1  # where the run of data pages being gathered starts
    for p in range(0, len(chunk), PAGE):
        page = chunk[p : p + PAGE]
        if page != zero[: len(page)]:
            run = p if run < 0 else run
        elif run >= 0:
            written += os.pwrite(fd, chunk[run:p], offset + run)
            run = -1
    if run >= 0:
        written += os.pwrite(fd, chunk[run:], offset + run)
    return written


def new_memfd(name: str, size: int) -> int:
    """A new, empty (sparse) memfd of `size` bytes for a booting guest's RAM, inheritable for QEMU to open as
    /proc/self/fd/N: a memory-backend-file, so that QEMU 8.2 and later leave it out of a saved state as
    x-ignore-shared asks (they ignore only shared RAM backed by a named file, which a memory-backend-memfd
    is not: its RAM would go into the stream, and a restore into a file-backed guest would refuse it)."""
    fd = os.memfd_create(name, 0)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    os.set_inheritable(fd, True)
    return fd


def load_memfd(src: Path, name: str) -> int:
    """A new memfd holding `src` (only its data extents are copied; holes stay unallocated).

    The descriptor is inheritable, for QEMU to open as /proc/self/fd/N; the caller closes it."""
    fd = os.memfd_create(name, 0)
    try:
        with open(src, "rb", buffering=0) as fin:
            s = fin.fileno()
            size = os.fstat(s).st_size
            os.ftruncate(fd, size)
            for offset, end in extents(s, size):
                os.lseek(fd, offset, os.SEEK_SET)
                while offset < end:
                    n = os.sendfile(fd, s, offset, end - offset)
                    if n == 0:
                        raise OSError(errno.EIO, "the file ended early")
                    offset += n
    except OSError as e:
        os.close(fd)
        short = e.errno in (errno.ENOMEM, errno.ENOSPC)
        hint = ("the host is short of memory: stop a sandbox, or give this one less ([vm] memory)" if short else
                f"the saved state in {src.parent} is damaged: delete that directory (a template is made again on the next `up`)")  # fmt: skip
        raise VMError(f"cannot load the saved memory from {src}: {e.strerror}", hint=hint) from None
    except BaseException:
        os.close(fd)
        raise
    os.set_inheritable(fd, True)
    return fd

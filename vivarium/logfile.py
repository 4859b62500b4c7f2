"""Logs the guest can fill that stay within a size on the host: a file that rotates (NAME, then NAME.1 …
NAME.KEEP, oldest last) and is read back across the rotation, following it as it turns.

The console log (what the guest prints on its serial port) and the egress audit log (a record per connection
and DNS query the guest makes) are written from what a hostile guest chooses to send: without a cap, a
guest printing for ever or asking for a million names fills the host's disk.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class Cap:
    size: int  # bytes in the live file before it is rotated
    keep: int  # rotated files kept beside it (0: the live file is emptied instead)

    @property
    def most(self) -> int:
        """The most bytes the log can take on the host (a write larger than `size` is cut to it)."""
        return self.size * (self.keep + 1)


def rotated(path: Path, keep: int) -> list[Path]:
    """The files of the log at `path`, oldest first (those that exist)."""
    names = [path.with_name(f"{path.name}.{i}") for i in range(keep, 0, -1)] + [path]
    return [p for p in names if p.exists()]


def all_of(path: Path) -> list[Path]:
    """The files of the log at `path` whatever its cap was, oldest first."""
    old = sorted((p for p in path.parent.glob(f"{path.name}.*") if p.name[len(path.name) + 1 :].isdigit()),
                 key=lambda p: -int(p.name[len(path.name) + 1 :]))  # fmt: skip
    return [*old, path] if path.exists() else old


def remove(path: Path) -> None:
    for p in all_of(path):
        p.unlink(missing_ok=True)


class Rotating:
    """Appends to `path`, rotating it before a write would take it past the cap. Whole writes stay in one
    file (a record is never split); the writer is the file's only one. Its files are reached through
    `directory`, their directory opened (by default, now): a writer that has dropped root since needs no
    way through the directories above it."""

    def __init__(self, path: Path, cap: Cap, directory: int | None = None) -> None:
        self.path, self.cap = path, cap
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        self._dir = os.open(path.parent, flags) if directory is None else os.dup(directory)
        try:
            self._f = self._open(os.O_APPEND)
        except BaseException:
            os.close(self._dir)
            raise
        self.size = os.fstat(self._f.fileno()).st_size

    def _open(self, how: int) -> BinaryIO:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | how
        return os.fdopen(os.open(self.path.name, flags, 0o644, dir_fd=self._dir), "ab", buffering=0)

    def write(self, data: bytes) -> None:
        if len(data) > self.cap.size:
            data = data[: self.cap.size]
        if self.size and self.size + len(data) > self.cap.size:
            self.rotate()
        self._f.write(data)
        self.size += len(data)

    def rotate(self) -> None:
        self._f.close()
        name, at = self.path.name, {"src_dir_fd": self._dir, "dst_dir_fd": self._dir}
        if self.cap.keep:
            for i in range(self.cap.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{name}.{i}", f"{name}.{i + 1}", **at)
            os.replace(name, f"{name}.1", **at)
        self._f = self._open(os.O_TRUNC)
        self.size = 0

    def close(self) -> None:
        self._f.close()
        os.close(self._dir)


def read(path: Path) -> bytes:
    """The whole log, across its rotation."""
    return b"".join(p.read_bytes() for p in all_of(path))


def chunks(path: Path, *, follow: bool = False, poll: float = 0.3, size: int = 65536) -> Iterator[bytes]:
    """The log's bytes, oldest first, across its rotation; with follow, as they come, for ever, through
    rotations (a file rotated away is read to its end before the new one is opened)."""
    files = all_of(path)
    for p in files[:-1] if files and files[-1] == path else files:
        with p.open("rb") as old:
            while data := old.read(size):
                yield data
    f = _open(path)
    try:
        while True:
            if f is not None:
                while data := f.read(size):
                    yield data
            if not follow:
                return
            if f is None:
                f = _open(path)
            elif _replaced(path, f):
                while data := f.read(size):  # what was written before it turned
                    yield data
                f.close()
                f = _open(path)
                continue
            time.sleep(poll)
    finally:
        if f is not None:
            f.close()


def lines(path: Path, *, follow: bool = False, poll: float = 0.3) -> Iterator[bytes]:
    """The log's whole lines (chunks(), split; a line still being written waits until it is whole)."""
    partial = b""
    for data in chunks(path, follow=follow, poll=poll):
        *whole, partial = (partial + data).split(b"\n")
        yield from (ln + b"\n" for ln in whole)


def _open(path: Path) -> BinaryIO | None:
    try:
        return path.open("rb")
    except FileNotFoundError:
        return None


def _replaced(path: Path, f: BinaryIO) -> bool:
    try:
        return os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False

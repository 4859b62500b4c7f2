"""Guest RAM files: saved sparse, loaded into a memfd with the same bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vivarium.errors import VMError
from vivarium.vm import memory


def test_save_sparse_then_load_gives_the_same_bytes(tmp_path: Path) -> None:
    size = 8 << 20
    src = tmp_path / "ram"
    with open(src, "wb") as f:
        f.truncate(size)
        for offset, data in ((0, b"boot"), (3 * memory.PAGE + 17, b"x" * 9000), (5 << 20, os.urandom(memory.CHUNK)), (size - 3, b"end")):
            f.seek(offset)
            f.write(data)
        f.seek(2 << 20)
        f.write(bytes(memory.CHUNK))  # written zeros: left as a hole in the copy
    saved = tmp_path / "saved"
    written = memory.save_sparse(src, saved)
    assert saved.stat().st_size == size
    assert written == memory.PAGE + 3 * memory.PAGE + memory.CHUNK + memory.PAGE  # whole pages of data only
    assert saved.stat().st_blocks * 512 < 2 * written  # the zeros take no room
    fd = memory.load_memfd(saved, "test")
    try:
        assert os.get_inheritable(fd)
        assert Path(f"/proc/self/fd/{fd}").read_bytes() == src.read_bytes()
    finally:
        os.close(fd)


def test_qemu_ram_fd_finds_the_memfd_of_that_size(tmp_path: Path) -> None:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 4 << 20)
    try:
        path = memory.qemu_ram_fd(os.getpid(), 4 << 20)
        assert os.path.samefile(path, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def test_a_failed_save_says_so_and_leaves_no_half_file(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    src.write_bytes(b"x" * memory.PAGE)
    dest = tmp_path / "gone" / "saved"  # its directory does not exist: the write fails as a full disk would
    with pytest.raises(VMError, match="cannot save the guest's memory"):
        memory.save_sparse(src, dest)
    assert not dest.exists()


def test_untouched_ram_is_not_even_read(tmp_path: Path) -> None:
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, 64 << 20)
        os.pwrite(fd, b"kernel", 32 << 20)
        spans = list(memory.extents(fd, 64 << 20))
        assert sum(end - start for start, end in spans) < 1 << 20  # a memfd's holes are skipped
        assert any(start <= 32 << 20 < end for start, end in spans)
        written = memory.save_sparse(Path(f"/proc/self/fd/{fd}"), tmp_path / "saved")
        assert written == memory.PAGE and (tmp_path / "saved").read_bytes()[32 << 20 :][:6] == b"kernel"
    finally:
        os.close(fd)


def test_a_missing_saved_memory_says_what_to_delete(tmp_path: Path) -> None:
    with pytest.raises(VMError, match="cannot load the saved memory") as e:
        memory.load_memfd(tmp_path / "template" / "ram", "test")
    assert f"{tmp_path / 'template'} is damaged" in e.value.hint

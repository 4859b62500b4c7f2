"""Logs a guest fills stay within their cap on the host, and read back whole across the rotation."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from vivarium import logfile
from vivarium.logfile import Cap, Rotating
from vivarium.vm import console


def total(path: Path) -> int:
    return sum(p.stat().st_size for p in logfile.all_of(path))


def test_a_log_rotates_at_its_cap_and_reads_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "egress.log"
    log = Rotating(path, Cap(1000, 2))
    for i in range(500):
        log.write(f"record {i:04}\n".encode())  # 12 bytes each: 6000 written, at most 3000 kept
    log.close()
    assert [p.name for p in logfile.all_of(path)] == ["egress.log.2", "egress.log.1", "egress.log"]
    assert total(path) <= Cap(1000, 2).most
    kept = [int(ln.split()[1]) for ln in logfile.lines(path)]
    assert kept == list(range(kept[0], 500)) and len(kept) > 150  # the newest, in order, no record split
    # opened again (a gateway restarted): it goes on from the size it finds
    again = Rotating(path, Cap(1000, 2))
    assert again.size == path.stat().st_size
    again.close()


def test_keep_zero_empties_the_live_file(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    log = Rotating(path, Cap(100, 0))
    for _ in range(30):
        log.write(b"x" * 30)
    log.close()
    assert logfile.all_of(path) == [path] and path.stat().st_size <= 100


def test_following_a_log_through_its_rotation_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "egress.log"
    log = Rotating(path, Cap(4000, 3))
    got: list[bytes] = []
    reader = logfile.lines(path, follow=True, poll=0.01)

    def follow() -> None:
        for ln in reader:
            got.append(ln)
            if ln == b"last\n":
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    for i in range(400):  # rotates twice or more, while being followed
        log.write(f"line {i:04}\n".encode())
        if i % 50 == 0:
            time.sleep(0.05)
    log.write(b"last\n")
    t.join(10)
    assert not t.is_alive()
    assert got == [f"line {i:04}\n".encode() for i in range(400)] + [b"last\n"]


def test_the_console_keeper_caps_what_a_guest_prints(tmp_path: Path) -> None:
    """What a guest writes to its console for ever (here: 5 MB) leaves at most the cap on the host; the
    keeper stops when the pipe's writer (QEMU) is gone."""
    path = tmp_path / "serial.log"
    cap = Cap(256 << 10, 2)
    w = console.start(path, cap)
    try:
        line = b"the guest says something, again and again\n"
        written = 0
        while written < 5_000_000:
            written += os.write(w, line * 100)
    finally:
        os.close(w)
    deadline = time.monotonic() + 10
    while not path.with_name("serial.log.2").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(logfile.all_of(path)) == 3 and total(path) <= cap.most  # rotated, and no more than the cap
    assert logfile.read(path).endswith(line)

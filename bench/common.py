"""Helpers shared by the benchmarks: timing and a throwaway vivarium home."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_of(n: int, fn: Callable[[], object]) -> float:
    return statistics.median(timed(fn) for _ in range(n))


@contextmanager
def env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def report(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def rss_beyond_guest_ram(pid: int, guest_bytes: int) -> tuple[int, int]:
    """(QEMU's resident memory outside guest RAM, guest RAM resident), in bytes.

    Guest RAM is the one anonymous mapping of exactly the guest's size.
    """
    total = guest = 0
    size = rss = 0
    is_ram = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            size = end - start
            is_ram = size == guest_bytes
        elif fields[0] == "Rss:":
            rss = int(fields[1]) * 1024
            total += rss
            if is_ram:
                guest += rss
    return total - guest, guest

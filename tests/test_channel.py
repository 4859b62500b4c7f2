"""The host's end of the control channel, against a stand-in for QEMU and the guest's agent."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vivarium.errors import VMError
from vivarium.vm import channel

Agent = Callable[[list[str]], list[bytes]]  # the request's lines -> what the "guest" writes back


class FakeGuest:
    """Holds the FIFOs open as QEMU's pipe chardev does (O_RDWR) and answers as `agent` says."""

    def __init__(self, base: Path, agent: Agent) -> None:
        channel.make(base)
        to_guest, from_guest = channel.fifos(base)
        self.rfd = os.open(to_guest, os.O_RDWR)
        self.wfd = os.open(from_guest, os.O_RDWR)
        self.agent = agent
        self.seen: list[list[str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        buf = b""
        while not self.stop.is_set():
            if not select.select([self.rfd], [], [], 0.05)[0]:
                continue
            buf += os.read(self.rfd, 4096)
            lines = buf.decode().split("\n")
            first = lines[0].split(" ")
            done = len(lines) > 1 and (first[0] != "become" or "end" in lines)
            if done:
                request = [ln for ln in lines if ln]
                self.seen.append(request)
                buf = b""
                for out in self.agent(request):
                    os.write(self.wfd, out)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()  # before the descriptors go: their numbers would be reused at once
        os.close(self.wfd)
        os.close(self.rfd)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "control"


def nonce(request: list[str]) -> str:
    return request[0].split(" ")[1]


def test_ok_is_read_past_whatever_else_the_guest_writes(base: Path) -> None:
    guest = FakeGuest(base, lambda r: [b"noise\nok 0000 not yours\n", f"ok {nonce(r)}\n".encode()])
    try:
        channel.request(base, "become", body=[("hostname", "twin-a"), ("shares", "share0 rw /home/me/p")], timeout=5)
        assert guest.seen[0][0].startswith("become ")
        assert guest.seen[0][1:] == ["hostname twin-a", "shares share0 rw /home/me/p", "end"]
    finally:
        guest.close()


def test_fail_says_why(base: Path) -> None:
    guest = FakeGuest(base, lambda r: [f"fail {nonce(r)} mount: no such device\n".encode()])
    try:
        with pytest.raises(VMError, match="could not resume: mount: no such device"):
            channel.request(base, "resume", "1 ab", timeout=5)
    finally:
        guest.close()


def test_silence_times_out(base: Path) -> None:
    guest = FakeGuest(base, lambda r: [])
    try:
        started = time.monotonic()
        with pytest.raises(VMError, match="did not answer 'ping'"):
            channel.request(base, "ping", timeout=0.5)
        assert time.monotonic() - started < 3
    finally:
        guest.close()


def test_a_flood_is_not_read_for_ever(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "MAX_REPLY", 8192)
    guest = FakeGuest(base, lambda r: [b"x" * 4000 + b"\n"] * 4)
    try:
        with pytest.raises(VMError, match="did not answer"):
            channel.request(base, "ping", timeout=30)
    finally:
        guest.close()


def test_no_qemu_is_said_plainly(base: Path) -> None:
    with pytest.raises(VMError, match="control channel is missing"):
        channel.request(base, "ping", timeout=1)
    channel.make(base)  # FIFOs left behind by a QEMU that is gone: nobody reads them
    with pytest.raises(VMError, match="QEMU is not running"):
        channel.request(base, "ping", timeout=1)


def test_values_cannot_smuggle_lines(base: Path) -> None:
    with pytest.raises(ValueError):
        channel.request(base, "become", body=[("hostname", "a\nend")], timeout=1)

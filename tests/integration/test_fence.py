"""network.mode = "offline" seals the VM on the host (QEMU restrict=on).

Attacks run as root in the guest with the guest's own firewall flushed. The
same attacks from a VM without the fence must succeed, so the test can fail.
(The gateway that lets `lan-block` and `allowlist` through selectively is the
next slice of this work; until then only `offline` is fenced on the host.)
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import Sandbox
from vivarium.sandbox import free_port

from .conftest import vv

pytestmark = pytest.mark.integration

FAKE_LAN = "192.0.2.10"  # an address we add to this host's lo: a LAN neighbour stand-in

PROBE = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=5)
    print("CONNECTED", s.recv(64).decode().strip())
except OSError as e:
    print("BLOCKED", e)
"""

UDP_DNS = """
import socket
q = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")  # A example.com
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(4)
s.sendto(q, ("10.0.2.3", 53))
try:
    print("ANSWERED", len(s.recv(512)))
except OSError as e:
    print("BLOCKED", e)
"""


class Secret:
    """A TCP service on a host address that hands out a secret to whoever connects."""

    def __init__(self, addr: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((addr, 0))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            with conn:
                conn.sendall(b"host-secret\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[Secret, Secret]]:
    subprocess.run(["ip", "addr", "add", f"{FAKE_LAN}/32", "dev", "lo"], check=True)
    loopback, lan = Secret("127.0.0.1"), Secret(FAKE_LAN)
    try:
        yield loopback, lan
    finally:
        loopback.close()
        lan.close()
        subprocess.run(["ip", "addr", "del", f"{FAKE_LAN}/32", "dev", "lo"], check=False)


@pytest.fixture(scope="module")
def sealed(project: Path, built: object) -> Iterator[Sandbox]:
    d = project.parent / "sealed"
    d.mkdir(exist_ok=True)
    (d / "vivarium.toml").write_text(
        f'[vm]\nmemory = "1G"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n[network]\nmode = "offline"\n'
    )
    vv("up", "sealed", cwd=d)
    box = Sandbox("sealed")
    yield box
    box.destroy()


def as_root(box: Sandbox, script: str, *args: str) -> str:
    """Run python `script` as root in the guest after flushing the guest's own firewall."""
    cmd = ["sudo", "sh", "-c", 'nft flush ruleset 2>/dev/null; iptables -F 2>/dev/null; exec python3 -c "$0" "$@"', script, *args]
    r = box.exec(cmd, capture=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_offline_guest_cannot_reach_host_loopback(sealed: Sandbox, box: Sandbox, services: tuple[Secret, Secret]) -> None:
    loopback, _ = services
    assert as_root(sealed, PROBE, "10.0.2.2", str(loopback.port)).startswith("BLOCKED")
    assert loopback.hits == 0
    # Control: the unfenced VM does reach it.
    assert as_root(box, PROBE, "10.0.2.2", str(loopback.port)) == "CONNECTED host-secret"
    assert loopback.hits == 1


def test_offline_guest_cannot_reach_the_lan(sealed: Sandbox, box: Sandbox, services: tuple[Secret, Secret]) -> None:
    _, lan = services
    assert as_root(sealed, PROBE, FAKE_LAN, str(lan.port)).startswith("BLOCKED")
    assert lan.hits == 0
    assert as_root(box, PROBE, FAKE_LAN, str(lan.port)) == "CONNECTED host-secret"
    assert lan.hits == 1


def test_offline_guest_has_no_dns(sealed: Sandbox) -> None:
    assert as_root(sealed, UDP_DNS).startswith("BLOCKED")


def test_offline_guest_is_still_reachable_over_its_forwards(sealed: Sandbox) -> None:
    assert sealed.exec(["true"]).returncode == 0
    assert sealed.status().to_dict()["state"] == "running"

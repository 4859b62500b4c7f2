"""The host's routing as the gateway reads it (rtnetlink), in a network namespace of the test's own."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator

import pytest

from vivarium.net.routes import Router

from .fakenet import in_netns, ip


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"vvrt{os.getpid() % 100000}"
    ip("netns", "add", name)
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "eth0", "type", "veth", "peer", "name", "peer0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "peer0", "up"],
                    ["addr", "add", "192.0.2.10/24", "dev", "eth0"], ["route", "add", "default", "via", "192.0.2.1"]):  # fmt: skip
            ip("-n", name, *cmd)
        yield name
    finally:
        ip("netns", "del", name, check=False)


def test_routes_are_read_as_they_are_now(ns: str) -> None:
    router = Router()

    def reach(addr: str) -> str:
        return in_netns(f"/run/netns/{ns}", lambda: router.reach(ipaddress.ip_address(addr))).kind

    assert [reach(a) for a in ("8.8.8.8", "192.0.2.55", "192.0.2.10", "127.0.0.1")] == ["internet", "local", "own", "own"]
    # an address the host gains later is its own at once (a VPN, a DHCP renewal, a new interface)
    ip("-n", ns, "addr", "add", "203.0.113.77/32", "dev", "eth0")
    assert reach("203.0.113.77") == "own"
    # a network reached through anything but the default route (a VPN's route, a bridge) is local
    assert reach("198.51.100.9") == "internet"
    ip("-n", ns, "route", "add", "198.51.100.0/24", "via", "192.0.2.254")
    assert reach("198.51.100.9") == "local"
    # the default route changes: what it reached before is now reached some other way, or not at all
    ip("-n", ns, "route", "replace", "default", "via", "192.0.2.2")
    assert reach("8.8.8.8") == "internet"
    ip("-n", ns, "route", "del", "default")
    assert reach("8.8.8.8") == "none"
    router.close()

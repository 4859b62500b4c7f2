from __future__ import annotations

import ipaddress

import pytest

from vivarium.net.policy import AllowRule, Policy, split_host_port, unwrap
from vivarium.net.routes import Reach

LAN_BLOCK = Policy.build("lan-block")


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1", "10.0.2.2", "10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.77.1", "100.64.0.1",
        "169.254.169.254", "0.0.0.0", "224.0.0.251", "255.255.255.255", "240.0.0.1", "198.51.100.7",
        "::1", "fd00::1", "fe80::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:192.168.77.1", "::ffff:169.254.169.254",
        "64:ff9b::a00:1", "2002:c0a8:4d01::1", "::10.0.0.1",
    ],
)  # fmt: skip
def test_denied_in_lan_block(ip: str) -> None:
    d = LAN_BLOCK.decide(ip, 443)
    assert not d.allow and d.rule.startswith("deny"), (ip, d)


@pytest.mark.parametrize("ip", ["1.1.1.1", "151.101.0.223", "172.32.0.1", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8"])
def test_public_allowed_in_lan_block(ip: str) -> None:
    d = LAN_BLOCK.decide(ip, 443)
    assert d.allow and d.rule == "allow public internet"


def test_docker_subnets_inside_the_guest_are_not_the_gateways_business() -> None:
    # 172.20/14 is the guest's own Docker range: the redirector never sends it out,
    # and if something did, it is private and denied.
    assert not LAN_BLOCK.decide("172.20.0.2", 80).allow


def test_allow_and_deny_cidrs() -> None:
    p = Policy.build("lan-block", allow_cidrs=["198.51.100.0/24"], deny_cidrs=["1.1.1.0/24"])
    assert p.decide("198.51.100.7", 80).rule == "allow allow_cidrs 198.51.100.0/24"
    assert p.decide("1.1.1.1", 443).rule == "deny deny_cidrs 1.1.1.0/24"
    # deny_cidrs beats allow_cidrs
    q = Policy.build("lan-block", allow_cidrs=["198.51.100.0/24"], deny_cidrs=["198.51.100.7/32"])
    assert not q.decide("198.51.100.7", 80).allow


def test_offline_denies_everything() -> None:
    p = Policy.build("offline", allow_cidrs=["0.0.0.0/0"])
    assert p.decide("1.1.1.1", 443).rule == "deny offline mode"
    assert not p.name_verdict("pypi.org").allow


def test_allowlist_needs_a_listed_name_and_its_own_addresses() -> None:
    p = Policy.build("allowlist", allow=["*.github.com", "pypi.org:443"])
    gh = [ipaddress.ip_address("140.82.112.3")]
    assert p.decide("140.82.112.3", 443, "api.github.com", gh).allow
    # the name is listed but the address is not one it resolved to (SNI/Host spoofing)
    assert not p.decide("1.2.3.4", 443, "api.github.com", gh).allow
    # an unlisted name, even at a listed name's address
    assert not p.decide("140.82.112.3", 443, "evil.example", gh).allow
    # the port is part of the rule
    pypi = [ipaddress.ip_address("151.101.0.223")]
    assert p.decide("151.101.0.223", 443, "pypi.org", pypi).allow
    assert not p.decide("151.101.0.223", 80, "pypi.org", pypi).allow
    # "*.github.com" is not github.com itself
    assert not p.decide("140.82.112.3", 443, "github.com", gh).allow
    # no name at all
    assert not p.decide("140.82.112.3", 443).allow
    # a listed name resolving to a private address is still refused (rebinding)
    lan = [ipaddress.ip_address("192.168.77.1")]
    assert p.decide("192.168.77.1", 443, "x.github.com", lan).rule.startswith("deny private")


def test_allow_rules_parse_and_say_where_they_came_from() -> None:
    r = AllowRule.parse("PyPI.org:443", source="claude-code")
    assert (r.pattern, r.port, r.source, str(r)) == ("pypi.org", 443, "claude-code", "pypi.org:443")
    p = Policy.build("allowlist").with_allow(r)
    rule = p.decide("151.101.0.223", 443, "pypi.org", [ipaddress.ip_address("151.101.0.223")]).rule
    assert rule == "allow pypi.org:443 (claude-code)"
    assert p.without_allow("pypi.org:443").allow == ()


def test_unwrap() -> None:
    assert str(unwrap(ipaddress.ip_address("::ffff:10.0.0.1"))) == "10.0.0.1"
    assert str(unwrap(ipaddress.ip_address("2002:0a00:0001::1"))) == "10.0.0.1"
    assert str(unwrap(ipaddress.ip_address("2a00::1"))) == "2a00::1"


def test_dns_only_through_the_fence() -> None:
    p = Policy.build("lan-block", allow_cidrs=["198.51.100.7/32"])
    assert p.decide("198.51.100.7", 53).rule.startswith("deny dns port 53")
    assert not p.decide("8.8.8.8", 853).allow
    assert p.decide("8.8.8.8", 443).allow


def test_denied_names_in_any_mode() -> None:
    p = Policy.build("lan-block", deny=["*.evil.example", "tracker.example:443"])
    assert p.ip_verdict("1.2.3.4", 443) is None  # the name decides
    assert p.decide("1.2.3.4", 443, "a.evil.example").rule == "deny *.evil.example (deny)"
    assert p.decide("1.2.3.4", 443, "good.example").allow
    assert not p.decide("1.2.3.4", 443, "tracker.example").allow
    assert p.decide("1.2.3.4", 80, "tracker.example").allow
    assert not p.name_verdict("a.evil.example").allow
    assert p.name_verdict("tracker.example").allow  # only its port 443 is denied
    assert p.name_verdict("good.example").allow


OWN = Reach("own", "203.0.113.9 is an address of the host's (eth0)")
LAN = Reach("local", "81.2.69.77 is on the host's network on eth0")
VPN = Reach("local", "the host routes 81.3.0.1 via 10.8.0.1 on tun0, not its default route")


def test_what_the_hosts_routing_says_is_local_is_denied() -> None:
    p = Policy.build("lan-block")
    assert p.decide("81.2.69.77", 443, reach=LAN).rule == "deny the host's network: 81.2.69.77 is on the host's network on eth0"
    assert p.decide("81.3.0.1", 443, reach=VPN).rule.startswith("deny the host's network: the host routes 81.3.0.1 via 10.8.0.1 on tun0")
    assert p.decide("81.2.70.1", 443).allow
    assert p.decide("81.2.70.1", 443, reach=Reach("none", "the host has no route to 81.2.70.1")).rule == "deny the host has no route to 81.2.70.1"
    # the routes could not be read: fail closed
    assert p.decide("81.2.70.1", 443, reach=Reach("unknown", "the host's routes could not be read: EPERM")).rule == (
        "deny the host's routes could not be read: EPERM: failing closed"
    )
    # an opened range opens the LAN or a VPN's routes, not the host itself
    q = Policy.build("lan-block", allow_cidrs=["203.0.113.0/24", "81.2.69.0/24"])
    assert q.decide("203.0.113.9", 22, reach=OWN).rule == "deny the host's own address (203.0.113.9 is an address of the host's (eth0))"
    assert q.decide("203.0.113.8", 22, reach=LAN).allow
    assert q.decide("81.2.69.77", 22, reach=LAN).allow
    # loopback only where allow_cidrs opens it on purpose
    assert not p.decide("127.0.0.1", 8080, reach=Reach("own", "lo")).allow
    assert Policy.build("lan-block", allow_cidrs=["127.0.0.1/32"]).decide("127.0.0.1", 8080, reach=Reach("own", "lo")).allow


def test_allowlist_name_verdict() -> None:
    p = Policy.build("allowlist", allow=["*.github.com", "pypi.org:443"])
    assert p.name_verdict("api.github.com").allow
    assert p.name_verdict("pypi.org").allow
    assert p.name_verdict("evil.example").rule == "deny allowlist: evil.example is not listed"


def test_split_host_port() -> None:
    assert split_host_port("pypi.org", 443) == ("pypi.org", 443)
    assert split_host_port("127.0.0.1:5353", 53) == ("127.0.0.1", 5353)
    assert split_host_port("[::1]:53", 443) == ("::1", 53)
    assert split_host_port("[fd00::1]", 53) == ("fd00::1", 53)
    assert split_host_port("fd00::1", 53) == ("fd00::1", 53)  # bare IPv6: no port
    for bad in ("x:0", "x:70000", "x:dns", "[::1]x"):
        with pytest.raises(ValueError):
            split_host_port(bad, 53)


@pytest.mark.parametrize(
    ("ip", "rule"),
    [
        ("64:ff9b:1::c0a8:4d01", "deny local-use-nat64 64:ff9b:1::/48"),
        ("64:ff9b::c0a8:4d01", "deny private 192.168.0.0/16"),  # NAT64: decided on the IPv4 address it carries
        ("64:ff9b::808:808", "allow public internet"),
        ("2002:c0a8:4d01::1", "deny private 192.168.0.0/16"),  # 6to4: the same
        ("2001:0:4136:e378:8000:63bf:3f57:b2fe", "deny teredo 2001::/32"),
        ("2001:2::1", "deny ietf-protocol-assignments 2001::/23"),
        ("fec0::1", "deny site-local fec0::/10"),
        ("3fff::1", "deny documentation 3fff::/20"),
        ("5f00::1", "deny srv6-sid 5f00::/16"),
        ("192.88.99.1", "deny 6to4-relay 192.88.99.0/24"),
        ("::ffff:10.0.0.1", "deny private 10.0.0.0/8"),
        ("::ffff:169.254.169.254", "deny link-local/metadata 169.254.0.0/16"),
        ("fe80::1%eth0", "deny link-local fe80::/10"),
        ("2606:4700::1111", "allow public internet"),
    ],
)
def test_special_purpose_ranges_address_by_address(ip: str, rule: str) -> None:
    assert Policy.build("lan-block").decide(ip, 443).rule == rule


@pytest.mark.parametrize("spelling", ["2606:4700:77::1%hov0", "2606:4700:77::1%6", "2606:4700:77::1%0", "2606:4700:77::1"])
def test_the_hosts_own_address_in_every_scope_spelling(spelling: str) -> None:
    # the scope names no other host: the address decided on (and asked of the host's routes) is the same
    assert unwrap(ipaddress.ip_address(spelling)) == ipaddress.ip_address("2606:4700:77::1")
    policy = Policy.build("lan-block", allow_cidrs=["2606:4700:77::/48"])
    assert policy.decide(spelling, 443, reach=Reach("own", "x")).rule == "deny the host's own address (x)"

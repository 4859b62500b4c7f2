"""Egress policy: pure decisions about where a sandbox may connect.

Nothing here does I/O. The gateway asks `Policy.decide()` for each connection
with the IP actually being connected to (so DNS rebinding cannot smuggle a
private address past a public name), how the host's own routing would reach
it (routes.py: one of its addresses, its LAN or a VPN, or the internet) and,
where it saw one, the name.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace

from vivarium.net.routes import INTERNET, Reach

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Denied in every mode: the host, the LAN, link-local and cloud metadata,
# carrier-grade NAT, multicast, documentation and reserved ranges.
ALWAYS_DENIED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local/metadata"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "ietf-reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
    ("192.88.99.0/24", "6to4-relay"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use-nat64"),  # RFC 8215: where the IPv4 address sits depends on the site; never out
    ("100::/64", "discard"),
    ("2001::/32", "teredo"),  # the IPv4 address in it is obfuscated, and the relay may be anywhere
    ("2001::/23", "ietf-protocol-assignments"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "srv6-sid"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
# (Not listed because they are decided on the IPv4 address they carry, see unwrap(): ::ffff:0:0/96
# IPv4-mapped, ::/96 IPv4-compatible, 2002::/16 6to4, 64:ff9b::/96 NAT64.)

MODES = ("lan-block", "allowlist", "offline")


@dataclass(frozen=True)
class Decision:
    allow: bool
    rule: str  # which rule decided, e.g. "deny private 10.0.0.0/8"


@dataclass(frozen=True)
class AllowRule:
    pattern: str  # "pypi.org", "*.github.com"
    port: int | None = None
    source: str = "config"  # who added it: config, an agent's name, the CLI

    @classmethod
    def parse(cls, text: str, source: str = "config") -> AllowRule:
        name, sep, port = text.rpartition(":")
        if sep and port.isdigit():
            return cls(name.lower().rstrip("."), int(port), source)
        return cls(text.lower().rstrip("."), None, source)

    def matches(self, name: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        name = name.lower().rstrip(".")
        if self.pattern.startswith("*."):
            # "*.github.com" covers api.github.com, not github.com itself
            return fnmatch.fnmatchcase(name, self.pattern) and name.count(".") >= self.pattern.count(".")
        return name == self.pattern

    def __str__(self) -> str:
        return f"{self.pattern}:{self.port}" if self.port else self.pattern


def split_host_port(text: str, default: int) -> tuple[str, int]:
    """HOST, HOST:PORT or [IPv6]:PORT → (host, port). ValueError for a port that is not one."""
    text = text.strip()
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not port:
        return host, default
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)


def unwrap(ip: IPAddress) -> IPAddress:
    """The address decided on: without an IPv6 scope id (`%eth0` names no other host), and the IPv4
    address hidden in an IPv4-mapped, -compatible, 6to4 or NAT64 IPv6 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        ip = ipaddress.IPv6Address(ip.packed)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        packed = ip.packed
        if packed[:12] == bytes(12) and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
            return ipaddress.IPv4Address(packed[12:])
        if ipaddress.IPv6Network("64:ff9b::/96").supernet_of(ipaddress.IPv6Network(f"{ip}/128")):
            return ipaddress.IPv4Address(packed[12:])
    return ip


# DNS goes through the fence's own resolver and nowhere else (plain, over TLS).
DNS_PORTS = frozenset({53, 853})


@dataclass(frozen=True)
class Policy:
    mode: str = "lan-block"
    allow: tuple[AllowRule, ...] = ()
    allow_cidrs: tuple[Network, ...] = ()
    deny_cidrs: tuple[Network, ...] = ()
    deny: tuple[AllowRule, ...] = ()  # names denied on top, in any mode (`vivarium egress deny`)

    @classmethod
    def build(
        cls,
        mode: str,
        allow: Iterable[str] = (),
        allow_cidrs: Iterable[str] = (),
        deny_cidrs: Iterable[str] = (),
        deny: Iterable[str] = (),
    ) -> Policy:
        if mode not in MODES:
            raise ValueError(f"unknown network mode {mode!r}")
        return cls(
            mode=mode,
            allow=tuple(AllowRule.parse(a) for a in allow),
            allow_cidrs=tuple(ipaddress.ip_network(c, strict=False) for c in allow_cidrs),
            deny_cidrs=tuple(ipaddress.ip_network(c, strict=False) for c in deny_cidrs),
            deny=tuple(AllowRule.parse(d, "deny") for d in deny),
        )

    def with_allow(self, rule: AllowRule) -> Policy:
        return replace(self, allow=(*self.allow, rule))

    def without_allow(self, pattern: str) -> Policy:
        return replace(self, allow=tuple(r for r in self.allow if str(r) != pattern and r.pattern != pattern))

    def ip_verdict(self, ip: str | IPAddress, port: int, reach: Reach = INTERNET) -> Decision | None:
        """The decision when the address alone (and how the host reaches it) settles it; None when the name matters."""
        addr = unwrap(ipaddress.ip_address(ip)) if isinstance(ip, str) else unwrap(ip)
        if self.mode == "offline":
            return Decision(False, "deny offline mode")
        if port in DNS_PORTS:
            return Decision(False, f"deny dns port {port}: names resolve through the fence only")
        for net in self.deny_cidrs:
            if addr.version == net.version and addr in net:
                return Decision(False, f"deny deny_cidrs {net}")
        opened = next((n for n in self.allow_cidrs if addr.version == n.version and addr in n), None)
        if reach.kind == "unknown":
            return Decision(False, f"deny {reach.detail}: failing closed")
        # The host's own addresses, whatever allow_cidrs says (but loopback, which it may open on purpose).
        if reach.kind == "own" and not (opened is not None and addr.is_loopback):
            return Decision(False, f"deny the host's own address ({reach.detail})")
        if opened is None:
            for text, label in ALWAYS_DENIED:
                net = ipaddress.ip_network(text)
                if addr.version == net.version and addr in net:
                    return Decision(False, f"deny {label} {net}")
            if reach.kind == "local":
                return Decision(False, f"deny the host's network: {reach.detail}")
        if reach.kind == "none":
            return Decision(False, f"deny {reach.detail}")
        if self.deny:
            return None
        if self.mode == "lan-block":
            return Decision(True, f"allow allow_cidrs {opened}" if opened else "allow public internet")
        return None  # allowlist: the name decides (allow_cidrs only lifted the built-in denial)

    def decide(self, ip: str | IPAddress, port: int, name: str | None = None, name_ips: Iterable[IPAddress] = (),
               reach: Reach = INTERNET) -> Decision:  # fmt: skip
        """May the sandbox connect to ip:port (reached as `name`, which resolved to `name_ips`; reached by the host as `reach`)?"""
        addr = unwrap(ipaddress.ip_address(ip)) if isinstance(ip, str) else unwrap(ip)
        verdict = self.ip_verdict(addr, port, reach)
        if verdict is not None:
            return verdict
        if name:
            denied = next((r for r in self.deny if r.matches(name, port)), None)
            if denied is not None:
                return Decision(False, f"deny {denied} ({denied.source})")
        if self.mode == "lan-block":
            opened = next((n for n in self.allow_cidrs if addr.version == n.version and addr in n), None)
            return Decision(True, f"allow allow_cidrs {opened}" if opened else "allow public internet")
        # allowlist: a listed name, connected to an address the gateway itself resolved for it
        if not name:
            return Decision(False, "deny allowlist: no name for this address")
        rule = next((r for r in self.allow if r.matches(name, port)), None)
        if rule is None:
            return Decision(False, f"deny allowlist: {name} is not listed")
        if addr not in {unwrap(x) for x in name_ips}:
            return Decision(False, f"deny allowlist: {addr} is not an address {name} resolved to")
        return Decision(True, f"allow {rule} ({rule.source})")

    def name_verdict(self, name: str) -> Decision:
        """For DNS: may this name be resolved at all?"""
        if self.mode == "offline":
            return Decision(False, "deny offline mode")
        denied = next((r for r in self.deny if r.port is None and r.matches(name, 0)), None)  # "x.com:443" still resolves
        if denied is not None:
            return Decision(False, f"deny {denied} ({denied.source})")
        if self.mode == "lan-block":
            return Decision(True, "allow public internet")
        rule = next((r for r in self.allow if r.matches(name, r.port or 0)), None)
        if rule is None:
            return Decision(False, f"deny allowlist: {name} is not listed")
        return Decision(True, f"allow {rule} ({rule.source})")

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "allow": [str(r) for r in self.allow],
            "deny": [str(r) for r in self.deny],
            "allow_cidrs": [str(n) for n in self.allow_cidrs],
            "deny_cidrs": [str(n) for n in self.deny_cidrs],
        }

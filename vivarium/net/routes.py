"""Where the host itself would send a packet: asked of the kernel (rtnetlink) for every connection.

The gateway connects from the host, so "the host or its LAN" is whatever the
host's routing says it is at that moment: an address of its own (a route of
type local, which covers addresses gained a second ago: a VPN, a DHCP renewal,
a new bridge), or anything it reaches other than through its default route
(an on-link network, a VPN's routes, a container bridge). Only a destination
the host would send to a default route's gateway is "the internet". If the
routes cannot be read, the answer says so and the policy denies (fail closed).

One RTM_GETROUTE per connection (tens of microseconds); the default routes are
dumped again when a lookup names a next hop not among them, and at least once a
second.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NETLINK_ROUTE = 0
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_MULTIPATH, _RTA_TABLE = 1, 4, 5, 9, 15
_RTN_UNICAST, _RTN_LOCAL, _RTN_BROADCAST, _RTN_ANYCAST, _RTN_MULTICAST = 1, 2, 3, 4, 5
_NLMSG = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
DEFAULTS_TTL = 1.0


@dataclass(frozen=True)
class Reach:
    """How the host reaches an address: "internet" (through a default route), "own" (one of its own
    addresses), "local" (any other way: its LAN, a VPN, a bridge), "none" (no route), "unknown" (its
    routes could not be read)."""

    kind: str
    detail: str = ""


INTERNET = Reach("internet")


class Router:
    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self._defaults: dict[int, set[tuple[int, bytes]]] = {}  # family → {(oif, gateway)}
        self._defaults_at = 0.0

    def reach(self, ip: IPAddress) -> Reach:
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        try:
            kind, oif, gateway = self._get(family, ip.packed)
        except OSError as e:
            if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES, errno.EINVAL):
                return Reach("none", f"the host has no route to {ip}")
            self.close()
            return Reach("unknown", f"the host's routes could not be read: {e.strerror or e}")
        if kind == _RTN_LOCAL:
            return Reach("own", f"{ip} is an address of the host's ({_ifname(oif)})")
        if kind in (_RTN_BROADCAST, _RTN_MULTICAST, _RTN_ANYCAST):
            return Reach("local", f"{ip} is a broadcast or multicast address on {_ifname(oif)}")
        if kind != _RTN_UNICAST:
            return Reach("none", f"the host has no route to {ip}")
        if gateway is None:
            return Reach("local", f"{ip} is on the host's network on {_ifname(oif)}")
        try:
            defaults = self._defaults_for(family, fresh=False)
            if (oif, gateway) not in defaults:
                defaults = self._defaults_for(family, fresh=True)
        except OSError as e:
            self.close()
            return Reach("unknown", f"the host's routes could not be read: {e.strerror or e}")
        if (oif, gateway) in defaults:
            return INTERNET
        via = ipaddress.ip_address(gateway)
        return Reach("local", f"the host routes {ip} via {via} on {_ifname(oif)}, not its default route")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ---------------------------------------------------------------- netlink

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)
            self._sock.settimeout(2.0)
            self._sock.bind((0, 0))
        return self._sock

    def _request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        sock = self._socket()
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            data = sock.recv(1 << 16)
            p = 0
            while p + _NLMSG.size <= len(data):
                length, mtype, _, mseq, _ = _NLMSG.unpack_from(data, p)
                if length < _NLMSG.size:
                    raise OSError(errno.EPROTO, "a malformed netlink message")
                payload = data[p + _NLMSG.size : p + length]
                p += (length + 3) & ~3
                if mseq != seq:
                    continue  # an answer to an earlier request that timed out
                if mtype == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return out
                if mtype == _NLMSG_DONE:
                    return out
                out.append((mtype, payload))
                if not flags & _NLM_F_DUMP:
                    return out

    def _get(self, family: int, packed: bytes) -> tuple[int, int, bytes | None]:
        body = _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0) + _attr(_RTA_DST, packed)
        for mtype, payload in self._request(_RTM_GETROUTE, _NLM_F_REQUEST, body):
            if mtype == _RTM_NEWROUTE:
                rtm_type = payload[7]
                attrs = dict(_attrs(payload[_RTMSG.size :]))
                oif = struct.unpack("=i", attrs[_RTA_OIF][:4])[0] if _RTA_OIF in attrs else 0
                return rtm_type, oif, attrs.get(_RTA_GATEWAY)
        raise OSError(errno.EPROTO, "no answer to a route lookup")

    def _defaults_for(self, family: int, *, fresh: bool) -> set[tuple[int, bytes]]:
        now = time.monotonic()
        if fresh or now - self._defaults_at > DEFAULTS_TTL or family not in self._defaults:
            found: dict[int, set[tuple[int, bytes]]] = {socket.AF_INET: set(), socket.AF_INET6: set()}
            for fam in found:
                body = _RTMSG.pack(fam, 0, 0, 0, 0, 0, 0, 0, 0)
                for mtype, payload in self._request(_RTM_GETROUTE, _NLM_F_REQUEST | _NLM_F_DUMP, body):
                    if mtype != _RTM_NEWROUTE or payload[1] != 0 or payload[7] != _RTN_UNICAST:
                        continue  # only default routes (no destination prefix) of type unicast
                    found[fam] |= _next_hops(payload)
            self._defaults, self._defaults_at = found, now
        return self._defaults[family]


def _attr(kind: int, value: bytes) -> bytes:
    raw = _RTA.pack(_RTA.size + len(value), kind) + value
    return raw + bytes(-len(raw) % 4)


def _attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, p = [], 0
    while p + _RTA.size <= len(data):
        length, kind = _RTA.unpack_from(data, p)
        if length < _RTA.size:
            break
        out.append((kind & 0x3FFF, data[p + _RTA.size : p + length]))
        p += (length + 3) & ~3
    return out


def _next_hops(payload: bytes) -> set[tuple[int, bytes]]:
    attrs = dict(_attrs(payload[_RTMSG.size :]))
    hops: set[tuple[int, bytes]] = set()
    if _RTA_GATEWAY in attrs:
        oif = struct.unpack("=i", attrs[_RTA_OIF][:4])[0] if _RTA_OIF in attrs else 0
        hops.add((oif, attrs[_RTA_GATEWAY]))
    raw, p = attrs.get(_RTA_MULTIPATH, b""), 0
    while p + 8 <= len(raw):  # struct rtnexthop: len, flags, hops, ifindex; then its attributes
        length, _, _, ifindex = struct.unpack_from("=HBBi", raw, p)
        if length < 8:
            break
        gateway = dict(_attrs(raw[p + 8 : p + length])).get(_RTA_GATEWAY)
        if gateway is not None:
            hops.add((ifindex, gateway))
        p += (length + 3) & ~3
    return hops


def _ifname(index: int) -> str:
    with contextlib.suppress(OSError):
        return socket.if_indextoname(index)
    return f"interface {index}"

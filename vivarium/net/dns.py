"""The guest's DNS, answered by the gateway: the host's resolver or a configured upstream.

Every query the guest sends, to whatever server, over UDP or TCP, reaches the gateway
(the sandbox's namespace redirects it); the gateway asks the policy whether the name
may be resolved at all, answers it from here, and remembers which names each address
was returned for (the allowlist and denied names decide on that).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from vivarium.net.policy import IPAddress, split_host_port


def resolv_conf_servers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1]


class Resolver:
    """Answers the guest's queries: the host's resolver (getaddrinfo, so /etc/hosts
    counts) for addresses, or a configured upstream server for everything."""

    def __init__(self, upstream: str) -> None:
        self.upstream = split_host_port(upstream, 53) if upstream else None

    async def answer(self, query: dns.message.Message, wire: bytes) -> dns.message.Message:
        q = query.question[0]
        if self.upstream is None and q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and q.rdclass == dns.rdataclass.IN:
            return await self._getaddrinfo(query)
        server = self.upstream or next(((s, 53) for s in resolv_conf_servers()), None)
        if server is None:
            return reply_with(query, dns.rcode.SERVFAIL)
        return await _forward(wire, server)

    async def _getaddrinfo(self, query: dns.message.Message) -> dns.message.Message:
        q = query.question[0]
        family = socket.AF_INET if q.rdtype == dns.rdatatype.A else socket.AF_INET6
        name = q.name.to_text(omit_final_dot=True)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, family=family, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                # NXDOMAIN only if the name has no address of the other family either
                other = socket.AF_INET6 if family == socket.AF_INET else socket.AF_INET
                try:
                    await asyncio.get_running_loop().getaddrinfo(name, None, family=other, type=socket.SOCK_STREAM)
                    return reply_with(query, dns.rcode.NOERROR)
                except socket.gaierror:
                    return reply_with(query, dns.rcode.NXDOMAIN)
            return reply_with(query, dns.rcode.SERVFAIL)
        addrs = sorted({str(info[4][0]) for info in infos})
        reply = reply_with(query, dns.rcode.NOERROR)
        if addrs:
            reply.answer.append(dns.rrset.from_text_list(q.name, 60, dns.rdataclass.IN, q.rdtype, addrs))
        return reply


def reply_with(query: dns.message.Message, rcode: int) -> dns.message.Message:
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.RA
    reply.set_rcode(rcode)  # type: ignore[arg-type]
    return reply


async def _forward(wire: bytes, server: tuple[str, int]) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    for _ in range(2):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, server)
            await loop.sock_sendall(sock, wire)
            data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 3.0)
            reply = dns.message.from_wire(data)
            if not reply.flags & dns.flags.TC:
                return reply
            break
        except (TimeoutError, OSError, dns.exception.DNSException):
            continue
        finally:
            sock.close()
    # truncated (or no UDP answer): ask over TCP
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*server), 3.0)
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3.0), "big")
            return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(size), 3.0))
        finally:
            writer.close()
    except (TimeoutError, OSError, asyncio.IncompleteReadError, dns.exception.DNSException):
        return reply_with(dns.message.from_wire(wire), dns.rcode.SERVFAIL)


def answer_ips(reply: dns.message.Message) -> list[IPAddress]:
    out: list[IPAddress] = []
    for rrset in reply.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            out.extend(ipaddress.ip_address(r.address) for r in rrset)
    return out


Answer = Callable[[bytes], Awaitable[dns.message.Message | None]]


class OverUDP(asyncio.DatagramProtocol):
    """The guest's DNS over UDP: each query answered on its own, the reply sent from where the query went
    (the namespace's conntrack turns it back into the server the guest asked)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if len(self.pending) > 1024:  # a guest flooding queries waits for its answers
            return
        task = asyncio.ensure_future(self._answer(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = await self.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(_fit_udp(reply), addr)


def _fit_udp(reply: dns.message.Message) -> bytes:
    """A reply as large as the query said it may be over UDP; too large, it is truncated (the client asks over TCP)."""
    limit = max(512, reply.request_payload) if reply.request_payload else 512
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:
        for section in (reply.answer, reply.authority, reply.additional):
            section.clear()
        reply.flags |= dns.flags.TC
        return reply.to_wire()

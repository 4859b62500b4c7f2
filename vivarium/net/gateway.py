"""The egress gateway: a host process per sandbox that decides and logs every connection.

The guest's only way out is its NIC in the sandbox's own network namespace
(netns.py), which routes nothing: that namespace's kernel hands every TCP
connection of the guest to this process's listening socket, and every DNS query
to its resolver. For each connection the gateway reads where the guest meant to
go from the kernel (SO_ORIGINAL_DST), decides on the address (policy.py) and,
where the name matters, on the TLS SNI / HTTP Host / the name its own resolver
returned that address for; then connects from the host, relays and logs it in
the audit log (a record when it opens, another when it ends).

Run as `python -m vivarium.net.gateway --dir INSTANCE_DIR`: a supervisor that
restarts the serving child if it dies (egress fails closed meanwhile) and
exits with QEMU. SIGHUP re-reads the policy (live `egress allow|deny`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from vivarium.errors import VMError
from vivarium.net import netns
from vivarium.net.policy import AllowRule, Decision, IPAddress, Policy, split_host_port, unwrap
from vivarium.net.routes import Router
from vivarium.net.sniff import Requests, Unframed, looks_like_http, name_in, read_head

SERVING = "gateway.serving"  # the serving child's pid, once it listens
POLICY = "policy.json"
AUDIT = "egress.log"
PIDFILE = "gateway.pid"  # the supervisor's
CHILD_PIDFILE = "gateway-child.pid"  # the serving process's
# How long to wait for a client's first bytes when its name decides (allowlist,
# denied names); a server-speaks-first protocol is then decided on DNS names.
PEEK_TIMEOUT = 1.5
HEAD_TIMEOUT = 10.0  # from its first byte, for a whole ClientHello or request head to arrive
CONNECT_TIMEOUT = 10.0
HEADER_LIMIT = 1024
CHUNK = 256 * 1024
NAME_TTL = 3600.0
NAME_CAP = 20000
# Connections relayed at once; beyond it new ones are closed at once (and logged). (The
# sandbox's namespace caps them before they get here: netns.MAX_CONNECTIONS.)
MAX_ACTIVE = 8192
SO_ORIGINAL_DST = 80
NO_NAMESPACE = 3  # the serving process's exit status when the sandbox's namespace is gone


# ------------------------------------------------------------------ policy file


@dataclass(frozen=True)
class Settings:
    """What the sandbox wrote for its gateway: the policy and where DNS goes."""

    policy: Policy
    dns_upstream: str = ""

    @classmethod
    def load(cls, path: Path) -> Settings:
        data = json.loads(path.read_text())
        policy = Policy.build(data.get("mode", "lan-block"), allow_cidrs=data.get("allow_cidrs", ()), deny_cidrs=data.get("deny_cidrs", ()))

        # the rules keep who added them (config, an agent, the CLI)
        def rules(verb: str) -> tuple[AllowRule, ...]:
            return tuple(AllowRule.parse(r["rule"], r.get("source", "config")) for r in data.get(verb, ()))

        return cls(replace(policy, allow=rules("allow"), deny=rules("deny")), data.get("dns_upstream", ""))


# ------------------------------------------------------------------ names


class NameMap:
    """Which names the gateway's own resolver returned each address for."""

    def __init__(self) -> None:
        self._by_ip: OrderedDict[IPAddress, dict[str, float]] = OrderedDict()

    def add(self, name: str, ips: Iterable[IPAddress]) -> None:
        until = time.monotonic() + NAME_TTL
        for ip in ips:
            ip = unwrap(ip)
            self._by_ip.setdefault(ip, {})[name.lower().rstrip(".")] = until
            self._by_ip.move_to_end(ip)
        while len(self._by_ip) > NAME_CAP:
            self._by_ip.popitem(last=False)

    def names(self, ip: IPAddress) -> list[str]:
        now = time.monotonic()
        entry = self._by_ip.get(unwrap(ip), {})
        return [n for n, until in entry.items() if until > now]

    def ips(self, name: str) -> list[IPAddress]:
        now = time.monotonic()
        name = name.lower().rstrip(".")
        return [ip for ip, entry in self._by_ip.items() if entry.get(name, 0) > now]


# ------------------------------------------------------------------ audit log


class Audit:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")


# ------------------------------------------------------------------ DNS


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
            return _reply(query, dns.rcode.SERVFAIL)
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
                    return _reply(query, dns.rcode.NOERROR)
                except socket.gaierror:
                    return _reply(query, dns.rcode.NXDOMAIN)
            return _reply(query, dns.rcode.SERVFAIL)
        addrs = sorted({str(info[4][0]) for info in infos})
        reply = _reply(query, dns.rcode.NOERROR)
        if addrs:
            reply.answer.append(dns.rrset.from_text_list(q.name, 60, dns.rdataclass.IN, q.rdtype, addrs))
        return reply


def _reply(query: dns.message.Message, rcode: int) -> dns.message.Message:
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
        return _reply(dns.message.from_wire(wire), dns.rcode.SERVFAIL)


def answer_ips(reply: dns.message.Message) -> list[IPAddress]:
    out: list[IPAddress] = []
    for rrset in reply.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            out.extend(ipaddress.ip_address(r.address) for r in rrset)
    return out


# ------------------------------------------------------------------ the gateway


def forbidden(dst: str, port: int, name: str | None, decision: Decision) -> bytes:
    """The 403 a denied plain-HTTP request gets."""
    target = f"{name} ({dst}:{port})" if name else f"{dst}:{port}"
    body = f"vivarium: egress to {target} denied by the sandbox's network fence: {decision.rule}\n".encode()
    head = f"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


class Gateway:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.settings = Settings.load(directory / POLICY)
        self.resolver = Resolver(self.settings.dns_upstream)
        self.names = NameMap()
        self.audit = Audit(directory / AUDIT)
        self.active = 0
        self.serial = 0
        self.router = Router()

    def reload(self) -> None:
        try:
            self.settings = Settings.load(self.dir / POLICY)
            self.resolver = Resolver(self.settings.dns_upstream)
        except (OSError, ValueError, KeyError) as e:  # keep the last good policy
            print(f"gateway: policy not reloaded: {e}", file=sys.stderr)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        # before taking connections: a reload may come as soon as we are serving
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        tcp, dns_tcp, dns_udp = (socket.socket(fileno=fd) for fd in netns.take(self.dir, "listen"))
        for sock in (tcp, dns_tcp, dns_udp):
            sock.setblocking(False)
        # DNS first: its own sockets, never behind the TCP connections in a queue
        await loop.create_datagram_endpoint(lambda: _DNSOverUDP(self), sock=dns_udp)
        dns_server = await asyncio.start_server(self._dns_tcp, sock=dns_tcp)
        server = await asyncio.start_server(self._handle, sock=tcp, limit=CHUNK)
        serving = self.dir / SERVING
        serving.with_suffix(".tmp").write_text(f"{os.getpid()}\n")
        serving.with_suffix(".tmp").replace(serving)
        async with server, dns_server:
            await server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        try:
            if self.active > MAX_ACTIVE:
                self.audit.write({"kind": "tcp", "decision": "deny", "rule": f"deny more than {MAX_ACTIVE} connections at once"})
                return
            sock = writer.get_extra_info("socket")
            peer = writer.get_extra_info("peername") or ("", 0)
            try:  # where the guest sent it: the namespace's conntrack says, not the guest
                port, packed = struct.unpack_from("!2xH4s", sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
            except OSError:
                return
            await self._tcp(ipaddress.IPv4Address(packed), port, f"{peer[0]}:{peer[1]}", reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # -------------------------------------------------------------- DNS

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._dns(reader, writer)
        except OSError:
            pass
        finally:
            writer.close()

    async def _dns(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 30.0), "big")
                wire = await reader.readexactly(size)
            except (TimeoutError, asyncio.IncompleteReadError):
                return
            reply = await self.query(wire)
            if reply is None:
                return
            out = reply.to_wire()
            writer.write(len(out).to_bytes(2, "big") + out)
            await writer.drain()

    async def query(self, wire: bytes) -> dns.message.Message | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return _reply(query, dns.rcode.FORMERR)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(q.rdtype)
        started = time.monotonic()
        decision = self.settings.policy.name_verdict(name)
        if not decision.allow:
            reply = _reply(query, dns.rcode.NXDOMAIN)
        else:
            reply = await self.resolver.answer(query, wire)
            reply.id = query.id
        ips = answer_ips(reply)
        if ips:
            self.names.add(name, ips)
        self.audit.write({
            "kind": "dns", "name": name, "type": qtype, "decision": "allow" if decision.allow else "deny",
            "rule": decision.rule, "rcode": dns.rcode.to_text(reply.rcode()), "answers": [str(ip) for ip in ips],
            "duration": round(time.monotonic() - started, 4),
        })  # fmt: skip
        return reply

    # -------------------------------------------------------------- TCP

    def _recheck(self, dst: IPAddress, port: int, record: dict[str, Any]) -> Recheck:
        async def check(data: bytes, reader: asyncio.StreamReader) -> bytes | None:
            head, state = await read_head(reader, 0, HEAD_TIMEOUT, initial=data)
            seen = name_in(head) if state == "complete" else None
            if state in ("partial", "oversized"):
                decision, name = _unreadable(state), None
            elif seen is None:
                return head
            else:
                decision, name, _ = self.decide(dst, port, seen)
            if decision.allow:
                record.update(name=name, name_from=seen[1] if seen else None, rule=decision.rule)
                return head
            record.update(name=name or record.get("name"), name_from=seen[1] if seen else None, decision="deny", rule=decision.rule)
            return None

        return check

    def decide(self, dst: IPAddress, port: int, seen: tuple[str, str] | None) -> tuple[Decision, str | None, str | None]:
        """(decision, the name it was made on, where the name came from)."""
        policy = self.settings.policy
        known = self.names.names(dst)
        reach = self.router.reach(dst)
        # A denied name wins: if the gateway's own resolver gave this address for a denied name, no other
        # name the client shows (SNI, Host) opens it. (An address denied on its own keeps that rule.)
        verdict = policy.ip_verdict(dst, port, reach) if known and policy.deny else None
        for n in known if policy.deny and (verdict is None or verdict.allow) else ():
            rule = next((r for r in policy.deny if r.matches(n, port)), None)
            if rule is not None:
                said = f"; the client named {seen[0]}" if seen is not None and seen[0] != n else ""
                return Decision(False, f"deny {rule} ({rule.source}){said}"), n, "dns"
        if seen is not None:
            name, source = seen
            return policy.decide(dst, port, name, self.names.ips(name), reach), name, source
        if not known:
            return policy.decide(dst, port, reach=reach), None, None
        decisions = [(policy.decide(dst, port, n, self.names.ips(n), reach), n) for n in known]
        denied = next(((d, n) for d, n in decisions if not d.allow and policy.deny and any(r.matches(n, port) for r in policy.deny)), None)
        if denied is not None:  # an explicitly denied name wins over any other name for the address
            return denied[0], denied[1], "dns"
        d, n = next(((d, n) for d, n in decisions if d.allow), decisions[0])
        return d, n, "dns"

    async def _tcp(self, dst: IPAddress, port: int, src: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        dst = unwrap(dst)
        self.serial += 1
        record: dict[str, Any] = {"kind": "tcp", "conn": f"{os.getpid()}-{self.serial}", "src": src, "dst": str(dst), "port": port}
        policy = self.settings.policy
        verdict = policy.ip_verdict(dst, port, self.router.reach(dst))
        first, state = b"", "silent"
        if verdict is None or not verdict.allow:
            # the name decides, or a denial may owe an HTTP client a 403: read what the client says first,
            # a whole ClientHello or request head (split across reads and records as it may be)
            first, state = await read_head(reader, PEEK_TIMEOUT, HEAD_TIMEOUT)
        seen = name_in(first) if state == "complete" else None
        if verdict is None and state in ("partial", "oversized"):
            # the name decides, and it cannot be read: a client that hides it gets nothing
            decision, name, source = _unreadable(state), None, None
        elif verdict is None:
            decision, name, source = self.decide(dst, port, seen)
        else:
            decision, name, source = verdict, seen[0] if seen else None, seen[1] if seen else None
        if name is None and verdict is not None:
            known = self.names.names(dst)
            name, source = (known[0], "dns") if known else (None, None)
        record.update(name=name, name_from=source, decision="allow" if decision.allow else "deny", rule=decision.rule)
        sent = received = 0
        error = None
        try:
            if not decision.allow:
                if first and looks_like_http(first):
                    reply = forbidden(str(dst), port, name, decision)
                    writer.write(reply)
                    await writer.drain()
                    received = len(reply)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(str(dst), port, limit=CHUNK), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                error = f"connect: {e.strerror or type(e).__name__}" if isinstance(e, OSError) else "connect: timed out"
                return
            try:
                # Where a name decides, every HTTP request on the connection is checked, not just the first.
                guard = _Requests(self, dst, port, record) if verdict is None else None
                self.audit.write({"kind": "open", "conn": record["conn"], **{k: record.get(k) for k in OPEN_FIELDS}})
                if first:
                    if guard is not None:
                        first = guard.check(first)
                    up_writer.write(first)
                    sent += len(first)
                # Decided on the names the gateway resolved because the client said nothing at first: what it
                # says later is read the same way, and a name that is not allowed ends the connection there.
                watch = self._recheck(dst, port, record) if verdict is None and state == "silent" else None
                if guard is not None and not guard.ok:  # refused among the first requests: the server hears no more
                    up_writer.write_eof()
                counts = await asyncio.gather(
                    _pump(reader, up_writer, sniff=None if first or verdict is None else record, watch=watch, guard=guard)
                    if guard is None or guard.ok
                    else _nothing(),
                    _pump(up_reader, writer),
                )
                sent += counts[0]
                received += counts[1]
            finally:
                up_writer.close()
        finally:
            record.update(sent=sent, received=received, duration=round(time.monotonic() - started, 4))
            if error:
                record["error"] = error
            self.audit.write(record)


Recheck = Callable[[bytes, asyncio.StreamReader], Awaitable[bytes | None]]


class _DNSOverUDP(asyncio.DatagramProtocol):
    """The guest's DNS over UDP: each query answered on its own, the reply sent from where the query went
    (the namespace's conntrack turns it back into the server the guest asked)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
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
        reply = await self.gateway.query(data)
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


def _unreadable(state: str) -> Decision:
    """Where the name decides and the client's ClientHello or request head never became whole."""
    return Decision(False, f"deny {state} TLS ClientHello or HTTP request head: no name to decide on")


class _Requests:
    """Every HTTP request a client sends on one connection, checked before the server sees it (keep-alive and
    pipelining included). check() returns what may go on; after a refusal (`ok` False) nothing more does."""

    def __init__(self, gateway: Gateway, dst: IPAddress, port: int, record: dict[str, Any]) -> None:
        self.gateway, self.dst, self.port, self.record = gateway, dst, port, record
        self.requests: Requests | None = None  # once the client's first bytes show it speaks HTTP
        self.other = False  # they showed it does not: nothing to check
        self.ok = True
        self.count = 0

    def check(self, data: bytes) -> bytes:
        if self.requests is None:
            if self.other or not looks_like_http(data):
                self.other = True
                return data
            self.requests = Requests()
        out = b""
        try:
            for kind, piece in self.requests.feed(data):
                if kind == "head":
                    self.count += 1
                    seen = name_in(piece)
                    decision, name, source = self.gateway.decide(self.dst, self.port, seen)
                    if not decision.allow:
                        self._refuse(decision.rule, name, source)
                        return out
                out += piece
        except Unframed as e:
            self._refuse(f"deny HTTP request {self.count + 1}: {e}", None, None)
        return out

    def _refuse(self, rule: str, name: str | None, source: str | None) -> None:
        self.ok = False
        if self.count > 1:
            rule = f"{rule} (request {self.count} on the connection)"
        self.record.update(decision="deny", rule=rule, name=name or self.record.get("name"), name_from=source or self.record.get("name_from"))


async def _nothing() -> int:
    return 0


# What the record written when a connection opens holds (the one written when it ends has all of it, and more).
OPEN_FIELDS = ("src", "dst", "port", "name", "name_from", "decision", "rule")


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, sniff: dict[str, Any] | None = None,
                watch: Recheck | None = None, guard: _Requests | None = None) -> int:  # fmt: skip
    """Copy until EOF, then pass the EOF on. With `sniff`, fill in the name from the first bytes (for the log).
    With `watch`, the first bytes go through it first: it returns what to send on, or None to end the connection.
    With `guard`, every HTTP request is checked: a refused one ends the connection before the server sees it."""
    total = 0
    try:
        while True:
            data = await src.read(CHUNK)
            if not data:
                break
            if watch is not None:
                checked = await watch(data, src)
                watch = None
                if checked is None:
                    dst.close()
                    return total
                data = checked
            if guard is not None:
                data = guard.check(data)
                if not guard.ok:  # what came before the refused request goes on, and then the server hears no more
                    dst.write(data)
                    total += len(data)
                    dst.write_eof()
                    return total
            if sniff is not None:
                seen = name_in(data)
                if seen:
                    sniff["name"], sniff["name_from"] = seen
                sniff = None
            total += len(data)
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except OSError:
        dst.close()
    return total


# ------------------------------------------------------------------ processes


def serve(directory: Path, supervisor: int | None = None) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop handles it: a reload must never kill us
    if supervisor is not None:
        # Never serve unsupervised: when the supervisor dies (killed), so does this process, at once
        # (egress fails closed until `vivarium up` starts a gateway again).
        watch = os.pidfd_open(supervisor)
        if os.getppid() != supervisor:
            sys.exit(1)
        threading.Thread(target=_exit_with, args=(watch,), daemon=True).start()
    # two descriptors per relayed connection: take what the hard limit allows
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536 if hard == resource.RLIM_INFINITY else min(hard, 65536), hard))
    try:
        asyncio.run(Gateway(directory).serve())
    except VMError as e:  # the sandbox's namespace is gone: no restart can help
        print(f"gateway: {e}", file=sys.stderr, flush=True)
        sys.exit(NO_NAMESPACE)


def _exit_with(pidfd: int) -> None:
    select.select([pidfd], [], [])
    print("gateway: the supervisor is gone; the serving process stops", file=sys.stderr, flush=True)
    os._exit(1)


def supervise(directory: Path, qemu_pidfile: Path | None) -> int:
    """Keep a serving child alive until told to stop or until QEMU is gone."""
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def reload(signum: int, frame: object) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    (directory / PIDFILE).write_text(f"{os.getpid()}\n")  # only now: signals are handled
    qemu: int | None = None  # a pidfd: QEMU's exit, without mistaking a later process for it
    restarts = 0
    try:
        while not stopping:
            if child is None or child.poll() is not None:
                if child is not None and child.returncode == NO_NAMESPACE:
                    break
                if child is not None:
                    restarts += 1
                    print(f"gateway: serving process exited ({child.returncode}); restart {restarts}", file=sys.stderr, flush=True)
                    time.sleep(min(2.0, 0.1 * restarts))
                (directory / SERVING).unlink(missing_ok=True)
                child = subprocess.Popen([sys.executable, "-m", "vivarium.net", "--dir", str(directory), "--serve",
                                          "--supervisor", str(os.getpid())])  # fmt: skip
                (directory / CHILD_PIDFILE).write_text(f"{child.pid}\n")
            if qemu is None and qemu_pidfile is not None and _pid_alive(qemu_pidfile):
                with contextlib.suppress(OSError, ValueError):
                    qemu = os.pidfd_open(int(qemu_pidfile.read_text().strip()))
            if qemu is not None and select.select([qemu], [], [], 0)[0]:
                break  # QEMU is gone
            time.sleep(0.1)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
        # Only while the sandbox is still ours: a gateway started since (its pid in PIDFILE) serves now,
        # and unlinking its mark would make the start that made it wait for ever (an `up` right after QEMU died).
        with contextlib.suppress(OSError, ValueError):
            if int((directory / PIDFILE).read_text().strip()) == os.getpid():
                (directory / SERVING).unlink(missing_ok=True)
    return 0


def _pid_alive(pidfile: Path) -> bool:
    """Is the process in `pidfile` running? One that is exiting or a zombie is not: a QEMU killed with a
    large guest takes a while to die, and a gateway started for the next QEMU must not see it as its own
    (it would exit the moment that one was gone, before the new QEMU wrote its pid)."""
    try:
        pid = int(pidfile.read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return bool(cmdline) and stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vivarium-gateway")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--serve", action="store_true", help="serve (the child); otherwise supervise")
    ap.add_argument("--qemu-pidfile", type=Path)
    ap.add_argument("--supervisor", type=int, help="(the child) the supervisor's pid: serve only while it lives")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.dir, args.supervisor)
        return 0
    # Detach: whoever started us (a CLI that exits, or a long-lived program using
    # the Python API) must not have to reap the supervisor.
    if os.fork():
        os._exit(0)
    return supervise(args.dir, args.qemu_pidfile)


if __name__ == "__main__":
    sys.exit(main())

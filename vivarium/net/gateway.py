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

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import ssl
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from vivarium import state
from vivarium.logfile import Cap, Rotating
from vivarium.net import dns as dns_
from vivarium.net import netns, relay, terminate
from vivarium.net.ca import CA
from vivarium.net.inject import Secret
from vivarium.net.policy import AllowRule, Decision, IPAddress, Policy, unwrap
from vivarium.net.routes import Router
from vivarium.net.sniff import looks_like_http, name_in, read_head
from vivarium.share import userns

SERVING = "gateway.serving"  # the serving child's pid, once it listens
POLICY = "policy.json"
AUDIT = "egress.log"
AUDIT_CAP = Cap(100 << 20, 5)  # logs.audit_size, logs.audit_keep by default
PIDFILE = "gateway.pid"  # the supervisor's
SECRETS_SOCKET = "secrets.sock"  # where `run --secret` hands the gateway a real value (owner-only)
CHILD_PIDFILE = "gateway-child.pid"  # the serving process's
LAUNCHED = "gateway-launched.pid"  # the supervisor's too, written by the half that started it
# How long to wait for a client's first bytes when its name decides (allowlist,
# denied names); a server-speaks-first protocol is then decided on DNS names.
PEEK_TIMEOUT = 1.5
HEAD_TIMEOUT = 10.0  # from its first byte, for a whole ClientHello or request head to arrive
CONNECT_TIMEOUT = 10.0
HEADER_LIMIT = 1024
CHUNK = relay.CHUNK
NAME_TTL = 3600.0
NAME_CAP = 20000
# Connections relayed at once; beyond it new ones are closed at once (and logged). (The
# sandbox's namespace caps them before they get here: netns.MAX_CONNECTIONS.)
MAX_ACTIVE = 8192
SO_ORIGINAL_DST = 80
NO_NAMESPACE = 3  # the serving process's exit status when the sandbox's namespace is gone
POLICY_LIMIT = 16 << 20  # a policy handed over (a line)


# ------------------------------------------------------------------ policy file


@dataclass(frozen=True)
class Settings:
    """What the sandbox wrote for its gateway: the policy and where DNS goes."""

    policy: Policy
    dns_upstream: str = ""
    audit: Cap = AUDIT_CAP
    # where the gateway terminates TLS, what upstream certificates are checked against: the certificates of the
    # configured CA file (read where the file is readable: before the serving process drops root), "" = the host's
    upstream_pem: str = ""

    @classmethod
    def load(cls, path: Path) -> Settings:
        return cls.parse(cls.read(path))

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        """The policy file's data, with the upstream CA's certificates in it (what a serving process that cannot read
        either file is handed: supervisor.py)."""
        data: dict[str, Any] = json.loads(path.read_text())
        if data.get("upstream_ca"):
            data["upstream_pem"] = Path(data["upstream_ca"]).read_text()
        return data

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Settings:
        policy = Policy.build(data.get("mode", "lan-block"), allow_cidrs=data.get("allow_cidrs", ()), deny_cidrs=data.get("deny_cidrs", ()))

        # the rules keep who added them (config, an agent, the CLI)
        def rules(verb: str) -> tuple[AllowRule, ...]:
            return tuple(AllowRule.parse(r["rule"], r.get("source", "config")) for r in data.get(verb, ()))

        audit = data.get("audit") or {}
        cap = Cap(int(audit.get("size", AUDIT_CAP.size)), int(audit.get("keep", AUDIT_CAP.keep)))
        return cls(replace(policy, allow=rules("allow"), deny=rules("deny")), data.get("dns_upstream", ""), cap, str(data.get("upstream_pem", "")))


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
    """The audit log: a JSON line per record, rotated at its cap (logs.audit_size; a guest asking for name
    after name must not fill the host's disk)."""

    def __init__(self, path: Path, cap: Cap, fd: int | None = None) -> None:
        self._fd = fd  # a pipe to the supervisor, which writes the file (this process may not: it dropped root)
        self._log = Rotating(path, cap) if fd is None else None

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if self._log is not None:
            self._log.write(line)
            return
        assert self._fd is not None
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]


@dataclass(frozen=True)
class Handed:
    """What the supervisor hands its serving process (supervisor.py)."""

    secrets: int | None = None  # a socket: the secrets `run --secret` gave it
    audit: int | None = None  # a pipe: the audit log's lines go there
    policy: int | None = None  # a pipe: the policy (Settings.read) as it changes, a JSON line each
    uid: int | None = None  # started by root: the uid (and gid) it serves as, dropped to before the guest's first byte


# ------------------------------------------------------------------ the gateway


class Gateway:
    def __init__(self, directory: Path, handed: Handed | None = None) -> None:
        self.dir = directory
        self.handed = handed = handed or Handed()
        self.settings = Settings.load(directory / POLICY)
        self.resolver = dns_.Resolver(self.settings.dns_upstream)
        self.upstream = terminate.client_context(self.settings.upstream_pem)
        self.names = NameMap()
        self.audit = Audit(directory / AUDIT, self.settings.audit, handed.audit)
        self.active = 0
        self.serial = 0
        self.router = Router()
        self.secrets: dict[str, Secret] = {}  # from the supervisor (`run --secret`), kept in memory only
        self._ca: CA | None = None

    def reload(self, data: dict[str, Any] | None = None) -> None:
        """Take the policy file again (SIGHUP), or the policy the supervisor hands over."""
        try:
            settings = Settings.parse(data) if data is not None else Settings.load(self.dir / POLICY)
            self.upstream = terminate.client_context(settings.upstream_pem)
            self.settings, self.resolver = settings, dns_.Resolver(settings.dns_upstream)
        except (OSError, ValueError, KeyError, TypeError, ssl.SSLError) as e:  # keep the last good policy
            print(f"gateway: policy not reloaded: {e}", file=sys.stderr)

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        """The policies the supervisor hands over, each as it comes (`egress allow|deny` live)."""
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # over the limit: not the supervisor's
                return
            if not line:
                return
            try:
                self.reload(json.loads(line))
            except ValueError as e:
                print(f"gateway: policy not reloaded: {e}", file=sys.stderr)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        # before taking connections: a reload may come as soon as we are serving
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        tcp, dns_tcp, dns_udp = (socket.socket(fileno=fd) for fd in netns.take(self.dir, "listen"))
        for sock in (tcp, dns_tcp, dns_udp):
            sock.setblocking(False)
        h, tasks = self.handed, []
        if h.secrets is not None:  # the supervisor's end: the secrets it holds, now and as they come
            r, w = await asyncio.open_unix_connection(sock=socket.socket(fileno=h.secrets))
            tasks.append(asyncio.ensure_future(terminate.take_secret(self.secrets, r, w)))
        if h.policy is not None:
            policies = asyncio.StreamReader(limit=POLICY_LIMIT)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(policies), os.fdopen(h.policy, "rb", 0))
            tasks.append(asyncio.ensure_future(self._follow(policies)))
        _ = self.ca  # made (or read) before any connection: its certificate is what the guest trusts
        state.write_pid(self.dir / SERVING)  # the namespace's listeners hold what comes meanwhile
        if h.uid is not None:  # everything from the host's side is open: root is of no more use
            userns.drop_to(h.uid, h.uid)
        # DNS first: its own sockets, never behind the TCP connections in a queue
        await loop.create_datagram_endpoint(lambda: dns_.OverUDP(self.query), sock=dns_udp)
        dns_server = await asyncio.start_server(self._dns_tcp, sock=dns_tcp)
        server = await asyncio.start_server(self._handle, sock=tcp, limit=CHUNK)
        async with server, dns_server:
            await server.serve_forever()
        for task in tasks:
            task.cancel()

    @property
    def ca(self) -> CA:
        if self._ca is None:
            self._ca = CA.of(self.dir, self.dir.name)
        return self._ca

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
            return dns_.reply_with(query, dns.rcode.FORMERR)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(q.rdtype)
        started = time.monotonic()
        decision = self.settings.policy.name_verdict(name)
        if not decision.allow:
            reply = dns_.reply_with(query, dns.rcode.NXDOMAIN)
        else:
            reply = await self.resolver.answer(query, wire)
            reply.id = query.id
        ips = dns_.answer_ips(reply)
        if ips:
            self.names.add(name, ips)
        self.audit.write({
            "kind": "dns", "name": name, "type": qtype, "decision": "allow" if decision.allow else "deny",
            "rule": decision.rule, "rcode": dns.rcode.to_text(reply.rcode()), "answers": [str(ip) for ip in ips],
            "duration": round(time.monotonic() - started, 4),
        })  # fmt: skip
        return reply

    # -------------------------------------------------------------- TCP

    def _recheck(self, dst: IPAddress, port: int, record: dict[str, Any]) -> relay.Recheck:
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

    def _secret_host(self, dst: IPAddress, port: int) -> bool:
        return any(s.goes_to(n, port) for n in self.names.names(dst) for s in self.secrets.values()) if self.secrets else False

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
        if verdict is None or not verdict.allow or self.secrets:
            # the name decides, or a denial may owe an HTTP client a 403: read what the client says first,
            # a whole ClientHello or request head (split across reads and records as it may be). To an address the
            # resolver gave a secret's host, wait as long as a head may take: a client may load its trust store
            # between connecting and its ClientHello (git's GnuTLS takes seconds under TCG), and one taken for a
            # server-speaks-first client would be relayed untouched, the secret not put in.
            patience = HEAD_TIMEOUT if self._secret_host(dst, port) else PEEK_TIMEOUT
            first, state = await read_head(reader, patience, HEAD_TIMEOUT)
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
                reply = relay.forbidden(str(dst), port, name, decision, self.dir.name)
                if first and looks_like_http(first):
                    writer.write(reply)
                    await writer.drain()
                    received = len(reply)
                elif seen is not None and seen[1] == "sni":  # the same page over TLS, from the sandbox's CA
                    received = await terminate.deny(self.ca, reader, writer, first, seen[0], reply)
                return
            held = [s for s in self.secrets.values() if name and source == "sni" and s.goes_to(name, port)]
            if held and name:
                # A secret's host, named in the ClientHello: the gateway speaks TLS itself, to put the secret in
                self.audit.write({"kind": "open", "conn": record["conn"], **{k: record.get(k) for k in OPEN_FIELDS}})
                sent, received, error = await terminate.inject(
                    self.ca, self.upstream, list(self.secrets.values()), reader, writer, first, dst, port, name, record
                )
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(str(dst), port, limit=CHUNK), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                error = f"connect: {e.strerror or type(e).__name__}" if isinstance(e, OSError) else "connect: timed out"
                return
            try:
                # Where a name decides, every HTTP request on the connection is checked, not just the first.
                guard = relay.RequestGuard(self.decide, dst, port, record) if verdict is None else None
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
                    relay.pump(reader, up_writer, sniff=None if first or verdict is None else record, watch=watch, guard=guard)
                    if guard is None or guard.ok
                    else relay.nothing(),
                    relay.pump(up_reader, writer),
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


def _unreadable(state: str) -> Decision:
    """Where the name decides and the client's ClientHello or request head never became whole."""
    return Decision(False, f"deny {state} TLS ClientHello or HTTP request head: no name to decide on")


# What the record written when a connection opens holds (the one written when it ends has all of it, and more).
OPEN_FIELDS = ("src", "dst", "port", "name", "name_from", "decision", "rule")

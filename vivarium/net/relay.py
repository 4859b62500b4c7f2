"""Moving a connection's bytes, and what is checked on the way: every HTTP request where a name decides."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from vivarium.net.policy import Decision, IPAddress
from vivarium.net.sniff import Requests, Unframed, looks_like_http, name_in

CHUNK = 256 * 1024

# (decision, the name it was made on, where the name came from) for a destination and what the client showed
Decide = Callable[[IPAddress, int, "tuple[str, str] | None"], "tuple[Decision, str | None, str | None]"]


Recheck = Callable[[bytes, asyncio.StreamReader], Awaitable[bytes | None]]


def forbidden(dst: str, port: int, name: str | None, decision: Decision, sandbox: str) -> bytes:
    """The 403 a denied HTTP request gets (over TLS too, terminate.deny): what, by which rule, what would open it.
    For the agent to read and pass on, rather than a closed connection it would take for a network fault."""
    target = f"{name} ({dst}:{port})" if name else f"{dst}:{port}"
    body = (f"vivarium: egress to {target} denied by the sandbox's network fence: {decision.rule}\n"
            f"{how_to_open(decision.rule, name, sandbox)}\n").encode()  # fmt: skip
    head = f"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


def how_to_open(rule: str, name: str | None, sandbox: str) -> str:
    """What the user (not the guest) could run to open what `rule` denied."""
    if rule.startswith("deny allowlist:") and name:
        return f"to open it, the user runs on the host: vivarium egress allow {sandbox} {name}"
    for source in ("config", "cli", "agent"):  # a deny rule: "deny PATTERN (SOURCE)"
        if rule.endswith(f" ({source})"):
            return f"to open it, the user runs on the host: vivarium egress allow {sandbox} {rule[5 : -len(source) - 3]}"
    return "no `vivarium egress allow` opens it: the address itself is denied (network.allow_cidrs in vivarium.toml opens a range on purpose)"


class RequestGuard:
    """Every HTTP request a client sends on one connection, checked before the server sees it (keep-alive and
    pipelining included). check() returns what may go on; after a refusal (`ok` False) nothing more does."""

    def __init__(self, decide: Decide, dst: IPAddress, port: int, record: dict[str, Any]) -> None:
        self.decide, self.dst, self.port, self.record = decide, dst, port, record
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
                    decision, name, source = self.decide(self.dst, self.port, seen)
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


async def nothing() -> int:
    return 0


async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, sniff: dict[str, Any] | None = None,
                watch: Recheck | None = None, guard: RequestGuard | None = None) -> int:  # fmt: skip
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

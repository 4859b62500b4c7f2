"""Secrets the guest never holds: what the gateway does to a request's headers and a response's bytes.

The agent sees a placeholder: random per sandbox and secret, of the real value's length and with its
prefix (`sk-ant-api03-`, `ghp_`), so that a client that checks the format takes it. In a request to one
of the secret's hosts the gateway puts the real value where the placeholder is, in the headers only (also
inside `Authorization: Basic`, for git over HTTPS), never in a body; a request to any other host keeps the
placeholder, and says so. In what comes back, the real value is turned into the placeholder again before
the guest sees it. Pure functions over bytes: the TLS and HTTP around them are the gateway's.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vivarium.net.policy import AllowRule
from vivarium.net.sniff import Requests


@dataclass(frozen=True)
class Secret:
    """One secret as the gateway holds it: the guest's placeholder, the real value, where it may go."""

    name: str
    placeholder: str
    value: str
    hosts: tuple[str, ...]  # patterns as in network.allow: "api.anthropic.com", "*.github.com"
    header: str | None = None  # only this request header (lowercase); None: any header that holds the placeholder

    @functools.cached_property
    def encoded(self) -> tuple[bytes, bytes]:
        """(placeholder, value) as bytes, made once: every request and response compares them."""
        return self.placeholder.encode(), self.value.encode()

    def goes_to(self, host: str, port: int = 443) -> bool:
        return any(_rule(h).matches(host, port) for h in self.hosts)


@functools.lru_cache(maxsize=256)
def _rule(pattern: str) -> AllowRule:
    """A host pattern, parsed once (every request to a secret's host asks)."""
    return AllowRule.parse(pattern)


@dataclass(slots=True)
class Injected:
    headers: list[tuple[bytes, bytes]]
    injected: list[str] = field(default_factory=list)  # names of the secrets put in
    withheld: list[str] = field(default_factory=list)  # placeholders seen in a request to a host not theirs


def inject(headers: Sequence[tuple[bytes, bytes]], host: str, port: int, held: Iterable[Secret]) -> Injected:
    """A request's headers with each placeholder replaced by its real value, where the request goes to one
    of that secret's hosts (and, with `header`, only in that header)."""
    return _inject(headers, _plan(held, host, port))


@dataclass(frozen=True)
class _Planned:
    """A secret as one connection uses it: whether its host is this connection's, asked once, not per request."""

    name: str
    placeholder: bytes
    value: bytes
    header: bytes | None  # lowercase
    allowed: bool


def _plan(held: Iterable[Secret], host: str, port: int) -> list[_Planned]:
    return [_Planned(s.name, *s.encoded, s.header.encode() if s.header is not None else None, s.goes_to(host, port)) for s in held]


def _inject(headers: Sequence[tuple[bytes, bytes]], plan: Sequence[_Planned]) -> Injected:
    out = Injected(list(headers))
    for s in plan:
        ph, real = s.placeholder, s.value
        for i, (name, value) in enumerate(out.headers):
            lname = name.lower()
            if s.header is not None and lname != s.header:
                if ph in value or (lname == b"authorization" and ph in _basic(value)):
                    _note(out.withheld, s.name)
                continue
            new = value.replace(ph, real) if ph in value else None
            if new is None and lname == b"authorization":
                new = _replace_in_basic(value, ph, real)
            if new is None:
                continue
            if s.allowed:
                out.headers[i] = (name, new)
                _note(out.injected, s.name)
            else:
                _note(out.withheld, s.name)
    return out


def _note(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)


def _basic(value: bytes) -> bytes:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return b""
    try:
        return base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""


def _replace_in_basic(value: bytes, ph: bytes, real: bytes) -> bytes | None:
    """`Basic base64(user:pass)` with the placeholder replaced inside, re-encoded; None when it is not there."""
    decoded = _basic(value)
    if ph not in decoded:
        return None
    return b"Basic " + base64.b64encode(decoded.replace(ph, real))


class Masker:
    """Turns real values back into placeholders in a stream of bytes, also across the boundaries of the
    chunks it is fed. A placeholder is as long as its value (for values of 16 characters or more), so
    lengths (Content-Length) stay right."""

    def __init__(self, held: Iterable[Secret]) -> None:
        self.pairs = [(s.encoded[1], s.encoded[0]) for s in held if s.value]
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        """What can be passed on now; a tail that may be the start of a value waits for the next chunk."""
        if not self.pairs:
            return data
        buf = self._replace(self.pending + data)
        # hold back only a tail that may be the start of a value (a stream of events is not delayed otherwise)
        cut = len(buf) - self._maybe_value(buf)
        self.pending = buf[cut:]
        return buf[:cut]

    def _maybe_value(self, buf: bytes) -> int:
        """The length of the longest end of `buf` that begins one of the values (shorter than it). Only where
        the value's first byte is, among its last bytes (found in C, not tried length by length)."""
        longest = 0
        for value, _ in self.pairs:
            first, end = value[:1], len(buf)
            at = buf.rfind(first, max(0, end - len(value) + 1))
            while at != -1:
                k = end - at
                if k > longest and value.startswith(buf[at:]):
                    longest = k  # the earliest start found last: the longest end
                at = buf.rfind(first, max(0, end - len(value) + 1), at)
        return longest

    def flush(self) -> bytes:
        out, self.pending = self._replace(self.pending), b""
        return out

    def _replace(self, buf: bytes) -> bytes:
        for value, placeholder in self.pairs:
            buf = buf.replace(value, placeholder)
        return buf


def rewrite_head(head: bytes, host: str, port: int, held: Sequence[Secret]) -> tuple[bytes, Injected]:
    """A whole request head (request line, header lines, the blank line) with the secrets put in. Only the
    header lines that may hold a placeholder (as it is, or in Authorization) are parsed; the others pass as
    they are."""
    out, note = _rewrite_head(head, _plan(held, host, port))
    return out, note if note is not None else Injected([])


def _rewrite_head(head: bytes, plan: Sequence[_Planned]) -> tuple[bytes, Injected | None]:
    """The head rewritten, and what was done; None where no header line may hold a placeholder (most heads)."""
    if not head.endswith(b"\r\n\r\n"):
        head += b"\r\n\r\n"
    # the header lines that may hold a placeholder (the request line never counts): found by searching, not by
    # walking every line, which for a head of a dozen lines costs more than the rest of a request's rewriting
    first = head.find(b"\r\n")
    starts = set()
    for s in plan:
        i = head.find(s.placeholder, first)
        while i != -1:
            starts.add(head.rfind(b"\r\n", 0, i) + 2)
            i = head.find(s.placeholder, i + len(s.placeholder))
    lower = head.lower()
    i = lower.find(b"\r\nauthorization:", first)
    while i != -1:
        starts.add(i + 2)
        i = lower.find(b"\r\nauthorization:", i + 2)
    if not starts:
        return head, None
    fields: list[tuple[bytes, bytes]] = []
    spans: list[tuple[int, int]] = []  # where each field's line is
    for start in sorted(starts):
        end = head.find(b"\r\n", start)
        name, sep, value = head[start:end].partition(b":")
        if sep and name and not name[-1:].isspace():
            fields.append((name, value.strip(b" \t")))
            spans.append((start, end))
    out = _inject(fields, plan)
    pieces, at = [], 0
    for (start, end), (name, value), (_, was) in zip(spans, out.headers, fields, strict=True):
        if value != was:
            pieces += [head[at:start], name, b": ", value]
            at = end
    return (b"".join(pieces) + head[at:]) if pieces else head, out


class RequestRewriter:
    """A client's decrypted stream with every request head rewritten (keep-alive and pipelining included);
    bodies pass untouched. Framing ambiguities raise sniff.Unframed: the gateway then ends the connection."""

    def __init__(self, host: str, port: int, held: Sequence[Secret]) -> None:
        self.plan = _plan(held, host, port)  # the hosts' rules asked once for the connection, not per request
        self.requests = Requests()

    def feed(self, data: bytes) -> tuple[bytes, list[Injected]]:
        pieces = self.requests.feed(data)
        if len(pieces) == 1:  # the usual read: one head, or a part of a body
            kind, piece = pieces[0]
            if kind == "data":
                return piece, []
            piece, note = _rewrite_head(piece, self.plan)
            return piece, [note] if note is not None else []
        out, notes = [], []
        for kind, piece in pieces:
            if kind == "head":
                piece, note = _rewrite_head(piece, self.plan)
                if note is not None:
                    notes.append(note)
            out.append(piece)
        return b"".join(out), notes

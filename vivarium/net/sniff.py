"""The name a client means, read from the first bytes it sends: TLS SNI or HTTP Host.

A name is read only from a complete record: the whole TLS ClientHello (which
may come in many TLS records and many reads, one byte at a time if the client
likes) or the whole HTTP request head, up to its blank line. head_state() says
whether the bytes so far hold one; read_head() reads until they do, within a
deadline and a size cap. Pure functions over bytes never raise on malformed
input; they return None or a state.
"""

from __future__ import annotations

import asyncio
import re
import time

HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")
_HOST = re.compile(rb"\r\nhost:[ \t]*([^\r\n]*)", re.IGNORECASE)


def looks_like_http(data: bytes) -> bool:
    return data.startswith(HTTP_METHODS)


def http_host(data: bytes) -> str | None:
    """The Host header (or CONNECT target) of an HTTP/1 request, without the port."""
    if not looks_like_http(data):
        return None
    if data.startswith(b"CONNECT "):
        target = data[8:].split(b" ", 1)[0]
        return _strip_port(target.decode("ascii", "replace"))
    head = data.split(b"\r\n\r\n", 1)[0]
    m = _HOST.search(head)
    if not m:
        return None
    return _strip_port(m.group(1).strip().decode("ascii", "replace")) or None


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]", 1)[0].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


HEAD_CAP = 64 * 1024  # a ClientHello or request head larger than this is not read for a name
TLS_RECORD_MAX = (1 << 14) + 2048


def _handshake(data: bytes) -> tuple[bytes, int]:
    """The handshake bytes carried by the leading TLS handshake records, and where they end in `data`."""
    hs, p = b"", 0
    while p + 5 <= len(data) and data[p] == 0x16:
        n = int.from_bytes(data[p + 3 : p + 5], "big")
        if p + 5 + n > len(data):
            break
        hs += data[p + 5 : p + 5 + n]
        p += 5 + n
    return hs, p


def head_state(data: bytes, cap: int = HEAD_CAP) -> str:
    """What `data` (a client's first bytes) holds: "complete" (a whole ClientHello or request head),
    "more" (the start of one), "oversized" (one larger than `cap`), or "other" (neither TLS nor HTTP)."""
    if not data:
        return "more"
    if data[0] == 0x16:
        if len(data) >= 5 and int.from_bytes(data[3:5], "big") > TLS_RECORD_MAX:
            return "other"
        hs, end = _handshake(data)
        if len(hs) >= 4:
            if hs[0] != 0x01:
                return "other"  # not a ClientHello
            need = 4 + int.from_bytes(hs[1:4], "big")
            if need > cap:
                return "oversized"
            if len(hs) >= need:
                return "complete"
        if end < len(data) and data[end] != 0x16:
            return "other"  # a record of another type before the hello was whole
        return "oversized" if len(data) > cap + 1024 else "more"
    if looks_like_http(data):
        if b"\r\n\r\n" in data:
            return "complete"
        return "oversized" if len(data) > cap else "more"
    if any(m.startswith(data) for m in HTTP_METHODS):
        return "more"  # "GE", one byte at a time
    return "other"


async def read_head(reader: asyncio.StreamReader, first_wait: float, deadline: float, *, initial: bytes = b"",
                    cap: int = HEAD_CAP, chunk: int = 256 * 1024) -> tuple[bytes, str]:  # fmt: skip
    """Read a client's first bytes until they hold a whole ClientHello or request head.

    Returns (bytes read, state): "silent" (nothing within first_wait: a server-speaks-first protocol,
    or a client biding its time), "eof", "complete", "other", "oversized", or "partial" (the start of
    one that did not finish within `deadline` seconds of the first byte)."""
    data = initial
    if not data:
        try:
            data = await asyncio.wait_for(reader.read(chunk), first_wait)
        except TimeoutError:
            return b"", "silent"
        if not data:
            return b"", "eof"
    end = time.monotonic() + deadline
    while True:
        state = head_state(data, cap)
        if state != "more":
            return data, state
        left = end - time.monotonic()
        if left <= 0:
            return data, "partial"
        try:
            more = await asyncio.wait_for(reader.read(chunk), left)
        except TimeoutError:
            return data, "partial"
        if not more:
            return data, "partial"
        data += more


def tls_sni(data: bytes) -> str | None:
    """The server_name of a TLS ClientHello (across as many records as it takes), if any."""
    try:
        return _sni(data)
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _sni(raw: bytes) -> str | None:
    hs, _ = _handshake(raw)
    # handshake: type 1 (ClientHello), length; then the hello itself
    if len(hs) < 4 or hs[0] != 0x01:
        return None
    d = hs[: 4 + int.from_bytes(hs[1:4], "big")]
    p = 4  # handshake header
    p += 2 + 32  # client version, random
    p += 1 + d[p]  # session id
    p += 2 + int.from_bytes(d[p : p + 2], "big")  # cipher suites
    p += 1 + d[p]  # compression methods
    end = p + 2 + int.from_bytes(d[p : p + 2], "big")
    p += 2
    while p + 4 <= min(end, len(d)):
        kind, size = int.from_bytes(d[p : p + 2], "big"), int.from_bytes(d[p + 2 : p + 4], "big")
        p += 4
        if kind == 0:  # server_name: list length, then (type, length, name)*
            q = p + 2
            while q + 3 <= p + size:
                name_type, n = d[q], int.from_bytes(d[q + 1 : q + 3], "big")
                if name_type == 0:
                    name = d[q + 3 : q + 3 + n]
                    if len(name) != n:
                        return None
                    return name.decode("ascii").lower().rstrip(".")
                q += 3 + n
            return None
        p += size
    return None


def name_in(data: bytes) -> tuple[str, str] | None:
    """(name, where it came from: "sni" or "host") from a client's first bytes."""
    sni = tls_sni(data)
    if sni:
        return sni, "sni"
    host = http_host(data)
    if host:
        return host, "host"
    return None


class Unframed(ValueError):
    """A request whose end cannot be told for sure (its framing is ambiguous or malformed)."""


# The header lines that frame a request or switch protocols, found in one pass over its head.
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding|upgrade|connection):[ \t]*([^\r\n]*)", re.IGNORECASE)


class Requests:
    """Where each HTTP/1 request starts in a client's stream, so that every request on a keep-alive
    connection (pipelined or not) is checked before the server sees it, not only the first.

    feed() splits bytes into ("head", a whole request head) and ("data", anything else: bodies, and what
    follows an Upgrade or CONNECT); a head cut across reads is held back until it is whole. Framing is
    read as a server must (RFC 9112 6): chunked, else Content-Length, else no body; a request whose end is
    ambiguous (both, two different lengths, a bad value or chunk) raises Unframed."""

    def __init__(self) -> None:
        self.buf = b""
        self.left = 0  # body bytes still to come (Content-Length, or the current chunk and its CRLF)
        self.chunked = ""  # "", "size", "data", "trailer": where in a chunked body
        self.opaque = False  # after an Upgrade or CONNECT: not HTTP any more
        self.maybe_opaque = False  # ... unless the next bytes are a request after all (the server did not switch)

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        self.buf += data
        while self.buf:
            if self.opaque:
                out.append(("data", self.buf))
                self.buf = b""
            elif self.left:
                piece, self.buf = self.buf[: self.left], self.buf[self.left :]
                self.left -= len(piece)
                out.append(("data", piece))
                if not self.left and self.chunked == "data":
                    self.chunked = "size"
            elif self.chunked in ("size", "trailer"):
                if not self._chunk_line(out):
                    break
            elif self.maybe_opaque and not any(m.startswith(self.buf[:8]) or self.buf.startswith(m) for m in HTTP_METHODS):
                self.opaque = True
            else:
                if not self._head(out):
                    break
        return out

    def _head(self, out: list[tuple[str, bytes]]) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > HEAD_CAP or (len(self.buf) >= 8 and not looks_like_http(self.buf)):
                raise Unframed("not an HTTP request, or a request head larger than the cap")
            return False
        head, self.buf = self.buf[: end + 4], self.buf[end + 4 :]
        if not looks_like_http(head):
            raise Unframed("not an HTTP request")
        out.append(("head", head))
        self.maybe_opaque = False
        te: list[bytes] = []
        cl: set[bytes] = set()
        upgrade = head.startswith(b"CONNECT ")
        for name, value in _FRAMING.findall(head):
            name = name.lower()
            if name == b"content-length":
                cl.add(value.strip())
            elif name == b"transfer-encoding":
                te.append(value)
            elif name == b"upgrade" or b"upgrade" in value.lower():
                upgrade = True
        if te:
            if cl or len(te) > 1 or te[0].strip().lower() != b"chunked":
                raise Unframed("Transfer-Encoding with Content-Length, or other than chunked")
            self.chunked = "size"
        elif cl:
            if len(cl) > 1 or not next(iter(cl)).isdigit():
                raise Unframed("Content-Length ambiguous or not a number")
            self.left = int(next(iter(cl)))
        if upgrade:
            self.maybe_opaque = True
        return True

    def _chunk_line(self, out: list[tuple[str, bytes]]) -> bool:
        end = self.buf.find(b"\r\n")
        if end < 0:
            if len(self.buf) > 4096:
                raise Unframed("a chunk-size or trailer line too long")
            return False
        line, self.buf = self.buf[:end], self.buf[end + 2 :]
        out.append(("data", line + b"\r\n"))
        if self.chunked == "trailer":
            if not line:
                self.chunked = ""  # the request is whole
            return True
        size = line.split(b";", 1)[0].strip()
        if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
            raise Unframed("a bad chunk size")
        n = int(size, 16)
        if n == 0:
            self.chunked = "trailer"
        else:
            self.chunked, self.left = "data", n + 2  # the chunk and its CRLF
        return True

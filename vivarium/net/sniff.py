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

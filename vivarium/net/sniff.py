"""The name a client means, read from the first bytes it sends: TLS SNI or HTTP Host.

Pure functions over bytes; they never raise on malformed input, they return None.
"""

from __future__ import annotations

import re

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


def tls_sni(data: bytes) -> str | None:
    """The server_name of a TLS ClientHello (in the first record), if any."""
    try:
        return _sni(data)
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _sni(d: bytes) -> str | None:
    # record: type 22 (handshake), version, length; handshake: type 1 (ClientHello)
    if len(d) < 6 or d[0] != 0x16 or d[5] != 0x01:
        return None
    p = 5 + 4  # record header, handshake header
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

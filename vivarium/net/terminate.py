"""Where the gateway speaks TLS itself: a connection to a secret's host, named in its ClientHello, while a
session holds that secret, and a connection the fence denies (its 403 page, deny()). Everything else is
relayed as bytes (gateway.py) and never decrypted.

The guest's TLS ends at a certificate for the host from the sandbox's own CA (ca.py; the guest trusts it),
the server's is checked against the host's trust store; each request head is rewritten with the secrets
(inject.py: for their hosts only, headers only) and the secrets' values are masked out of what comes back.
Real values come from `run --secret` over an owner-only unix socket the supervisor serves, which holds them
in memory and hands them to each serving process it starts (supervisor.py); they are never written down.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

from vivarium.net.ca import ALPN, CA
from vivarium.net.inject import Masker, RequestRewriter, Secret
from vivarium.net.policy import IPAddress
from vivarium.net.sniff import Unframed
from vivarium.net.tls import TLSStream

CHUNK = 65536
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
HEAD_LIMIT = 65536  # what a denied client's request head is read up to, before its 403


def parse_secret(line: bytes) -> Secret:
    """One secret as `run --secret` hands it over: a JSON line of name, placeholder, value, hosts, header.
    ValueError saying why it cannot be used."""
    try:
        d = json.loads(line)
        s = Secret(str(d["name"]), str(d["placeholder"]), str(d["value"]), tuple(str(h) for h in d["hosts"]),
                   str(d["header"]).lower() if d.get("header") else None)  # fmt: skip
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not a secret: {e}") from None
    if len(s.placeholder) < 16 or not s.value or not s.hosts:
        raise ValueError("a placeholder of 16 characters or more, a value and hosts are needed")
    return s


async def take_secret(secrets: dict[str, Secret], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Secrets from the supervisor (which holds them across restarts of this process), one JSON line each;
    replies "ok" or why not to each."""
    try:
        while line := await reader.readline():
            try:
                s = parse_secret(line)
            except ValueError as e:
                writer.write(f"refused: {e}\n".encode())
            else:
                secrets[s.name] = s
                writer.write(b"ok\n")
            await writer.drain()
    finally:
        writer.close()


def client_context(pem: str) -> ssl.SSLContext:
    """How the gateway speaks TLS to servers where it terminates it: checked against `pem`'s certificates (the
    configured upstream CA), else the host's trust store. One per policy, made where its files are readable."""
    ctx = ssl.create_default_context(cadata=pem or None)
    ctx.set_alpn_protocols(list(ALPN))
    return ctx


async def inject(ca: CA, upstream: ssl.SSLContext, held: list[Secret], reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes,
                 dst: IPAddress, port: int, name: str, record: dict[str, Any]) -> tuple[int, int, str | None]:  # fmt: skip
    """Speak TLS to the guest (a certificate for `name` from the sandbox's CA, which its guest trusts) and to
    the server (checked against the host's trust store), put the secrets into each request's headers for
    their hosts, and mask their values out of what comes back. (sent, received, error)"""
    tls = TLSStream(ca.server_context(name), reader, writer, first)
    try:
        await tls.handshake(HANDSHAKE_TIMEOUT)
    except (ssl.SSLError, OSError, TimeoutError) as e:
        return 0, 0, f"tls: {e}"
    try:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(str(dst), port, limit=CHUNK), CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        await tls.close()
        return 0, 0, f"connect: {e}"
    up = TLSStream(upstream, up_reader, up_writer, server_hostname=name)
    try:
        await up.handshake(HANDSHAKE_TIMEOUT)
    except (ssl.SSLError, OSError, TimeoutError) as e:
        up_writer.close()
        await tls.close()
        return 0, 0, f"connect: {e}"
    counts = [0, 0]
    requests = asyncio.ensure_future(_pump_requests(tls, up, up_writer, RequestRewriter(name, port, held), record, counts))
    responses = asyncio.ensure_future(_pump_responses(up, tls, Masker(held), counts))
    try:
        # the server done (it closed): so is the guest's connection; the guest done: the server hears no more
        first_done, _ = await asyncio.wait({requests, responses}, return_when=asyncio.FIRST_COMPLETED)
        if responses in first_done:
            requests.cancel()
        results = await asyncio.gather(requests, responses, return_exceptions=True)
    finally:
        requests.cancel()
        responses.cancel()
        up_writer.close()
        await tls.close()
    failed = next((r for r in results if isinstance(r, Exception)), None)
    error = None
    if isinstance(failed, Unframed):
        error = f"request framing: {failed}"
    elif failed is not None and not isinstance(failed, (OSError, ssl.SSLError, asyncio.IncompleteReadError)):
        raise failed
    return counts[0], counts[1], error


async def deny(ca: CA, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes, name: str, reply: bytes) -> int:
    """A denied TLS connection named `name` in its ClientHello: a certificate for it from the sandbox's CA, the
    client's request head read, `reply` (the 403 page) sent, the connection closed. The bytes sent, if any."""
    tls = TLSStream(ca.server_context(name), reader, writer, first)
    try:
        await tls.handshake(HANDSHAKE_TIMEOUT)
        head = b""
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < HEAD_LIMIT and (more := await tls.read()):
                head += more
        await tls.write(reply)
    except (ssl.SSLError, OSError, TimeoutError):
        return 0  # a client that does not trust the sandbox's CA (or speaks no HTTP) meets a closed connection
    finally:
        await tls.close()
    return len(reply)


async def _pump_requests(tls: TLSStream, up: TLSStream, up_writer: asyncio.StreamWriter, rewriter: RequestRewriter,
                         record: dict[str, Any], counts: list[int]) -> None:  # fmt: skip
    try:
        while data := await tls.read():
            out, notes = rewriter.feed(data)
            for n in notes:
                for key, names in (("secrets", n.injected), ("withheld", n.withheld)):
                    record.setdefault(key, [])
                    record[key] += [x for x in names if x not in record[key]]
            await up.write(out)
            counts[0] += len(out)
    finally:
        up_writer.close()  # TLS has no half-close: the client is done, the server hears no more


async def _pump_responses(up: TLSStream, tls: TLSStream, masker: Masker, counts: list[int]) -> None:
    while data := await up.read():
        out = masker.feed(data)
        await tls.write(out)
        counts[1] += len(out)
    rest = masker.flush()
    await tls.write(rest)
    counts[1] += len(rest)

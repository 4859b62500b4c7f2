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
import contextlib
import json
import ssl
from typing import Any

from vivarium.net.ca import ALPN, CA
from vivarium.net.inject import Injected, Masker, RequestRewriter, Secret
from vivarium.net.policy import IPAddress
from vivarium.net.sniff import Unframed
from vivarium.net.tls import RECORD, TLSStream

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
    bridge = _Bridge(tls, up, RequestRewriter(name, port, held), Masker(held), record)
    if bridge.start():
        try:
            await bridge.done
        finally:
            bridge.close()
        return bridge.counts[0], bridge.counts[1], bridge.error
    counts = [0, 0]  # a Python whose streams keep their buffer elsewhere: the same, as two tasks
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


def _note(record: dict[str, Any], notes: list[Injected]) -> None:
    """The names of the secrets put in (and withheld) by these requests, added to the connection's record once each."""
    for n in notes:
        for key, names in (("secrets", n.injected), ("withheld", n.withheld)):
            if names:
                have = record.setdefault(key, [])
                have += [x for x in names if x not in have]


async def _pump_requests(tls: TLSStream, up: TLSStream, up_writer: asyncio.StreamWriter, rewriter: RequestRewriter,
                         record: dict[str, Any], counts: list[int]) -> None:  # fmt: skip
    try:
        while data := await tls.read():
            out, notes = rewriter.feed(data)
            _note(record, notes)
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


class _Bridge:
    """An injecting connection once both handshakes are done: each side's bytes handled where they arrive
    (decrypted, rewritten or masked, encrypted, written on), not by a task woken for them (with the heads'
    rewriting made cheaper, bench/inject.py went from 0.67x to a median 0.80x). Either side ending (or failing)
    ends both; a side that cannot take more pauses the other's reading."""

    def __init__(self, guest: TLSStream, up: TLSStream, rewriter: RequestRewriter, masker: Masker, record: dict[str, Any]) -> None:
        self.tls = (up, guest)  # indexed by "from the guest"
        self.transports: tuple[asyncio.WriteTransport, asyncio.WriteTransport] = (up.writer.transport, guest.writer.transport)
        self.rewriter, self.masker, self.record = rewriter, masker, record
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.counts = [0, 0]
        self.error: str | None = None

    def start(self) -> bool:
        """The sides' transports handed to the bridge, with what their streams hold already; False where the
        streams' buffers cannot be taken over (then nothing was changed)."""
        taken = [_buffered(self.tls[side].reader) for side in (False, True)]
        if None in taken:
            return False
        for side, got in zip((False, True), taken, strict=True):
            assert got is not None
            self.transports[side].set_protocol(_Side(self, side))
            data, eof = got
            self.received(side, data)
            if eof:
                self.ended(side)
        for side in (False, True):
            reading = self.transports[side]
            if isinstance(reading, asyncio.ReadTransport) and not reading.is_reading():
                reading.resume_reading()  # a stream that had paused it, full
        return True

    def received(self, from_guest: bool, data: bytes) -> None:
        if self.done.done():
            return
        src = self.tls[from_guest]
        if data:
            src.incoming.write(data)
        closed = False
        plain = []
        try:
            # Read while a record may be whole: a read that finds none raises, and that costs as much as the
            # decryption (the error's message is made each time); the usual chunk is one record, read once.
            while src.incoming.pending or src.obj.pending():
                try:
                    data = src.obj.read(RECORD)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    data = b""
                if not data:  # close_notify: the peer is done
                    closed = True
                    break
                plain.append(data)
            if src.outgoing.pending:  # a read may have produced a reply (a key update)
                self.transports[from_guest].write(src.outgoing.read())
            got = b"".join(plain)
            if from_guest:
                out, notes = self.rewriter.feed(got)
                _note(self.record, notes)
            else:
                out = self.masker.feed(got)
            if out:
                self._send(not from_guest, out)
        except Unframed as e:
            self.error = f"request framing: {e}"
            closed = True
        except (ssl.SSLError, OSError):
            closed = True
        if closed:
            self.ended(from_guest)

    def _send(self, to_guest: bool, data: bytes) -> None:
        tls, view = self.tls[to_guest], memoryview(data)
        while view:
            n = tls.obj.write(view)
            view = view[n:]
        self.transports[to_guest].write(tls.outgoing.read())
        self.counts[0 if not to_guest else 1] += len(data)

    def ended(self, guest: bool) -> None:
        """One side is done (EOF, close_notify, an error): what the server said is passed on, and both end."""
        if self.done.done():
            return
        if not guest:
            with contextlib.suppress(ssl.SSLError, OSError):
                if rest := self.masker.flush():
                    self._send(True, rest)
        self.done.set_result(None)

    def close(self) -> None:
        guest = self.tls[True]
        with contextlib.suppress(ssl.SSLError, OSError):
            guest.obj.unwrap()  # close_notify to the guest
        with contextlib.suppress(OSError):
            if guest.outgoing.pending:
                self.transports[True].write(guest.outgoing.read())
        for side in (False, True):
            self.transports[side].close()


class _Side(asyncio.Protocol):
    """One side of a bridged connection, as its transport's protocol."""

    def __init__(self, bridge: _Bridge, guest: bool) -> None:
        self.bridge, self.guest = bridge, guest

    def data_received(self, data: bytes) -> None:
        self.bridge.received(self.guest, data)

    def eof_received(self) -> bool:
        self.bridge.ended(self.guest)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.ended(self.guest)

    def pause_writing(self) -> None:
        other = self.bridge.transports[not self.guest]
        if isinstance(other, asyncio.ReadTransport):
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.bridge.transports[not self.guest]
        if isinstance(other, asyncio.ReadTransport):
            other.resume_reading()


def _buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool] | None:
    """What a stream has read and not handed out yet, taken from it, and whether its peer has ended; None where
    this Python's StreamReader keeps them under other names (3.8-3.13 do not)."""
    buf, eof = getattr(reader, "_buffer", None), getattr(reader, "_eof", None)
    if not isinstance(buf, bytearray) or not isinstance(eof, bool) or reader.exception() is not None:
        return None
    data = bytes(buf)
    buf.clear()
    return data, eof

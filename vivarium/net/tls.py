"""TLS spoken by the gateway itself, over a guest connection whose first bytes (the ClientHello, read to learn
its SNI) were already taken from the stream, and to the server beyond it: an ssl.SSLObject over memory
buffers, fed by hand.

Used only where the gateway terminates TLS (a secret's host, and a denied connection's 403 page:
terminate.py); every other connection is relayed as bytes and never decrypted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

READ = 65536
RECORD = 16384  # the most one TLS record holds: what one read of the TLS object returns at most


class TLSStream:
    """The server side of a TLS connection over `reader`/`writer`, starting with bytes already read; or, given
    `server_hostname`, the client side (the gateway's to a secret's server: leaner than asyncio's own TLS
    transport, which costs a request through the injecting path more than the crypto does)."""

    def __init__(self, ctx: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, initial: bytes = b"",
                 *, server_hostname: str | None = None) -> None:  # fmt: skip
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_hostname is None, server_hostname=server_hostname)
        self.reader, self.writer = reader, writer
        if initial:
            self.incoming.write(initial)

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size():  # only a peer slower than us is waited for
                await self.writer.drain()

    async def _fill(self) -> bool:
        """More bytes from the peer into the TLS object; False at EOF."""
        data = await self.reader.read(READ)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def _refill(self) -> bool:
        """What the TLS object has to say sent, then more from the peer; False at EOF."""
        await self._flush()
        return await self._fill()

    async def handshake(self, timeout: float = 10.0) -> None:
        async def go() -> None:
            while True:
                try:
                    self.obj.do_handshake()
                    await self._flush()
                    return
                except ssl.SSLWantReadError:
                    await self._flush()
                    if not await self._fill():
                        raise ConnectionResetError("the peer closed during the TLS handshake") from None

        await asyncio.wait_for(go(), timeout)

    @property
    def sni(self) -> str | None:
        return self.obj.server_hostname

    async def read(self) -> bytes:
        """Decrypted bytes as they come; b"" when the client is done."""
        while True:
            if not self.incoming.pending and not self.obj.pending() and not await self._refill():
                return b""
            try:
                data = self.obj.read(RECORD)
                if self.outgoing.pending:  # a read may have produced a reply (a key update)
                    await self._flush()
                return data
            except ssl.SSLWantReadError:
                if not await self._refill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.obj.write(view)
            view = view[n:]
            await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self.obj.unwrap()
        with contextlib.suppress(OSError):
            await self._flush()

"""The gateway's own TLS, over a client connection whose ClientHello was already read (to learn its SNI)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from vivarium.net.ca import CA
from vivarium.net.sniff import read_head, tls_sni
from vivarium.net.tls import TLSStream


def test_tls_after_the_client_hello_was_read(tmp_path: Path) -> None:
    ca = CA.of(tmp_path, "t")

    async def main() -> tuple[str | None, bytes, bytes]:
        seen: dict[str, object] = {}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first, _ = await read_head(reader, 5.0, 5.0)  # as the gateway reads it
            name = tls_sni(first)
            seen["sni"] = name
            tls = TLSStream(ca.server_context(name or ""), reader, writer, first)
            await tls.handshake()
            got = b""
            while not got.endswith(b"\n"):
                data = await tls.read()
                if not data:
                    break
                got += data
            seen["got"] = got
            await tls.write(b"echo: " + got)
            await tls.close()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        async with server:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="api.example.org"), 10)
            writer.write(b"x" * 100_000 + b"\n")  # more than one TLS record
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        return seen["sni"], seen["got"], answer  # type: ignore[return-value]

    sni, got, answer = asyncio.run(main())
    assert sni == "api.example.org"
    assert got == b"x" * 100_000 + b"\n" and answer == b"echo: " + got

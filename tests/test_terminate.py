"""The injecting path in one process: a client standing in for the guest, terminate.inject() where the gateway
calls it, a TLS server standing in for the API. Both ways it can move the bytes: the bridge (each side's bytes
handled where they arrive) and the two pumping tasks it falls back to, on a Python whose streams keep their
buffer elsewhere. Large bodies both ways, a client slower than the server (backpressure), a value cut across
TLS records, framing that cannot be read one way only."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from vivarium.credentials import make_placeholder
from vivarium.net import terminate
from vivarium.net.ca import CA
from vivarium.net.inject import Secret
from vivarium.net.sniff import read_head

REAL = "sk-ant-api03-" + "Q" * 80
BODY = 1 << 20  # a request body of 1 MiB (its placeholder stays: bodies are never touched)
ECHOES = 20_000  # the response: the real value this many times (~1.9 MiB), masked back on the way


@pytest.fixture(params=["bridge", "tasks"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which way; and, for the bridge, each time a side could take no more and the other's reading stopped."""
    paused: list[str] = [str(request.param)]
    if request.param == "tasks":
        monkeypatch.setattr(terminate, "_buffered", lambda reader: None)
    else:
        pause = terminate._Side.pause_writing

        def counted(side: terminate._Side) -> None:
            paused.append("guest" if side.guest else "server")
            pause(side)

        monkeypatch.setattr(terminate._Side, "pause_writing", counted)
    return paused


def run(tmp_path: Path, client: Any) -> tuple[list[bytes], dict[str, Any], tuple[int, int, str | None], Any]:
    """Serve one injecting connection; `client(reader, writer, placeholder)` plays the guest. What the API heard
    (each request as it came), the gateway's record, what inject() returned, what the client returned."""
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "public").mkdir()
    ca, public = CA.of(tmp_path / "sandbox", "sandbox"), CA.of(tmp_path / "public", "public")
    secret = Secret("KEY", make_placeholder(REAL), REAL, ("api.test",), "x-api-key")
    heard: list[bytes] = []
    record: dict[str, Any] = {}

    async def api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads requests (a Content-Length body included) and answers each with the key echoed many times."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                heard.append(head + body)
                answer = b"".join(b"%d:" % i + REAL.encode() + b"\n" for i in range(ECHOES)) if b"/echo" in head else b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> tuple[tuple[int, int, str | None], Any]:
        upstream = await asyncio.start_server(api, "127.0.0.1", 0, ssl=public.server_context("api.test"))
        up_port = upstream.sockets[0].getsockname()[1]
        done: asyncio.Future[tuple[int, int, str | None]] = asyncio.get_running_loop().create_future()

        async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first, _ = await read_head(reader, 5.0, 5.0)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # little room on the way to it
            ctx = terminate.client_context((tmp_path / "public" / "ca.crt").read_text())
            result = await terminate.inject(ca, ctx, [secret], reader, writer, first, ipaddress.ip_address("127.0.0.1"), up_port, "api.test", record)
            writer.close()
            done.set_result(result)

        gw = await asyncio.start_server(gateway, "127.0.0.1", 0, limit=terminate.CHUNK)
        trust = ssl.create_default_context(cafile=str(tmp_path / "sandbox" / "ca.crt"))
        async with upstream, gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a guest that takes its time: the gateway must wait
            sock.connect(("127.0.0.1", gw.sockets[0].getsockname()[1]))
            reader, writer = await asyncio.wait_for(asyncio.open_connection(sock=sock, ssl=trust, server_hostname="api.test"), 10)
            try:
                got = await asyncio.wait_for(client(reader, writer, secret.placeholder.encode()), 60)
            finally:
                writer.close()
            return await asyncio.wait_for(done, 10), got

    result, got = asyncio.run(main())
    return heard, record, result, got


async def response(reader: asyncio.StreamReader, slow: bool = False) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = b""
    while len(body) < length:
        body += await reader.read(min(65536, length - len(body)))
        if slow:
            await asyncio.sleep(0.002)  # a guest slower than the server: the gateway must stop reading it
    return body


def test_every_request_injected_bodies_untouched_the_echo_masked(tmp_path: Path, way: list[str]) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ph: bytes) -> list[bytes]:
        body = (b"body keeps " + ph + b" ").ljust(BODY, b"b")
        writer.write(b"POST /upload HTTP/1.1\r\nHost: api.test\r\nx-api-key: " + ph + b"\r\nContent-Length: %d\r\n\r\n" % BODY + body)
        answers = [await response(reader)]
        writer.write(b"GET /echo HTTP/1.1\r\nHost: api.test\r\nx-api-key: " + ph + b"\r\n\r\n")
        answers.append(await response(reader, slow=True))
        writer.write(b"GET /last HTTP/1.1\r\nHost: api.test\r\nx-debug: " + ph + b"\r\n\r\n")  # not the secret's header
        answers.append(await response(reader))
        return [ph, *answers]

    heard, record, (sent, received, error), (ph, *answers) = run(tmp_path, guest)
    real = REAL.encode()
    assert [h.split(b" ")[1] for h in heard] == [b"/upload", b"/echo", b"/last"]
    assert heard[0].count(real) == 1 and heard[0].count(ph) == 1 and heard[0].endswith(b"b" * 1000)  # header in, body as sent
    assert len(heard[0]) - heard[0].index(b"\r\n\r\n") - 4 == BODY
    assert real in heard[1] and ph not in heard[1]
    assert real not in heard[2] and ph in heard[2]
    assert answers[0] == b"ok" and answers[2] == b"ok"
    echo = b"".join(b"%d:" % i + ph + b"\n" for i in range(ECHOES))
    assert answers[1] == echo  # every echo of the value turned back into the placeholder, whatever the records' cuts
    assert record["secrets"] == ["KEY"] and record["withheld"] == ["KEY"]
    assert error is None and sent == sum(map(len, heard)) and received >= len(echo)
    if way[0] == "bridge":
        assert "guest" in way, way  # the guest could not take the echo as fast: the server was not read meanwhile


def test_a_request_framed_two_ways_ends_the_connection(tmp_path: Path, way: list[str]) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ph: bytes) -> bytes:
        writer.write(b"GET /first HTTP/1.1\r\nHost: api.test\r\nx-api-key: " + ph + b"\r\n\r\n")
        await response(reader)
        writer.write(b"POST /smuggle HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        return await reader.read()  # the gateway ends the connection: EOF

    heard, _, (_, _, error), rest = run(tmp_path, guest)
    assert [h.split(b" ")[1] for h in heard] == [b"/first"]  # the ambiguous request never reached the server
    assert rest == b"" and error is not None and error.startswith("request framing:"), error

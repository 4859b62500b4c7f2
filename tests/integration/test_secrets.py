"""Secrets never enter the sandbox: a session gets a placeholder; the gateway puts the real value into
requests to the secret's hosts only, and masks it out of what comes back (issue 15).

The "API" is an HTTPS server at tests/fakenet.py's public host, with a CA of its own that the gateway is told
to trust (network.upstream_ca), as a public CA would be."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import Sandbox
from vivarium.net import control
from vivarium.net.ca import CA
from vivarium.ports import free_port

from ..fakenet import PUBLIC, FakeNet, LoopbackServer
from .conftest import vv, write_config

pytestmark = pytest.mark.integration

REAL = "sk-ant-api03-" + "S3cr3tV4lue" * 8  # what must never reach the guest


@pytest.fixture(scope="module")
def api(net: FakeNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackServer, Path, list[bytes]]]:
    ca_dir = tmp_path_factory.mktemp("public-ca")
    public = CA.of(ca_dir, "public")
    heard: list[bytes] = []

    def serve(conn: socket.socket) -> None:  # echoes the request: a server that repeats a key back
        with public.server_context("public.test").wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data and (more := tls.recv(65536)):
                data += more
            heard.append(data)
            body = b"you sent: " + data
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    server = LoopbackServer(serve, address=PUBLIC, netns=f"/run/netns/{net.ns}")
    yield server, ca_dir / "ca.crt", heard
    server.close()


def wait_for_file(box: Sandbox, path: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while box.exec(["test", "-e", path]).returncode != 0:
        assert time.monotonic() < deadline, f"{path} never appeared in the sandbox"
        time.sleep(1)


def test_a_secret_reaches_its_host_only_and_never_the_guest(project: Path, built: object, net: FakeNet,
                                                           api: tuple[LoopbackServer, Path, list[bytes]]) -> None:  # fmt: skip
    server, public_ca, heard = api
    assert net.dns is not None
    d = project.parent / "secrets-project"
    d.mkdir(exist_ok=True)
    write_config(
        d,
        f"""share = []
[vm]
memory = "1G"
cpus = 2
disk = "10G"
swap = "256M"
[[forward]]
host = {free_port()}
guest = 22
[network]
allow_cidrs = ["{PUBLIC}/32"]
dns_upstream = "{net.dns.address}"
upstream_ca = "{public_ca}"
[[secret]]
name = "API_TOKEN"
from = "env:VV_IT_API_TOKEN"
hosts = ["public.test"]
header = "x-api-key"
""",
    )
    env = {**os.environ, "VV_IT_API_TOKEN": REAL}
    vv("up", "secrets", cwd=d)
    box = Sandbox("secrets")
    try:
        url = f"https://public.test:{server.port}/v1/messages"
        other = f"https://unlisted.example:{server.port}/"  # the same server under a name the secret is not for
        script = (f'curl -sS -H "x-api-key: $API_TOKEN" {url} > /tmp/answer 2>&1; '
                  f'curl -sSk -H "x-api-key: $API_TOKEN" {other} > /tmp/other 2>&1; echo "$API_TOKEN" > /tmp/seen; touch /tmp/done')  # fmt: skip
        vv("run", "secrets", "--secret", "API_TOKEN", "-d", "--session", "s", "--", "sh", "-c", script, cwd=d, env=env)
        wait_for_file(box, "/tmp/done")
        placeholder = box.exec(["cat", "/tmp/seen"], capture=True).stdout.strip()
        assert placeholder.startswith("sk-ant-api03-") and len(placeholder) == len(REAL) and placeholder != REAL
        # the API heard the real value (the guest's curl trusted the gateway: the sandbox's CA is in its store)
        answer = box.exec(["cat", "/tmp/answer"], capture=True).stdout
        assert any(REAL.encode() in h and b"/v1/messages" in h for h in heard), (answer, heard)
        # ... and its echo of it came back masked
        assert "you sent:" in answer and REAL not in answer and placeholder in answer, answer
        # to a host the secret is not for, only the placeholder went (relayed untouched)
        assert any(placeholder.encode() in h and b"unlisted.example" in h for h in heard), heard
        # nowhere in the guest: no process's environment, no file it wrote
        env_dump = box.exec(["sudo", "sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"], capture=True).stdout
        assert REAL not in env_dump and placeholder in env_dump
        # nor on the host's disk: not in the audit log (which says what went in), not in the state directory
        records = [r for r in control.records(box.dir.path) if r.get("kind") == "tcp" and r.get("secrets")]
        assert records and records[0]["secrets"] == ["API_TOKEN"] and records[0]["name"] == "public.test"
        for f in box.dir.path.rglob("*"):
            if f.is_file() and f.suffix != ".qcow2" and f.stat().st_size < 50_000_000:
                assert REAL.encode() not in f.read_bytes(), f
        # a secret that cannot be read on the host is one line at `run`, and nothing starts
        r = vv("run", "secrets", "--secret", "API_TOKEN", "-d", "--", "true", cwd=d, check=False,
               env={k: v for k, v in os.environ.items() if k != "VV_IT_API_TOKEN"})  # fmt: skip
        assert r.returncode == 2 and "VV_IT_API_TOKEN is not set here" in r.stderr and "Traceback" not in r.stderr
    finally:
        box.destroy()


def test_the_guest_trusts_its_own_sandbox_ca_only(box: Sandbox) -> None:
    """The session's sandbox: its CA is in the system bundle (bind-mounted; the disk's bundle unchanged)."""
    mine = (box.dir.path / "ca.crt").read_text().strip().splitlines()[1]
    bundle = box.exec(["cat", "/etc/ssl/certs/ca-certificates.crt"], capture=True).stdout
    assert mine in bundle
    r = box.exec(["sh", "-c", "mountpoint -q /etc/ssl/certs/ca-certificates.crt && echo $NODE_EXTRA_CA_CERTS"], capture=True)
    assert r.stdout.strip() == "/run/vivarium/sandbox-ca.crt", (r.stdout, r.stderr)

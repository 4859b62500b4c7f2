"""Secrets never enter the sandbox: a session gets a placeholder; the gateway puts the real value into
requests to the secret's hosts only, and masks it out of what comes back (issue 15).

The "API" is an HTTPS server at tests/fakenet.py's public host, with a CA of its own that the gateway is told
to trust (network.upstream_ca), as a public CA would be. It is also a git smart-HTTP server that wants Basic
auth, as a forge does for `git` over HTTPS."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import Sandbox
from vivarium.net import control
from vivarium.net.ca import CA

from ..fakenet import PUBLIC, FakeNet, LoopbackServer
from .conftest import fenced, small_vm, vv, write_config

pytestmark = pytest.mark.integration

REAL = "sk-ant-api03-" + "S3cr3tV4lue" * 8  # what must never reach the guest
GIT_REAL = "ghp_" + "G1tT0k3n" * 5
COMMIT = b"5f1c6b1f8d3a2c4e6b7a8d9c0e1f2a3b4c5d6e7f"
API = dict[str, object]


def pkt(line: bytes) -> bytes:
    return b"%04x" % (len(line) + 4) + line


def answer(head: bytes) -> bytes:
    """What the fake forge and API say to one request."""
    line = head.split(b"\r\n", 1)[0]
    if b"/repo.git/info/refs" in line:
        auth = next((h.split(b":", 1)[1].strip() for h in head.split(b"\r\n") if h.lower().startswith(b"authorization:")), b"")
        if not auth:
            return b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="forge"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'
        if base64.b64decode(auth.split(b" ", 1)[1]) != b"x-access-token:" + GIT_REAL.encode():
            return b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        body = pkt(b"# service=git-upload-pack\n") + b"0000" + pkt(COMMIT + b" refs/heads/main\0agent=fake-forge\n") + b"0000"
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)  # fmt: skip
    body = b"you sent: " + head  # an API that repeats a key back
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body


@pytest.fixture(scope="module")
def api(net: FakeNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackServer, Path, list[bytes]]]:
    ca_dir = tmp_path_factory.mktemp("public-ca")
    public = CA.of(ca_dir, "public")
    heard: list[bytes] = []
    ctx = public.server_context("public.test")

    def by_name(obj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        obj.context = public.server_context(name or "public.test")

    ctx.sni_callback = by_name

    def serve(conn: socket.socket) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data and (more := tls.recv(65536)):
                data += more
            heard.append(data)
            tls.sendall(answer(data))

    server = LoopbackServer(serve, address=PUBLIC, netns=f"/run/netns/{net.ns}")
    yield server, ca_dir / "ca.crt", heard
    server.close()


def wait_for_file(box: Sandbox, path: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while box.exec(["test", "-e", path]).returncode != 0:
        assert time.monotonic() < deadline, f"{path} never appeared in the sandbox"
        time.sleep(1)


def holds(path: Path, needle: bytes, chunk: int = 64 << 20) -> bool:
    """Whether the file's bytes contain `needle` (read a chunk at a time: RAM files are gigabytes)."""
    tail = b""
    with path.open("rb") as f:
        while data := f.read(chunk):
            if needle in tail + data:
                return True
            tail = data[-len(needle) :]
    return False


def test_a_secret_reaches_its_host_only_and_never_the_guest(project: Path, built: object, net: FakeNet,
                                                           api: tuple[LoopbackServer, Path, list[bytes]]) -> None:  # fmt: skip
    server, public_ca, heard = api
    assert net.dns is not None
    d = project.parent / "secrets-project"
    d.mkdir(exist_ok=True)
    write_config(
        d,
        "share = []\n"
        + small_vm()
        + fenced(net)
        + f"""upstream_ca = "{public_ca}"
[[secret]]
name = "API_TOKEN"
from = "env:VV_IT_API_TOKEN"
hosts = ["public.test"]
header = "x-api-key"
[[secret]]
name = "GIT_TOKEN"
from = "file:{d / "git-token"}"
hosts = ["www.public.test"]
""",
    )
    (d / "git-token").write_text(GIT_REAL + "\n")
    env = {**os.environ, "VV_IT_API_TOKEN": REAL}
    vv("up", "secrets", cwd=d)
    box = Sandbox("secrets")
    try:
        port = server.port
        script = (
            f'curl -sS -H "x-api-key: $API_TOKEN" https://public.test:{port}/v1/messages > /tmp/answer 2>&1; '
            # the same server under a name the secret is not for: relayed untouched (its own CA: -k)
            f'curl -sSk -H "x-api-key: $API_TOKEN" https://unlisted.example:{port}/ > /tmp/other 2>&1; '
            # git over HTTPS with the token in Basic auth, as a forge wants it
            f'git ls-remote "https://x-access-token:$GIT_TOKEN@www.public.test:{port}/repo.git" > /tmp/git 2>&1; '
            # a denied HTTPS request: the fence's 403 page, over TLS from the sandbox's CA
            "curl -sS https://lan.test/ > /tmp/denied 2>&1; "
            'echo "$API_TOKEN $GIT_TOKEN" > /tmp/seen; touch /tmp/done; exec sleep 3600'  # the session lives on
        )
        vv("run", "secrets", "--secret", "API_TOKEN", "--secret", "GIT_TOKEN", "-d", "--session", "s", "--", "sh", "-c", script, cwd=d, env=env)
        wait_for_file(box, "/tmp/done")
        placeholder, git_placeholder = box.exec(["cat", "/tmp/seen"], capture=True).stdout.split()
        assert placeholder.startswith("sk-ant-api03-") and len(placeholder) == len(REAL) and placeholder != REAL
        assert git_placeholder.startswith("ghp_") and len(git_placeholder) == len(GIT_REAL)
        # the API heard the real value (the guest's curl trusted the gateway: the sandbox's CA is in its store)
        out = {f: box.exec(["cat", f"/tmp/{f}"], capture=True).stdout for f in ("answer", "other", "git", "denied")}
        assert any(REAL.encode() in h and b"/v1/messages" in h for h in heard), (out, heard)
        # ... and its echo of it came back masked
        assert "you sent:" in out["answer"] and REAL not in out["answer"] and placeholder in out["answer"], out
        # to a host the secret is not for, only the placeholder went (relayed untouched)
        assert any(placeholder.encode() in h and b"unlisted.example" in h for h in heard), heard
        assert not any(REAL.encode() in h and b"unlisted.example" in h for h in heard)
        # git over HTTPS: the forge got the real token inside Basic auth, and git listed its refs
        assert f"{COMMIT.decode()}\trefs/heads/main" in out["git"], out["git"]
        # a denied HTTPS request gets a page that says what, by which rule, instead of a reset connection
        assert "lan.test (192.168.77.1:443) denied by the sandbox's network fence: deny private 192.168.0.0/16" in out["denied"], out
        # nowhere in the guest: no process's environment (the session still runs, with its placeholders) ...
        env_dump = box.exec(["sudo", "sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"], capture=True).stdout
        assert REAL not in env_dump and GIT_REAL not in env_dump and placeholder in env_dump and git_placeholder in env_dump
        # ... nor its memory or disks: a snapshot taken now, searched byte by byte
        vv("snapshot", "secrets", "save", "live", cwd=d)
        snap = box.dir.path / "snapshots" / "live"
        files = sorted(f for f in snap.iterdir() if f.is_file())
        assert {"ram", "disk.qcow2"} <= {f.name for f in files}, files
        assert any(holds(f, placeholder.encode()) for f in files if f.name == "ram")  # the search finds what is there
        # nor on the host's disk: not in the audit log (which says what went in), the console log, the state
        records = [r for r in control.records(box.dir.path) if r.get("kind") == "tcp" and r.get("secrets")]
        assert {(r["name"], tuple(r["secrets"])) for r in records} >= {("public.test", ("API_TOKEN",)), ("www.public.test", ("GIT_TOKEN",))}
        for f in (f for f in box.dir.path.rglob("*") if f.is_file()):  # the snapshot's RAM and disks too
            for value in (REAL, GIT_REAL):
                assert not holds(f, value.encode()), f"{value[:8]}… in {f}"
        # a secret that cannot be read on the host is one line at `run`, and nothing starts
        r = vv("run", "secrets", "--secret", "API_TOKEN", "-d", "--", "true", cwd=d, check=False,
               env={k: v for k, v in os.environ.items() if k != "VV_IT_API_TOKEN"})  # fmt: skip
        assert r.returncode == 2 and "VV_IT_API_TOKEN is not set here" in r.stderr and "Traceback" not in r.stderr
    finally:
        box.destroy()


def test_the_guest_trusts_its_own_sandbox_ca_and_keeps_it_through_apt_and_a_cold_boot(box: Sandbox) -> None:
    """The session's sandbox: its CA (not the template's) is in the system bundle, once, and stays there when
    update-ca-certificates makes the bundle anew (as installing a package can) and after a cold boot (fw_cfg)."""
    mine = (box.dir.path / "ca.crt").read_text().strip().splitlines()[1]
    read = ["sh", "-c", "cat /etc/ssl/certs/ca-certificates.crt; echo NODE=$NODE_EXTRA_CA_CERTS"]
    before = box.exec(read, capture=True).stdout
    assert mine in before and before.count("# vivarium sandbox CA") == 1
    assert "NODE=/etc/ssl/vivarium/sandbox-ca.crt" in before
    r = box.exec(["sudo", "update-ca-certificates"], capture=True, timeout=300)
    assert r.returncode == 0, r.stderr
    after = box.exec(read, capture=True).stdout
    assert mine in after and after.count("# vivarium sandbox CA") == 1
    box.stop()
    box.up()  # a boot: the CA comes from fw_cfg this time
    booted = box.exec(read, capture=True).stdout
    assert mine in booted and booted.count("# vivarium sandbox CA") == 1

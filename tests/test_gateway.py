"""The egress gateway on the host, driven through its unix socket as the guest's redirector would.

Real processes and sockets on loopback (opened on purpose with allow_cidrs);
no VM. The VM-level attacks are in tests/integration/test_fence.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from vivarium.net import control, sniff

from .fakenet import FakeDNS, LoopbackServer


def greet_then_echo(conn: socket.socket) -> None:
    """The echo server's side of a connection: a greeting, then every byte back."""
    conn.sendall(b"hello\n")
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[tuple[Path, FakeDNS, LoopbackServer]]:
    dns_server = FakeDNS({"good.test": "127.0.0.1", "lan.test": "192.168.77.1", "other.test": "127.0.0.2"})
    echo = LoopbackServer(greet_then_echo)
    control.write_policy(tmp_path, "lan-block", [], ["127.0.0.1/32"], [], dns_server.address)
    (tmp_path / "qemu.pid").write_text(f"{os.getpid()}\n")
    control.start(tmp_path, tmp_path / "qemu.pid")
    try:
        yield tmp_path, dns_server, echo
    finally:
        dns_server.close()
        control.stop(tmp_path)
        assert control.pid(tmp_path) is None


def tunnel(d: Path, header: dict[str, object]) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(d / "gateway.sock"))
    s.sendall(json.dumps(header).encode() + b"\n")
    return s


def recv_all(s: socket.socket) -> bytes:
    """Everything until the gateway closes; then ours is closed too."""
    out = b""
    with s:
        while data := s.recv(65536):
            out += data
    return out


def ask(d: Path, name: str) -> dns.message.Message:
    s = tunnel(d, {"t": "dns"})
    wire = dns.message.make_query(name, "A").to_wire()
    s.sendall(len(wire).to_bytes(2, "big") + wire)
    size = int.from_bytes(s.recv(2), "big")
    data = b""
    while len(data) < size:
        data += s.recv(size - len(data))
    s.close()
    return dns.message.from_wire(data)


def log(d: Path) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    while True:
        records = list(control.records(d))
        if records or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def wait_for(cond: object, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)


def test_relays_an_allowed_connection_and_logs_it(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, _, echo = gw
    s = tunnel(d, {"t": "tcp", "dst": "127.0.0.1", "port": echo.port, "src": "10.0.2.15:4000"})
    assert s.recv(6) == b"hello\n"
    s.sendall(b"x" * 100000)
    s.shutdown(socket.SHUT_WR)
    assert len(recv_all(s)) == 100000
    s.close()
    wait_for(lambda: any(r.get("kind") == "tcp" for r in log(d)))
    (r,) = [r for r in log(d) if r["kind"] == "tcp"]
    assert r["decision"] == "allow" and r["rule"] == "allow allow_cidrs 127.0.0.1/32"
    assert (r["dst"], r["port"], r["sent"], r["received"]) == ("127.0.0.1", echo.port, 100000, 100006)


def test_denied_http_gets_a_403_that_says_why(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, _, _ = gw
    s = tunnel(d, {"t": "tcp", "dst": "192.168.77.1", "port": 80})
    s.sendall(b"GET /secret HTTP/1.1\r\nHost: router.lan\r\n\r\n")
    reply = recv_all(s).decode()
    assert reply.startswith("HTTP/1.1 403 Forbidden")
    assert "router.lan (192.168.77.1:80)" in reply and "deny private 192.168.0.0/16" in reply
    wait_for(lambda: log(d))
    (r,) = log(d)
    assert (r["decision"], r["rule"], r["name"], r["name_from"]) == ("deny", "deny private 192.168.0.0/16", "router.lan", "host")


def test_denied_non_http_is_just_closed(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, _, _ = gw
    for dst in ("169.254.169.254", "::ffff:10.0.0.1", "fd00::1", "fe80::1", "::1", "100.64.0.1"):
        s = tunnel(d, {"t": "tcp", "dst": dst, "port": 22})
        s.sendall(b"SSH-2.0-attacker\r\n")
        assert recv_all(s) == b""
        s.close()
    wait_for(lambda: len(log(d)) >= 6)
    assert [r["decision"] for r in log(d)] == ["deny"] * 6


def test_dns_port_is_never_relayed(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, _, _ = gw
    s = tunnel(d, {"t": "tcp", "dst": "127.0.0.1", "port": 53})
    assert recv_all(s) == b""
    wait_for(lambda: log(d))
    assert log(d)[0]["rule"] == "deny dns port 53: names resolve through the fence only"


def test_dns_goes_to_the_upstream_and_is_logged(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, fake, _ = gw
    reply = ask(d, "good.test")
    assert [str(r) for r in reply.answer[0]] == ["127.0.0.1"]
    assert ask(d, "missing.test").rcode() == dns.rcode.NXDOMAIN
    assert fake.queries == ["good.test", "missing.test"]
    records = [r for r in log(d) if r["kind"] == "dns"]
    assert [(r["name"], r["rcode"], r["answers"]) for r in records] == [("good.test", "NOERROR", ["127.0.0.1"]), ("missing.test", "NXDOMAIN", [])]


def test_a_name_pointing_at_the_lan_is_still_refused(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, _, _ = gw
    assert [str(r) for r in ask(d, "lan.test").answer[0]] == ["192.168.77.1"]
    s = tunnel(d, {"t": "tcp", "dst": "192.168.77.1", "port": 443})
    assert recv_all(s) == b""
    wait_for(lambda: any(r["kind"] == "tcp" for r in log(d)))
    (r,) = [r for r in log(d) if r["kind"] == "tcp"]
    assert (r["decision"], r["name"], r["name_from"]) == ("deny", "lan.test", "dns")


def client_hello(name: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sniff_reads_sni_and_host() -> None:
    assert sniff.tls_sni(client_hello("api.github.com")) == "api.github.com"
    assert sniff.name_in(b"GET / HTTP/1.1\r\nHOST: Example.COM:8080\r\n\r\n") == ("example.com", "host")
    assert sniff.name_in(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n") == ("pypi.org", "host")
    assert sniff.name_in(b"\x16\x03\x01\x00") is None
    assert sniff.name_in(b"SSH-2.0-x\r\n") is None


def allow_only_good_test(d: Path) -> None:
    """Allowlist mode with good.test listed; allow_cidrs lifts the built-in denial of loopback (the name still decides)."""
    upstream = json.loads((d / "policy.json").read_text())["dns_upstream"]
    control.write_policy(d, "allowlist", [("good.test", "config")], ["127.0.0.0/8"], [], upstream)
    control.reload(d)
    time.sleep(0.3)


def test_allowlist_sni_and_address_must_agree(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, _, echo = gw
    allow_only_good_test(d)
    assert ask(d, "other.test").rcode() == dns.rcode.NXDOMAIN  # not listed: not even resolved
    assert ask(d, "good.test").rcode() == dns.rcode.NOERROR  # listed: resolved, 127.0.0.1 remembered for it

    def attempt(dst: str, name: str) -> bytes:
        s = tunnel(d, {"t": "tcp", "dst": dst, "port": echo.port})
        s.sendall(client_hello(name))
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)

    assert attempt("127.0.0.1", "good.test").startswith(b"hello\n")  # listed name, its own address
    assert attempt("127.0.0.1", "other.test") == b""  # the allowed address, an unlisted name
    assert attempt("127.0.0.3", "good.test") == b""  # a listed name, an address it never resolved to
    tcp = [r for r in log(d) if r["kind"] == "tcp"]
    assert [(r["decision"], r["name"], r["name_from"]) for r in tcp] == [
        ("allow", "good.test", "sni"),
        ("deny", "other.test", "sni"),
        ("deny", "good.test", "sni"),
    ]
    assert tcp[1]["rule"] == "deny allowlist: other.test is not listed"
    assert tcp[2]["rule"] == "deny allowlist: 127.0.0.3 is not an address good.test resolved to"


def test_live_deny_and_allow(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, _, _ = gw
    assert "denied good.test" in control.change_rule(d, "deny", "good.test")
    time.sleep(0.3)
    assert ask(d, "good.test").rcode() == dns.rcode.NXDOMAIN
    assert "allowed good.test" in control.change_rule(d, "allow", "good.test")
    time.sleep(0.3)
    assert ask(d, "good.test").rcode() == dns.rcode.NOERROR
    verdicts = control.check(d, "good.test", 443)
    assert [(a, n, v.allow) for a, n, v in verdicts] == [("127.0.0.1", "good.test", True)]
    assert not control.check(d, "10.1.2.3", 443)[0][2].allow


def test_a_dead_gateway_is_restarted_and_fails_closed_meanwhile(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, _, echo = gw
    child = control.child_pid(d)
    assert child is not None
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: control.child_pid(d) not in (None, child))
    new = control.child_pid(d)
    assert new not in (None, child)

    def serves() -> bool:  # the dead child's socket file is still there until the new one binds its own
        try:
            with tunnel(d, {"t": "tcp", "dst": "127.0.0.1", "port": echo.port}) as s:
                return s.recv(6) == b"hello\n"
        except OSError:
            return False

    wait_for(serves, 15)
    assert serves()


def test_it_exits_with_qemu(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    (tmp_path / "qemu.pid").write_text(f"{sleeper.pid}\n")
    control.write_policy(tmp_path, "offline", [], [], [], "")
    pid = control.start(tmp_path, tmp_path / "qemu.pid")
    assert control.pid(tmp_path) == pid
    sleeper.kill()
    sleeper.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and control.pid(tmp_path) is not None:
        time.sleep(0.05)
    assert control.pid(tmp_path) is None
    assert not (tmp_path / "gateway.sock").exists()
    assert sys.executable


def records(hello: bytes, cut: int) -> bytes:
    """The same ClientHello carried in two TLS records, split inside the handshake message."""
    body = hello[5:]
    head = hello[:3]
    return head + len(body[:cut]).to_bytes(2, "big") + body[:cut] + head + len(body[cut:]).to_bytes(2, "big") + body[cut:]


def test_head_state_needs_the_whole_record() -> None:
    hello = client_hello("other.test")
    assert sniff.head_state(hello) == "complete" and sniff.tls_sni(hello) == "other.test"
    assert [sniff.head_state(hello[:n]) for n in (1, 5, 9, len(hello) - 1)] == ["more"] * 4
    assert sniff.tls_sni(hello[:1]) is None
    split = records(hello, 3)
    assert sniff.head_state(split) == "complete" and sniff.tls_sni(split) == "other.test"
    assert sniff.head_state(split[:-1]) == "more"
    assert sniff.head_state(hello, cap=100) == "oversized"
    assert [sniff.head_state(b) for b in (b"G", b"GET / HTTP/1.1\r\nHost: a", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")] == ["more", "more", "complete"]
    assert sniff.head_state(b"SSH-2.0-x\r\n") == "other" and sniff.head_state(b"\x17\x03\x03\x00\x10") == "other"


def test_allowlist_a_split_or_late_client_hello_is_read_whole(gw: tuple[Path, FakeDNS, LoopbackServer]) -> None:
    d, _, echo = gw
    allow_only_good_test(d)
    assert ask(d, "good.test").rcode() == dns.rcode.NOERROR  # 127.0.0.1 is good.test's, as the gateway knows
    hello = client_hello("other.test")
    since = len([r for r in log(d) if r["kind"] == "tcp"])

    def attempt(*parts: tuple[float, bytes]) -> None:
        s = tunnel(d, {"t": "tcp", "dst": "127.0.0.1", "port": echo.port})
        for pause, part in parts:
            time.sleep(pause)
            s.sendall(part)
        s.shutdown(socket.SHUT_WR)
        recv_all(s)

    attempt((0, hello[:1]), (0.3, hello[1:]))  # one byte, then the rest
    attempt((0, records(hello, 10)))  # two TLS records
    attempt((2.0, hello))  # after the gateway stopped waiting: decided on good.test, then read all the same
    wait_for(lambda: len([r for r in log(d) if r["kind"] == "tcp"]) >= since + 3)
    tcp = [r for r in log(d) if r["kind"] == "tcp"][since:]
    assert [(r["decision"], r["name"], r["rule"]) for r in tcp] == [("deny", "other.test", "deny allowlist: other.test is not listed")] * 3


def test_a_dying_qemu_is_not_taken_for_the_next_one(tmp_path: Path) -> None:
    from vivarium.net.gateway import _pid_alive

    proc = subprocess.Popen(["sleep", "60"])
    (tmp_path / "qemu.pid").write_text(f"{proc.pid}\n")
    assert _pid_alive(tmp_path / "qemu.pid")
    proc.kill()
    wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z")
    assert not _pid_alive(tmp_path / "qemu.pid")  # a zombie (not reaped yet) is not a running QEMU
    proc.wait()
    assert not _pid_alive(tmp_path / "qemu.pid")

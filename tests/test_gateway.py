"""The egress gateway on the host and the sandbox's network namespace, driven as a guest would drive them.

Real processes, a real namespace with its TAP (tests/fakenet.Guest stands in for QEMU and the
guest: a namespace of its own whose NIC is joined to that TAP), made-up hosts in another
namespace (opened on purpose with allow_cidrs); no VM. The VM-level attacks are in
tests/integration/test_fence.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from vivarium.errors import VMError
from vivarium.logfile import Cap
from vivarium.net import control, netns, sniff
from vivarium.net.gateway import PEEK_TIMEOUT

from .fakenet import FakeDNS, Guest, Hosts, LoopbackServer, fence


def greet_then_echo(conn: socket.socket) -> None:
    """The echo server's side of a connection: a greeting, then every byte back."""
    conn.sendall(b"hello\n")
    while data := conn.recv(65536):
        conn.sendall(data)


SRV, OTHER_SRV, STRAY = "198.18.77.1", "198.18.77.2", "198.18.77.3"  # made-up hosts; SRV opened with allow_cidrs


@dataclass
class Stage:
    d: Path
    dns: FakeDNS
    echo: LoopbackServer
    guest: Guest
    hosts: Hosts


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Stage]:
    with contextlib.ExitStack() as stack:
        hosts = Hosts(SRV, OTHER_SRV, STRAY)
        stack.callback(hosts.close)
        dns_server = FakeDNS({"good.test": SRV, "lan.test": "192.168.77.1", "other.test": OTHER_SRV, "api.test": SRV})
        stack.callback(dns_server.close)
        echo = hosts.server(greet_then_echo)
        stack.callback(echo.close)
        control.write_policy(tmp_path, "lan-block", [], [f"{SRV}/32"], [], dns_server.address)
        guest = fence(tmp_path, stack)
        yield Stage(tmp_path, dns_server, echo, guest, hosts)
    assert control.pid(tmp_path) is None and netns.pid(tmp_path) is None


def recv_all(s: socket.socket) -> bytes:
    """Everything until the gateway closes; then ours is closed too."""
    out = b""
    with s:
        while data := s.recv(65536):
            out += data
    return out


def ask(st: Stage, name: str, server: str = "192.0.2.53") -> dns.message.Message:
    """A query over UDP to any server at all: the namespace hands it to the gateway's resolver."""
    with st.guest.sock(socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(dns.message.make_query(name, "A").to_wire(), (server, 53))
        data, peer = s.recvfrom(65535)
    assert peer == (server, 53)  # the answer comes back as if from the server asked
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


def test_relays_an_allowed_connection_and_logs_it(gw: Stage) -> None:
    s = gw.guest.connect(SRV, gw.echo.port)
    assert s.recv(6) == b"hello\n"
    s.sendall(b"x" * 100000)
    s.shutdown(socket.SHUT_WR)
    assert len(recv_all(s)) == 100000
    wait_for(lambda: any(r.get("kind") == "tcp" for r in log(gw.d)))
    (r,) = [r for r in log(gw.d) if r["kind"] == "tcp"]
    assert r["decision"] == "allow" and r["rule"] == f"allow allow_cidrs {SRV}/32"
    assert (r["dst"], r["port"], r["sent"], r["received"]) == (SRV, gw.echo.port, 100000, 100006)
    assert str(r["src"]).startswith(f"{netns.GUEST_SIDE}:")  # where it came from: the kernel's word, as where it went


def test_denied_http_gets_a_403_that_says_why(gw: Stage) -> None:
    s = gw.guest.connect("192.168.77.1", 80)
    s.sendall(b"GET /secret HTTP/1.1\r\nHost: router.lan\r\n\r\n")
    reply = recv_all(s).decode()
    assert reply.startswith("HTTP/1.1 403 Forbidden")
    assert "router.lan (192.168.77.1:80)" in reply and "deny private 192.168.0.0/16" in reply
    assert "no `vivarium egress allow` opens it" in reply  # an address denied as such: say so, not a command that fails
    wait_for(lambda: log(gw.d))
    (r,) = log(gw.d)
    assert (r["decision"], r["rule"], r["name"], r["name_from"]) == ("deny", "deny private 192.168.0.0/16", "router.lan", "host")


def test_denied_https_gets_the_403_over_tls_from_the_sandbox_ca(gw: Stage) -> None:
    """A TLS client the fence denies: a certificate for the name in its ClientHello, from the sandbox's CA
    (which its guest trusts), then the same 403 page, naming the rule and what would open it."""
    control.change_rule(gw.d, "deny", "*.blocked.test")
    time.sleep(0.3)
    client = ssl.create_default_context(cafile=str(gw.d / "ca.crt"))
    pages = []
    for dst, port, name in ((SRV, 443, "www.blocked.test"), ("192.168.77.1", 443, "router.lan")):
        with client.wrap_socket(gw.guest.connect(dst, port), server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
            page = b""
            while more := tls.recv(65536):
                page += more
        pages.append(page.decode())
    blocked, lan = pages
    assert blocked.startswith("HTTP/1.1 403 Forbidden") and f"www.blocked.test ({SRV}:443)" in blocked
    assert "deny *.blocked.test (cli)" in blocked and f"vivarium egress allow {gw.d.name} *.blocked.test" in blocked
    assert lan.startswith("HTTP/1.1 403 Forbidden") and "deny private 192.168.0.0/16" in lan
    # a client that does not trust the sandbox's CA meets a failed handshake, and nothing else
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(gw.guest.connect(SRV, 443), server_hostname="www.blocked.test")
    wait_for(lambda: len([r for r in log(gw.d) if r["kind"] == "tcp"]) >= 3)
    records = [r for r in log(gw.d) if r["kind"] == "tcp"]
    assert [(r["decision"], r["name"]) for r in records] == [("deny", "www.blocked.test"), ("deny", "router.lan"), ("deny", "www.blocked.test")]
    assert int(str(records[0]["received"])) > 0 and records[2]["received"] == 0


def test_denied_non_http_is_just_closed(gw: Stage) -> None:
    targets = ("169.254.169.254", "10.0.0.1", "100.64.0.1", netns.HOST_SIDE, "240.0.0.1", OTHER_SRV)
    for dst in targets:
        s = gw.guest.connect(dst, 22)
        s.sendall(b"SSH-2.0-attacker\r\n")
        assert recv_all(s) == b""
    wait_for(lambda: len(log(gw.d)) >= len(targets))
    assert [(r["dst"], r["decision"]) for r in log(gw.d)] == [(dst, "deny") for dst in targets]


def test_dns_over_tcp_to_any_server_reaches_the_fence_and_dot_does_not(gw: Stage) -> None:
    s = gw.guest.connect("192.0.2.53", 53)
    wire = dns.message.make_query("good.test", "A").to_wire()
    s.sendall(len(wire).to_bytes(2, "big") + wire)
    data = recv_all_then(s, 2)
    reply = dns.message.from_wire(data[2:])
    assert [str(r) for r in reply.answer[0]] == [SRV]
    s = gw.guest.connect("192.0.2.53", 853)
    assert recv_all(s) == b""
    wait_for(lambda: any(r["kind"] == "tcp" for r in log(gw.d)))
    assert [r["rule"] for r in log(gw.d) if r["kind"] == "tcp"] == ["deny dns port 853: names resolve through the fence only"]


def recv_all_then(s: socket.socket, size_bytes: int) -> bytes:
    """A length-prefixed reply, read whole; the connection is then closed."""
    data = b""
    with s:
        while len(data) < size_bytes or len(data) < size_bytes + int.from_bytes(data[:size_bytes], "big"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_dns_goes_to_the_upstream_and_is_logged(gw: Stage) -> None:
    reply = ask(gw, "good.test")
    assert [str(r) for r in reply.answer[0]] == [SRV]
    assert ask(gw, "missing.test", server="8.8.8.8").rcode() == dns.rcode.NXDOMAIN
    assert gw.dns.queries == ["good.test", "missing.test"]
    # the serving process hands its records to the supervisor, which writes them: a moment after the answer
    wait_for(lambda: len([r for r in log(gw.d) if r["kind"] == "dns"]) >= 2)
    records = [r for r in log(gw.d) if r["kind"] == "dns"]
    assert [(r["name"], r["rcode"], r["answers"]) for r in records] == [("good.test", "NOERROR", [SRV]), ("missing.test", "NXDOMAIN", [])]


def test_nothing_else_leaves_the_namespace(gw: Stage) -> None:
    """UDP but DNS, and packets to the namespace's own address, get nowhere: nothing answers, nothing is logged."""
    with gw.guest.sock(socket.SOCK_DGRAM) as u:
        u.settimeout(1.5)
        for dst in ((SRV, 7777), (netns.HOST_SIDE, netns.DNS_PORT + 1), ("192.168.77.1", 123)):
            u.sendto(b"hello?", dst)
            with pytest.raises(OSError):
                u.recvfrom(100)
    assert [r for r in log(gw.d) if r["kind"] != "dns"] == []


def test_a_name_pointing_at_the_lan_is_still_refused(gw: Stage) -> None:
    assert [str(r) for r in ask(gw, "lan.test").answer[0]] == ["192.168.77.1"]
    s = gw.guest.connect("192.168.77.1", 443)
    assert recv_all(s) == b""
    wait_for(lambda: any(r["kind"] == "tcp" for r in log(gw.d)))
    (r,) = [r for r in log(gw.d) if r["kind"] == "tcp"]
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
    """Allowlist mode with good.test listed; allow_cidrs lifts the built-in denial of the made-up hosts (the name still decides)."""
    upstream = json.loads((d / "policy.json").read_text())["dns_upstream"]
    control.write_policy(d, "allowlist", [("good.test", "config")], ["198.18.77.0/24"], [], upstream)
    control.reload(d)
    time.sleep(0.3)


def test_allowlist_sni_and_address_must_agree(gw: Stage) -> None:
    d = gw.d
    allow_only_good_test(d)
    assert ask(gw, "other.test").rcode() == dns.rcode.NXDOMAIN  # not listed: not even resolved
    assert ask(gw, "good.test").rcode() == dns.rcode.NOERROR  # listed: resolved, SRV remembered for it

    def attempt(dst: str, name: str) -> bytes:
        s = gw.guest.connect(dst, gw.echo.port)
        s.sendall(client_hello(name))
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)

    assert attempt(SRV, "good.test").startswith(b"hello\n")  # listed name, its own address
    # the allowed address, an unlisted name; a listed name, an address it never resolved to: the server hears
    # nothing, the client meets the gateway's own TLS (the start of its 403 page, terminate.deny)
    for dst, name in ((SRV, "other.test"), (STRAY, "good.test")):
        reply = attempt(dst, name)
        assert reply.startswith(b"\x16\x03") and b"hello\n" not in reply
    tcp = [r for r in log(d) if r["kind"] == "tcp"]
    assert [(r["decision"], r["name"], r["name_from"]) for r in tcp] == [
        ("allow", "good.test", "sni"),
        ("deny", "other.test", "sni"),
        ("deny", "good.test", "sni"),
    ]
    assert tcp[1]["rule"] == "deny allowlist: other.test is not listed"
    assert tcp[2]["rule"] == f"deny allowlist: {STRAY} is not an address good.test resolved to"


def test_live_deny_and_allow(gw: Stage) -> None:
    d = gw.d
    assert "denied good.test" in control.change_rule(d, "deny", "good.test")
    time.sleep(0.3)
    assert ask(gw, "good.test").rcode() == dns.rcode.NXDOMAIN
    assert "allowed good.test" in control.change_rule(d, "allow", "good.test")
    time.sleep(0.3)
    assert ask(gw, "good.test").rcode() == dns.rcode.NOERROR
    verdicts = control.check(d, "good.test", 443)
    assert [(a, n, v.allow) for a, n, v in verdicts] == [(SRV, "good.test", True)]
    assert not control.check(d, "10.1.2.3", 443)[0][2].allow


def test_a_dead_gateway_is_restarted_and_fails_closed_meanwhile(gw: Stage) -> None:
    d = gw.d
    child = control.child_pid(d)
    assert child is not None
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: control.child_pid(d) not in (None, child))
    new = control.child_pid(d)
    assert new not in (None, child)

    def serves() -> bool:  # until the new child serves, connections wait in the namespace's queue or are refused
        try:
            with gw.guest.connect(SRV, gw.echo.port, timeout=3) as s:
                return s.recv(6) == b"hello\n"
        except OSError:
            return False

    wait_for(serves, 15)
    assert serves()


def test_it_and_the_namespace_exit_with_qemu(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "qemu.pid").write_text(f"{sleeper.pid}\n")
        control.write_policy(tmp_path, "offline", [], [], [], "")
        holder = netns.start(tmp_path, tmp_path / "qemu.pid")
        pid = control.start(tmp_path, tmp_path / "qemu.pid")
        assert control.pid(tmp_path) == pid and netns.pid(tmp_path) == holder
    finally:
        sleeper.kill()
        sleeper.wait()
    wait_for(lambda: control.pid(tmp_path) is None and netns.pid(tmp_path) is None)
    assert control.pid(tmp_path) is None and netns.pid(tmp_path) is None
    assert not (tmp_path / "gateway.serving").exists() and not (tmp_path / netns.SOCKET).exists()
    assert not (tmp_path / netns.PIDFILE).exists()


def test_without_its_namespace_the_gateway_says_so(tmp_path: Path) -> None:
    (tmp_path / "qemu.pid").write_text(f"{os.getpid()}\n")
    control.write_policy(tmp_path, "lan-block", [], [], [], "")
    with pytest.raises(VMError, match="the egress gateway did not start: the sandbox's network namespace is gone"):
        control.start(tmp_path, tmp_path / "qemu.pid")
    assert control.pid(tmp_path) is None


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


def test_allowlist_a_split_or_late_client_hello_is_read_whole(gw: Stage) -> None:
    d = gw.d
    allow_only_good_test(d)
    assert ask(gw, "good.test").rcode() == dns.rcode.NOERROR  # SRV is good.test's, as the gateway knows
    hello = client_hello("other.test")
    since = len([r for r in log(d) if r["kind"] == "tcp"])

    def attempt(*parts: tuple[float, bytes]) -> None:
        s = gw.guest.connect(SRV, gw.echo.port)
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
    from vivarium.state import pid_running as _pid_alive

    proc = subprocess.Popen(["sleep", "60"])
    (tmp_path / "qemu.pid").write_text(f"{proc.pid}\n")
    wait_for(lambda: _pid_alive(tmp_path / "qemu.pid"))  # once spawned: a child between fork and exec has no cmdline yet
    assert _pid_alive(tmp_path / "qemu.pid")
    proc.kill()
    wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z")
    assert not _pid_alive(tmp_path / "qemu.pid")  # a zombie (not reaped yet) is not a running QEMU
    proc.wait()
    assert not _pid_alive(tmp_path / "qemu.pid")


def test_allowlist_every_request_on_a_keep_alive_connection_is_checked(gw: Stage) -> None:
    allow_only_good_test(gw.d)
    assert ask(gw, "good.test").rcode() == dns.rcode.NOERROR
    good = b"GET / HTTP/1.1\r\nHost: good.test\r\n\r\n"
    body = b"POST /up HTTP/1.1\r\nHost: good.test\r\nContent-Length: 40\r\n\r\n" + b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n".ljust(40)
    evil = b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n"
    since = len([r for r in log(gw.d) if r["kind"] == "tcp"])

    # pipelined: both in one write
    s = gw.guest.connect(SRV, gw.echo.port)
    s.sendall(good + evil)
    assert recv_all(s) == b"hello\n" + good  # the server never saw the second request
    # keep-alive: the second request after the first was answered
    s = gw.guest.connect(SRV, gw.echo.port)
    s.sendall(good)
    got = b""
    while len(got) < len(b"hello\n" + good):
        got += s.recv(100)
    assert got == b"hello\n" + good
    s.sendall(evil)
    assert recv_all(s) == b""
    # a request that only looks like one inside another's body is body: it goes on, and so does the next good one
    s = gw.guest.connect(SRV, gw.echo.port)
    s.sendall(body + good)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b"hello\n" + body + good
    # framing a server could read two ways is refused
    s = gw.guest.connect(SRV, gw.echo.port)
    s.sendall(b"POST / HTTP/1.1\r\nHost: good.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + evil)
    assert recv_all(s) == b"hello\n"

    wait_for(lambda: len([r for r in log(gw.d) if r["kind"] == "tcp"]) >= since + 4)
    tcp = [r for r in log(gw.d) if r["kind"] == "tcp"][since:]
    assert [(r["decision"], r["name"], r["rule"]) for r in tcp] == [
        ("deny", "other.test", "deny allowlist: other.test is not listed (request 2 on the connection)"),
        ("deny", "other.test", "deny allowlist: other.test is not listed (request 2 on the connection)"),
        ("allow", "good.test", "allow good.test (config)"),
        ("deny", "good.test", "deny HTTP request 1: Transfer-Encoding with Content-Length, or other than chunked"),
    ]
    # each connection let through was recorded when it opened, too
    opens = [r for r in log(gw.d) if r["kind"] == "open"]
    assert {r["conn"] for r in opens} >= {r["conn"] for r in tcp[:3]}


def test_a_serving_process_never_outlives_its_supervisor(gw: Stage) -> None:
    supervisor, child = control.pid(gw.d), control.child_pid(gw.d)
    assert supervisor is not None and child is not None
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0] == "Z")
    assert control.child_pid(gw.d) is None  # gone (it watched its supervisor's pidfd)
    assert "the supervisor is gone" in (gw.d / "gateway.err").read_text()
    with pytest.raises(OSError):  # failing closed meanwhile
        with gw.guest.connect(SRV, gw.echo.port, timeout=2) as s:
            if not s.recv(6):
                raise ConnectionResetError
    control.start(gw.d, gw.d / "qemu.pid")  # what `vivarium up` does: it serves again
    with gw.guest.connect(SRV, gw.echo.port) as s:
        assert s.recv(6) == b"hello\n"


def test_a_secret_goes_in_for_its_host_only_and_is_masked_on_the_way_back(gw: Stage, tmp_path: Path) -> None:
    """The gateway speaks TLS itself to a secret's host (a certificate from the sandbox's CA, which the guest
    trusts), checks the server against a CA given by the setting, and injects in the headers only."""
    from vivarium.credentials import make_placeholder
    from vivarium.net.ca import CA
    from vivarium.net.inject import Secret

    (tmp_path / "public").mkdir()
    public = CA.of(tmp_path / "public", "public")  # the API's own CA, as a public one would be
    real, other_real = "sk-ant-api03-" + "R" * 80, "ghp_" + "G" * 36
    key = Secret("KEY", make_placeholder(real), real, ("api.test",))
    other = Secret("OTHER", make_placeholder(other_real), other_real, ("elsewhere.test",))
    heard: list[bytes] = []

    def api(conn: socket.socket) -> None:  # answers with what it heard: a server echoing a key back
        with public.server_context("api.test").wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data and (more := tls.recv(65536)):
                data += more
            heard.append(data)
            body = b"you sent: " + data
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    server = gw.hosts.server(api)
    try:
        upstream = json.loads((gw.d / "policy.json").read_text())["dns_upstream"]
        control.write_policy(gw.d, "lan-block", [], [f"{SRV}/32"], [], upstream, upstream_ca=str(tmp_path / "public" / "ca.crt"))
        control.reload(gw.d)
        time.sleep(0.3)
        for s in (key, other):
            control.give_secret(gw.d, s)
        client = ssl.create_default_context(cafile=str(gw.d / "ca.crt"))  # what the guest trusts: its sandbox's CA

        def call() -> bytes:
            with client.wrap_socket(gw.guest.connect(SRV, server.port), server_hostname="api.test") as tls:
                tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.test\r\nx-api-key: " + key.placeholder.encode()
                            + b"\r\nx-other: " + other.placeholder.encode() + b"\r\n\r\n")  # fmt: skip
                answer = b""
                while more := tls.recv(65536):
                    answer += more
            return answer

        answer = call()
        assert real.encode() in heard[0] and key.placeholder.encode() not in heard[0]  # the real value went in ...
        assert other.placeholder.encode() in heard[0] and other_real.encode() not in heard[0]  # ... only for its host
        assert b"you sent:" in answer and real.encode() not in answer and key.placeholder.encode() in answer  # masked back
        wait_for(lambda: any(r["kind"] == "tcp" and r.get("port") == server.port for r in log(gw.d)))  # written as it ends
        (rec,) = [r for r in log(gw.d) if r["kind"] == "tcp" and r.get("port") == server.port]
        assert rec["secrets"] == ["KEY"] and rec["withheld"] == ["OTHER"] and rec["name"] == "api.test"
        assert real not in (gw.d / "egress.log").read_text() and real not in (gw.d / "policy.json").read_text()
        # any other connection is relayed as before, a server that speaks first included
        plain = gw.guest.connect(SRV, gw.echo.port)
        assert plain.recv(6) == b"hello\n"
        plain.close()
        # a secret the gateway cannot use is refused in one line
        with pytest.raises(VMError, match="did not take secret BAD"):
            control.give_secret(gw.d, Secret("BAD", "short", "v", ("api.test",)))
        # the serving process killed (what a guest that crashed it would do): the one started again holds the
        # secrets too (the supervisor keeps them), and the API still hears the real value, not the placeholder
        first = control.child_pid(gw.d)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: control.child_pid(gw.d) not in (None, first) and control.serving(gw.d), timeout=10)
        answer = call()
        assert len(heard) == 2 and real.encode() in heard[1] and key.placeholder.encode() not in heard[1], heard[1]
        assert key.placeholder.encode() in answer and real.encode() not in answer
        assert (gw.d / "secrets.sock").stat().st_mode & 0o077 == 0  # owner-only
        # a client that takes its time between connecting and its ClientHello (git loading its trust store under
        # TCG) to an address the resolver gave for the secret's host: still the gateway's TLS, the value still put in
        assert ask(gw, "api.test").rcode() == dns.rcode.NOERROR
        slow = gw.guest.connect(SRV, server.port)
        time.sleep(PEEK_TIMEOUT + 1.0)
        with client.wrap_socket(slow, server_hostname="api.test") as tls:
            tls.sendall(b"GET /slow HTTP/1.1\r\nHost: api.test\r\nx-api-key: " + key.placeholder.encode() + b"\r\n\r\n")
            while tls.recv(65536):
                pass
        assert b"/slow" in heard[-1] and real.encode() in heard[-1], heard[-1]
    finally:
        server.close()


def test_a_guest_asking_for_name_after_name_stays_within_the_audit_cap(gw: Stage) -> None:
    """Unique names, one query each, as fast as one client asks: the audit log rotates at its cap."""
    upstream = json.loads((gw.d / "policy.json").read_text())["dns_upstream"]
    control.write_policy(gw.d, "lan-block", [], [f"{SRV}/32"], [], upstream, audit=Cap(64 << 10, 1))
    control.reload(gw.d)
    # the cap is read when the serving process starts: a new one (the supervisor starts it again)
    child = control.child_pid(gw.d)
    assert child is not None
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: control.child_pid(gw.d) not in (None, child) and control.serving(gw.d), timeout=10)
    deadline = time.monotonic() + 60
    with gw.guest.sock(socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for i in range(1500):
            s.sendto(dns.message.make_query(f"n{i}.flood.test", "A").to_wire(), ("192.0.2.53", 53))
            s.recvfrom(65535)
            assert time.monotonic() < deadline
    files = [gw.d / "egress.log", gw.d / "egress.log.1"]
    assert all(f.exists() for f in files) and not (gw.d / "egress.log.2").exists()
    assert sum(f.stat().st_size for f in files) <= 2 * (64 << 10)
    names = [r["name"] for r in control.records(gw.d) if r["kind"] == "dns"]
    assert names[-1] == "n1499.flood.test" and len(names) > 300  # the newest are kept, read across the rotation

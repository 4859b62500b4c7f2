"""A made-up network for the fence's tests and benchmarks: hosts in a network namespace.

One namespace, joined to this host by a veth pair, holds every address the
tests aim at, each with a /32 route from here (nothing else is routed there):

    192.168.77.1, 10.77.0.1, 172.16.77.1, 100.64.77.1   the "LAN" (private ranges)
    169.254.169.254                                      a cloud metadata service
    198.51.100.7                                         a "public" host (TEST-NET-2),
                                                         opened with allow_cidrs
    198.51.100.8                                         a second public host, not opened

On each: HTTP on port 80 (GET /bytes/N streams N bytes), a secret on TCP
and UDP 7777, HTTP keep-alive on 8080 (every request answered with its Host), a
connection held open until the client closes it on 9999, and on 198.51.100.7 a DNS server on 53 (UDP and TCP) that
answers every A query with 198.51.100.7: the "outside resolver".
Plus a DNS server on this host's loopback for the gateway (dns_upstream):
public.test and www.public.test → 198.51.100.7, other.test → 198.51.100.8,
lan.test → 192.168.77.1, metadata.test → 169.254.169.254.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LAN = ("192.168.77.1", "10.77.0.1", "172.16.77.1", "100.64.77.1")
METADATA = "169.254.169.254"
PUBLIC = "198.51.100.7"
OTHER = "198.51.100.8"
HOSTS = (*LAN, METADATA, PUBLIC, OTHER)
ZONE = {"public.test": PUBLIC, "www.public.test": PUBLIC, "other.test": OTHER, "lan.test": LAN[0], "metadata.test": METADATA,
        "api.anthropic.com": PUBLIC, "unlisted.example": PUBLIC}  # fmt: skip

SERVER = r"""
import socket, sys, threading

def http(conn):
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        path = data.split(b" ", 2)[1].decode()
        local = conn.getsockname()[0]
        if path.startswith("/bytes/"):
            n = int(path[7:])
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % n)
            block = b"x" * 65536
            while n > 0:
                conn.sendall(block[:n])
                n -= len(block)
            return
        body = ("hello from %s\n" % local).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

def secret(conn):
    with conn:
        conn.sendall(("secret from %s\n" % conn.getsockname()[0]).encode())

def tls_sink(conn):
    # stands in for a TLS server: whatever a client's first bytes, say that they arrived
    with conn:
        conn.settimeout(5)
        try:
            if conn.recv(65536):
                conn.sendall(b"reached\n")
        except OSError:
            pass

def hold(conn):
    # holds a connection open until the client closes it (a flood's connections)
    with conn:
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass

def keepalive(conn):
    # HTTP/1.1 keep-alive: answers every request on the connection with the Host it named
    with conn:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, data = data.split(b"\r\n\r\n", 1)
            host = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")[1:] if l.lower().startswith(b"host:")]
            body = b"host=" + (host[0] if host else b"") + b"\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

def tcp(port, handler):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(4096)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()

def answer(q):
    # header, the question as asked, one A record (name pointer to the question) -> 198.51.100.7
    end = 12
    while q[end]:
        end += q[end] + 1
    end += 5
    record = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton("198.51.100.7")
    return q[:2] + b"\x81\x80" + q[4:6] + b"\x00\x01\x00\x00\x00\x00" + q[12:end] + record

def udp(port, dns):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        data, addr = s.recvfrom(4096)
        s.sendto(answer(data) if dns else b"udp secret\n", addr)

def dns_tcp(conn):
    with conn:
        n = int.from_bytes(conn.recv(2), "big"); q = b""
        while len(q) < n:
            q += conn.recv(n - len(q))
        a = answer(q); conn.sendall(len(a).to_bytes(2, "big") + a)

SERVERS = ((tcp, (80, http)), (tcp, (443, tls_sink)), (tcp, (7777, secret)), (tcp, (8080, keepalive)), (tcp, (9999, hold)),
           (tcp, (53, dns_tcp)), (udp, (7777, False)), (udp, (53, True)))
for target, args in SERVERS:
    threading.Thread(target=target, args=args, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


@dataclass
class FakeNet:
    ns: str = field(default_factory=lambda: f"vvnet{os.getpid() % 100000}")
    veth: str = field(default_factory=lambda: f"vvh{os.getpid() % 100000}")
    server: subprocess.Popen[str] | None = None
    dns: FakeDNS | GivenDNS | None = None
    owned: bool = True  # made by this process (and removed by it): not one handed down by another

    @classmethod
    def given(cls, described: str) -> FakeNet:
        """The network another process made and described (describe()): a normal user running the tests cannot
        make namespaces on the host, so root makes it for them and keeps it while they run."""
        d = json.loads(described)
        return cls(ns=d["ns"], veth=d["veth"], dns=GivenDNS(d["dns"]), owned=False)

    def describe(self) -> str:
        assert self.dns is not None
        return json.dumps({"ns": self.ns, "veth": self.veth, "dns": self.dns.address})

    def __enter__(self) -> FakeNet:
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def _up(self) -> None:
        ip("netns", "add", self.ns)
        ip("link", "add", self.veth, "type", "veth", "peer", "name", "vvn0", "netns", self.ns)
        ip("addr", "add", "10.254.77.1/30", "dev", self.veth)
        ip("link", "set", self.veth, "up")
        ip("-n", self.ns, "addr", "add", "10.254.77.2/30", "dev", "vvn0")
        ip("-n", self.ns, "link", "set", "vvn0", "up")
        ip("-n", self.ns, "link", "set", "lo", "up")
        ip("-n", self.ns, "route", "add", "default", "via", "10.254.77.1")
        for h in HOSTS:
            ip("-n", self.ns, "addr", "add", f"{h}/32", "dev", "lo")
            ip("route", "replace", f"{h}/32", "via", "10.254.77.2", "dev", self.veth)
        self.server = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c", SERVER],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.server.stdout is not None
        assert self.server.stdout.readline().strip() == "ready"
        self.dns = FakeDNS(ZONE)
        # the routes answer before anything boots
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((PUBLIC, 7777), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        if not self.owned:
            return
        if self.dns is not None:
            self.dns.close()
        if self.server is not None:
            self.server.kill()  # ours, by handle
            self.server.wait()
        for h in HOSTS:
            ip("route", "del", f"{h}/32", check=False)
        ip("link", "del", self.veth, check=False)
        ip("netns", "del", self.ns, check=False)

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoopbackServer:
    """A TCP server on this host's loopback (or at `address` in the namespace at `netns`): `handle` runs for
    each connection in its own thread."""

    def __init__(self, handle: Callable[[socket.socket], None], backlog: int = 64, address: str = "127.0.0.1",
                 netns: str | None = None) -> None:  # fmt: skip
        self.handle = handle
        self.sock = in_netns(netns, socket.socket) if netns else socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            self.handle(conn)

    def close(self) -> None:
        self.sock.close()


class FakeDNS:
    """A UDP DNS server on this host's loopback (the gateway's upstream)."""

    def __init__(self, zone: dict[str, str]) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        self.zone = zone
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.queries: list[str] = []

        def serve() -> None:
            while True:
                try:
                    data, addr = self.sock.recvfrom(4096)
                except OSError:
                    return
                q = dns.message.from_wire(data)
                name = q.question[0].name.to_text(omit_final_dot=True).lower()
                self.queries.append(name)
                r = dns.message.make_response(q)
                if name in self.zone and q.question[0].rdtype == dns.rdatatype.A:
                    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", self.zone[name]))
                elif name not in self.zone:
                    r.set_rcode(dns.rcode.NXDOMAIN)
                try:
                    self.sock.sendto(r.to_wire(), addr)
                except OSError:  # closed under us at the end of a test
                    return

        threading.Thread(target=serve, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class GivenDNS:
    """The made-up network's DNS server as another process (root's: tests/as_user.py) runs it."""

    address: str

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ namespaces of the tests' own

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_serial = itertools.count()


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """fn() run on a thread that entered the network namespace at `path`: the sockets and devices it makes live there."""
    out: list[T] = []
    error: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {path}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 (raised again on the caller's thread)
            error.append(e)

    t = threading.Thread(target=enter_and_run)
    t.start()
    t.join()
    if error:
        raise error[0]
    return out[0]


class Hosts:
    """Made-up hosts at `addresses` in a namespace joined to this host by a veth pair, a /32 route to each."""

    def __init__(self, *addresses: str) -> None:
        n = f"{os.getpid() % 100000}{next(_serial)}"
        self.ns, self.veth, self.addresses = f"vvs{n}", f"vvs{n}h", addresses
        self.path = f"/run/netns/{self.ns}"
        try:
            ip("netns", "add", self.ns)
            ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            ip("addr", "add", "10.254.78.1/30", "dev", self.veth)
            ip("link", "set", self.veth, "up")
            for cmd in (["addr", "add", "10.254.78.2/30", "dev", "eth0"], ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                        ["route", "add", "default", "via", "10.254.78.1"]):  # fmt: skip
                ip("-n", self.ns, *cmd)
            for a in addresses:
                ip("-n", self.ns, "addr", "add", f"{a}/32", "dev", "lo")
                ip("route", "replace", f"{a}/32", "via", "10.254.78.2", "dev", self.veth)
        except BaseException:
            self.close()
            raise

    def server(self, handle: Callable[[socket.socket], None], address: str | None = None, backlog: int = 64) -> LoopbackServer:
        return LoopbackServer(handle, backlog, address or self.addresses[0], netns=self.path)

    def close(self) -> None:
        for a in self.addresses:
            ip("route", "del", f"{a}/32", check=False)
        ip("link", "del", self.veth, check=False)
        ip("netns", "del", self.ns, check=False)


class Guest:
    """Stands in for a fenced guest: a namespace whose NIC is joined, frame by frame, to the TAP that a
    sandbox's network namespace (vivarium.net.netns) hands QEMU, addressed as the guest's is."""

    def __init__(self, directory: Path) -> None:
        from vivarium.net import netns

        n = f"{os.getpid() % 100000}{next(_serial)}"
        self.ns = f"vvg{n}"
        self.path = f"/run/netns/{self.ns}"
        self.fds: list[int] = []
        self.stop_r, self.stop_w = os.pipe()
        ip("netns", "add", self.ns)
        try:
            self.fds += netns.take(directory, "tap")
            self.fds.append(in_netns(self.path, self._tap))
            for cmd in (["link", "set", "eth0", "address", netns.GUEST_MAC], ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                        ["addr", "add", f"{netns.GUEST_SIDE}/{netns.PREFIX}", "dev", "eth0"],
                        ["route", "add", "default", "via", netns.HOST_SIDE]):  # fmt: skip
                ip("-n", self.ns, *cmd)
        except BaseException:
            self.close()
            raise
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    @staticmethod
    def _tap() -> int:
        import fcntl
        import struct

        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"eth0", 0x0002 | 0x1000))
        return fd

    def _pump(self) -> None:
        a, b = self.fds
        while True:
            ready, _, _ = select.select([a, b, self.stop_r], [], [])
            if self.stop_r in ready:
                return
            for src in ready:
                try:
                    frame = os.read(src, 65536)
                    os.write(b if src == a else a, frame)
                except OSError:
                    pass

    def sock(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return in_netns(self.path, lambda: socket.socket(socket.AF_INET, kind))

    def connect(self, host: str, port: int, timeout: float = 10) -> socket.socket:
        s = self.sock()
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except BaseException:
            s.close()
            raise
        return s

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        if getattr(self, "pump", None) is not None:
            self.pump.join(5)
        for fd in (*self.fds, self.stop_r, self.stop_w):
            os.close(fd)
        self.fds = []
        ip("netns", "del", self.ns, check=False)


def fence(d: Path, stack: contextlib.ExitStack) -> Guest:
    """The sandbox's network namespace and gateway for the policy written in `d`, and a Guest on its TAP; this
    process stands in for QEMU (they live as long as it does). All of it stopped by `stack`."""
    from vivarium.net import control, netns

    (d / "qemu.pid").write_text(f"{os.getpid()}\n")
    netns.start(d, d / "qemu.pid")
    stack.callback(netns.stop, d)
    guest = Guest(d)
    stack.callback(guest.close)
    control.start(d, d / "qemu.pid")
    stack.callback(control.stop, d)
    return guest

"""The network fence, attacked from inside: as root with the guest's own firewall
flushed, and from a Docker container. Every attack must fail against the fenced
VM and, where the target is reachable at all, succeed against the same image on
plain QEMU user networking (so the test can fail). Positive paths: the made-up
public host answers by name and by IP in lan-block; in allowlist only listed names.

The made-up network is tests/fakenet.py: nothing leaves this machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vivarium import Sandbox
from vivarium import config as cfg
from vivarium.net import control

from ..fakenet import LAN, METADATA, OTHER, PUBLIC, FakeNet, LoopbackServer
from .conftest import small_vm, vv

pytestmark = pytest.mark.integration

# One script, many attacks; prints {attack: "OK <what came back>" | "FAIL <why>"}.
ATTACKS = r"""
import json, socket, subprocess, sys, threading
results = {}

def tcp(host, port, send=b"", family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(6)
    s.connect((host, port) if family == socket.AF_INET else (host, port, 0, 0))
    if send:
        s.sendall(send)
    data = s.recv(400)
    if not data:
        raise OSError("closed without a word")
    if b"denied by the sandbox's network fence" in data:
        raise OSError("the fence's 403")
    return data.decode(errors="replace").strip().splitlines()[-1]

def udp(host, port, payload=b"hi"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(4)
    s.sendto(payload, (host, port))
    return s.recv(512)[:40].hex()

# The outside resolver answers everything with 198.51.100.7; the fence's own
# resolver (where the guest's redirect takes port 53) says example.com does not exist.
QUERY = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
OUTSIDE = socket.inet_aton("198.51.100.7")

def outside(reply):
    if OUTSIDE not in reply:
        raise OSError("answered by the fence's resolver, not the outside one")
    return "answer from the outside resolver"

def dns_udp(server):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(4)
    s.sendto(QUERY, (server, 53))
    return outside(s.recv(512))

def dns_tcp(server):
    s = socket.create_connection((server, 53), timeout=6)
    s.sendall(len(QUERY).to_bytes(2, "big") + QUERY)
    return outside(s.recv(512))


def ping(host):
    r = subprocess.run(["busybox", "ping", "-c", "1", "-W", "3", host], capture_output=True, text=True)
    if r.returncode:
        raise OSError("no reply")
    return "pong"

def attempt(name, fn, *args):
    try:
        results[name] = "OK " + str(fn(*args))
    except Exception as e:
        results[name] = "FAIL " + str(e)[:80]

# All at once (each waits out its own timeout, a few seconds, where the fence drops it), each in a thread.
threads = []
for name, kind, args in json.loads(sys.argv[1]):
    if kind == "http":
        call = (name, tcp, args[0], args[1], b"GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % args[0].encode())
    elif kind == "tcp6":
        call = (name, tcp, args[0], args[1], b"", socket.AF_INET6)
    else:
        call = (name, globals()[kind], *args)
    threads.append(threading.Thread(target=attempt, args=call, daemon=True))
    threads[-1].start()
for t in threads:
    t.join(30)
print(json.dumps({name: results.get(name, "FAIL still waiting after 30 s") for name, _, _ in json.loads(sys.argv[1])}))
"""


def plan(loopback_port: int) -> list[tuple[str, str, list[Any]]]:
    """Every attack: (name, kind, args)."""
    out: list[tuple[str, str, list[Any]]] = [("host loopback via 10.0.2.2", "tcp", ["10.0.2.2", loopback_port])]
    for host in LAN:
        out += [(f"tcp {host}", "tcp", [host, 7777]), (f"udp {host}", "udp", [host, 7777])]
    out += [
        ("ping 192.168.77.1", "ping", [LAN[0]]),
        ("metadata 169.254.169.254", "http", [METADATA, 80]),
        ("ipv6 ula fd77::1", "tcp6", ["fd77::1", 7777]),
        ("ipv6 link-local fe80::1", "tcp6", ["fe80::1%eth0", 7777]),
        ("dns udp to an outside resolver", "dns_udp", [PUBLIC]),
        ("dns tcp to an outside resolver", "dns_tcp", [PUBLIC]),
        # the fenced NIC's other end: the sandbox's namespace itself, its listeners and what else might answer there
        ("the namespace's own address", "tcp", ["10.0.3.1", 22]),
        ("the gateway's listener, directly", "tcp", ["10.0.3.1", 15001]),
        ("udp to the namespace", "udp", ["10.0.3.1", 15053]),
        ("ipv6 link-local on the fenced NIC", "tcp6", ["fe80::1%eth1", 7777]),
        # where the old guestfwd was: user networking lets nothing out now
        ("the old way out, 10.0.2.100:1", "tcp", ["10.0.2.100", 1]),
        ("slirp's dns 10.0.2.3", "dns_udp", ["10.0.2.3"]),
    ]
    return out


# Reachable on plain user networking: the control VM must get through on these.
REACHABLE = {"host loopback via 10.0.2.2", "metadata 169.254.169.254", "dns udp to an outside resolver", "dns tcp to an outside resolver",
             *(f"tcp {h}" for h in LAN), *(f"udp {h}" for h in LAN)}  # fmt: skip


@pytest.fixture(scope="module")
def secret() -> Iterator[LoopbackServer]:
    """A TCP service on this host's loopback that hands a secret to whoever connects."""
    s = LoopbackServer(lambda conn: conn.sendall(b"host-secret\n"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def unfenced(project: Path, built: object, net: FakeNet) -> Iterator[Sandbox]:
    """The same image on plain QEMU user networking: the control."""
    d = project.parent / "unfenced"
    d.mkdir(exist_ok=True)
    (d / "vivarium.toml").write_text(small_vm())
    box = Sandbox("unfenced", cfg.load(d / "vivarium.toml"), fence=False)
    box.up()
    yield box
    box.destroy()


@pytest.fixture(scope="module", autouse=True)
def keep_policy(box: Sandbox) -> Iterator[None]:
    """These tests rewrite the sandbox's policy; leave it as its start wrote it."""
    saved = (box.dir.path / "policy.json").read_text()
    yield
    (box.dir.path / "policy.json").write_text(saved)
    control.reload(box.dir.path)


def run_attacks(box: Sandbox, loopback_port: int, *, flush: bool, container: bool = False,
                also: tuple[tuple[str, str, list[Any]], ...] = ()) -> dict[str, str]:  # fmt: skip
    """The attacks of `plan` (and `also`) from the agent's shell, or as root (`flush`: the guest's firewall gone
    first), or from a Docker container (root in it)."""
    attacks = json.dumps(plan(loopback_port) + list(also))
    if container:
        inner = ["docker", "run", "--rm", "-i", "-v", "/usr:/usr:ro", "vv-attacker", "python3", "-c", ATTACKS, attacks]
        cmd = ["sudo", "sh", "-c", ("nft flush ruleset; iptables -F; " if flush else "") + 'exec "$@"', "sh", *inner]
    elif flush:
        cmd = ["sudo", "sh", "-c", 'nft flush ruleset; iptables -F 2>/dev/null; exec python3 -c "$0" "$1"', ATTACKS, attacks]
    else:
        cmd = ["python3", "-c", ATTACKS, attacks]
    r = box.exec(cmd, capture=True, timeout=600)
    assert r.returncode == 0, r.stderr
    results: dict[str, str] = json.loads(r.stdout.strip().splitlines()[-1])
    return results


def set_policy(box: Sandbox, net: FakeNet, mode: str, allow: list[str] | None = None, cidrs: tuple[str, ...] = (f"{PUBLIC}/32",)) -> None:
    """Change the running sandbox's policy the way `egress allow|deny` does: file + SIGHUP."""
    assert net.dns is not None
    control.write_policy(box.dir.path, mode, [(a, "config") for a in allow or []], cidrs, [], net.dns.address)
    assert control.reload(box.dir.path)
    time.sleep(0.5)


def egress(box: Sandbox, since: int) -> list[dict[str, Any]]:
    return list(box.egress_log())[since:]


def curl(box: Sandbox, *args: str) -> tuple[int, str]:
    r = box.exec(["curl", "-sS", "-m", "20", *args], capture=True, timeout=60)
    return r.returncode, (r.stdout + r.stderr).strip()


# ---------------------------------------------------------------- the attacks


def test_the_control_vm_does_reach_what_the_fence_stops(unfenced: Sandbox, secret: LoopbackServer) -> None:
    results = run_attacks(unfenced, secret.port, flush=True)
    missed = {k: v for k, v in results.items() if k in REACHABLE and not v.startswith("OK")}
    assert not missed, missed
    assert results["host loopback via 10.0.2.2"] == "OK host-secret"
    assert results["tcp 192.168.77.1"] == "OK secret from 192.168.77.1"
    assert secret.hits >= 1


def test_attacks_as_the_agent_are_denied_and_logged(box: Sandbox, secret: LoopbackServer) -> None:
    hits, since = secret.hits, len(list(box.egress_log()))
    results = run_attacks(box, secret.port, flush=False)
    through = {k: v for k, v in results.items() if v.startswith("OK")}
    assert not through, through
    assert secret.hits == hits
    log = egress(box, since)
    tcp = {(r["dst"], r["port"]): r for r in log if r["kind"] == "tcp"}
    # every TCP attempt through the fenced NIC reached the gateway (the namespace took it there) and was denied
    # by a rule; 10.0.2.0/24 is user networking's, which restrict=on lets nothing out of (so nothing is logged)
    assert ("10.0.2.2", secret.port) not in tcp and ("10.0.2.100", 1) not in tcp
    assert tcp[("10.0.3.1", 22)]["rule"] == tcp[("10.0.3.1", 15001)]["rule"] == "deny private 10.0.0.0/8"
    assert tcp[(LAN[0], 7777)]["rule"] == "deny private 192.168.0.0/16"
    assert tcp[(LAN[2], 7777)]["rule"] == "deny private 172.16.0.0/12"
    assert tcp[(LAN[3], 7777)]["rule"] == "deny cgnat 100.64.0.0/10"
    assert tcp[(METADATA, 80)]["rule"] == "deny link-local/metadata 169.254.0.0/16"
    assert all(r["decision"] == "deny" for r in tcp.values()), tcp
    # DNS to an outside resolver was answered by the fence's own resolver instead
    assert any(r["kind"] == "dns" and r["name"] == "example.com" for r in log)


def test_attacks_as_root_with_the_guest_firewall_flushed(box: Sandbox, secret: LoopbackServer) -> None:
    hits, since = secret.hits, len(list(box.egress_log()))
    results = run_attacks(box, secret.port, flush=True)
    through = {k: v for k, v in results.items() if v.startswith("OK")}
    assert not through, through
    assert secret.hits == hits
    log = egress(box, since)
    asked = [r for r in log if r["kind"] == "tcp" and r.get("dst") == LAN[0] and r["port"] == 7777]
    assert {r["rule"] for r in asked} == {"deny private 192.168.0.0/16"}
    # DNS sent to any server, over UDP and TCP, was answered by the fence's resolver
    assert [r["name"] for r in log if r["kind"] == "dns"].count("example.com") >= 2


@pytest.mark.same_everywhere
def test_attacks_from_a_docker_container(box: Sandbox, secret: LoopbackServer) -> None:
    # An image from what the guest has (no registry here): its own /usr (python3, busybox), mounted read-only into
    # the container (run_attacks), under the merged-/usr links; the container's network is Docker's, as any image's.
    build = "set -e; d=$(mktemp -d); mkdir $d/usr; for l in bin sbin lib lib64; do ln -s usr/$l $d/$l; done; " \
            "tar -C $d -c . | docker import - vv-attacker >/dev/null; rm -rf $d"  # fmt: skip
    r = box.exec(["sudo", "sh", "-c", build], capture=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # with the fence in place: the container's traffic goes through the gateway, and a container can still use the
    # internet the policy allows
    allowed = ("the public host, allowed", "http", ["public.test", 80])
    results = run_attacks(box, secret.port, flush=False, container=True, also=(allowed,))
    assert results.pop(allowed[0]) == f"OK hello from {PUBLIC}", results
    through = {k: v for k, v in results.items() if v.startswith("OK")}
    assert not through, through
    results = run_attacks(box, secret.port, flush=True, container=True)
    through = {k: v for k, v in results.items() if v.startswith("OK")}
    assert not through, through


# ---------------------------------------------------------------- what gets through


@pytest.mark.same_everywhere
def test_lan_block_reaches_the_public_host_by_name_and_by_ip(box: Sandbox) -> None:
    since = len(list(box.egress_log()))
    assert curl(box, "http://public.test/") == (0, f"hello from {PUBLIC}")
    assert curl(box, f"http://{PUBLIC}/") == (0, f"hello from {PUBLIC}")
    assert curl(box, "-o", "/dev/null", "-w", "%{http_code}", "http://other.test/")[1] == "403"  # documentation range, not opened
    _, text = curl(box, "http://other.test/")
    assert "deny documentation 198.51.100.0/24" in text
    log = egress(box, since)
    allowed = [r for r in log if r["kind"] == "tcp" and r["decision"] == "allow"]
    opened = f"allow allow_cidrs {PUBLIC}/32"
    assert [(r["name"], r["rule"]) for r in allowed] == [("public.test", opened), (PUBLIC, opened)]
    assert all(r["received"] > 0 and r["sent"] > 0 and "duration" in r for r in allowed)
    text = vv("egress", "log", box.name).stdout
    assert "ALLOW tcp public.test 198.51.100.7:80" in text and "DENY  tcp other.test 198.51.100.8:80" in text


@pytest.mark.same_everywhere
def test_a_name_pointing_into_the_lan_is_refused(box: Sandbox) -> None:
    since = len(list(box.egress_log()))
    _, text = curl(box, "http://lan.test:7777/")
    assert "denied by the sandbox's network fence: deny private 192.168.0.0/16" in text
    (r,) = [r for r in egress(box, since) if r["kind"] == "tcp"]
    assert (r["dst"], r["name"], r["decision"], r["rule"]) == (LAN[0], "lan.test", "deny", "deny private 192.168.0.0/16")


@pytest.mark.same_everywhere
def test_allowlist_only_listed_names_and_their_own_addresses(box: Sandbox, net: FakeNet) -> None:
    # both made-up public hosts opened: in allowlist mode that only lifts the built-in denial; names decide
    set_policy(box, net, "allowlist", ["public.test"], ("198.51.100.0/24",))
    try:
        since = len(list(box.egress_log()))
        assert curl(box, "http://public.test/") == (0, f"hello from {PUBLIC}")
        code, text = curl(box, "http://other.test/")
        assert code == 6, text  # not listed: not even resolved
        # the allowed address with the SNI of a denied name, and a listed name's SNI at an address it never resolved to:
        # the server hears nothing, curl gets the fence's 403 page over TLS (a certificate from the sandbox's CA, which
        # the guest trusts: no -k) naming the rule
        for pin, url, rule in ((f"other.test:443:{PUBLIC}", "https://other.test/", "deny allowlist: other.test is not listed"),
                               (f"public.test:443:{OTHER}", "https://public.test/", "is not an address public.test resolved to")):  # fmt: skip
            code, text = curl(box, "--resolve", pin, url)
            assert code == 0 and "denied by the sandbox's network fence" in text and rule in text, text
        # the allowed host by bare IP: no listed name
        assert "403" in curl(box, "-o", "/dev/null", "-w", "%{http_code}", f"http://{PUBLIC}/")[1]
        log = egress(box, since)
        assert any(r["kind"] == "dns" and r["name"] == "other.test" and r["rcode"] == "NXDOMAIN" and r["decision"] == "deny" for r in log)
        rules = {(r["dst"], r.get("name")): r["rule"] for r in log if r["kind"] == "tcp" and r["decision"] == "deny"}
        assert rules[(PUBLIC, "other.test")] == "deny allowlist: other.test is not listed"
        assert rules[(OTHER, "public.test")] == f"deny allowlist: {OTHER} is not an address public.test resolved to"
        # live: allow another name, no reboot
        assert "allowed www.public.test" in vv("egress", "allow", box.name, "www.public.test").stderr
        time.sleep(0.5)
        assert curl(box, "http://www.public.test/") == (0, f"hello from {PUBLIC}")
        check = vv("egress", "check", box.name, "other.test:80", check=False)
        assert check.returncode == 1 and "deny allowlist: other.test is not listed" in check.stdout
        assert "allow" in vv("egress", "check", box.name, "public.test:80").stdout
    finally:
        set_policy(box, net, "lan-block")


@pytest.mark.same_everywhere
def test_offline_lets_nothing_out(box: Sandbox, net: FakeNet) -> None:
    set_policy(box, net, "offline")
    try:
        code, text = curl(box, "http://public.test/")
        assert code == 6, text
        code, text = curl(box, f"http://{PUBLIC}/")
        assert "deny offline mode" in text
    finally:
        set_policy(box, net, "lan-block")
    assert curl(box, "http://public.test/") == (0, f"hello from {PUBLIC}")


def test_a_killed_gateway_is_restarted_and_egress_fails_closed(box: Sandbox) -> None:
    child = control.child_pid(box.dir.path)
    assert child is not None
    subprocess.run(["kill", "-9", str(child)], check=True)
    deadline = time.monotonic() + 10
    while control.child_pid(box.dir.path) in (None, child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert control.child_pid(box.dir.path) not in (None, child)
    time.sleep(1)
    assert curl(box, "http://public.test/") == (0, f"hello from {PUBLIC}")
    assert "gateway: serving process exited" in (box.dir.path / "gateway.err").read_text()


# ---------------------------------------------------------------- issue 12: ranges, and denied names win

IPV6 = r"""
import json, socket, subprocess, sys
# root gives the fenced NIC an IPv6 address and a default route of its own making
subprocess.run("ip -6 addr add 2001:db8:77::15/64 dev eth1 nodad; ip -6 route replace default dev eth1", shell=True)
out = {}
for dst in json.loads(sys.argv[1]):
    try:
        s = socket.create_connection((dst, 7777), timeout=4)
        out[dst] = s.recv(100).decode(errors="replace") or "closed"
    except OSError as e:
        out[dst] = "FAIL " + str(e)
print(json.dumps(out))
"""

# The LAN host 192.168.77.1 spelled through IPv6 transition ranges, and special-purpose ranges that are nobody's internet.
SPELLINGS = ("64:ff9b:1::c0a8:4d01", "64:ff9b::c0a8:4d01", "2002:c0a8:4d01::1", "2001:0:4136:e378:8000:63bf:3f57:b2fe", "fec0::c0a8:4d01",
             "3fff::1", "::ffff:192.168.77.1")  # fmt: skip


@pytest.mark.same_everywhere
def test_transition_ranges_get_nowhere_ipv6_has_no_way_out(box: Sandbox) -> None:
    """The sandbox's namespace has IPv6 off: whatever the guest's root sets up, no IPv6 packet goes anywhere, so no
    spelling of a LAN address in an IPv6 form reaches the gateway (policy.py refuses them too, see test_policy)."""
    since = len(list(box.egress_log()))
    r = box.exec(["sudo", "sh", "-c", 'nft flush ruleset; exec python3 -c "$0" "$1"', IPV6, json.dumps(SPELLINGS)], capture=True, timeout=120)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert not [v for v in results.values() if "secret" in v], results
    assert all(v.startswith("FAIL") for k, v in results.items() if not k.startswith("::ffff:")), results
    # (the v4-mapped form is the guest's own kernel talking IPv4: it goes through the fence, and is denied by name of range)
    assert [(rec["dst"], rec["rule"]) for rec in egress(box, since) if rec["kind"] == "tcp"] == [(LAN[0], "deny private 192.168.0.0/16")]


@pytest.mark.same_everywhere
def test_a_denied_names_address_stays_denied_whatever_name_the_client_shows(box: Sandbox, net: FakeNet) -> None:
    set_policy(box, net, "lan-block")
    try:
        assert curl(box, "http://public.test/") == (0, f"hello from {PUBLIC}")  # the gateway resolved it: it knows the address
        vv("egress", "deny", box.name, "public.test")
        time.sleep(0.5)
        since = len(list(box.egress_log()))
        # the same address, named as something else in the Host header (or the SNI)
        _, text = curl(box, "-H", "Host: evil.test", f"http://{PUBLIC}/")
        assert f"hello from {PUBLIC}" not in text, text
        _, text = curl(box, "--resolve", f"evil.test:443:{PUBLIC}", "https://evil.test/")
        assert "denied by the sandbox's network fence: deny public.test (cli); the client named evil.test" in text, text
        denied = [r for r in egress(box, since) if r["kind"] == "tcp"]
        assert denied and all(r["decision"] == "deny" and r["rule"].startswith("deny public.test (cli)") for r in denied), denied
        assert any("the client named evil.test" in r["rule"] for r in denied)
    finally:
        set_policy(box, net, "lan-block")


SPLIT = r"""
import json, socket, struct, sys, time
def hello(name):
    name = name.encode()
    sni = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
    ext = struct.pack("!HH", 0, len(sni)) + sni
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack("!H", len(ext)) + ext
    return b"\x01" + len(body).to_bytes(3, "big") + body
hs = hello("evil.test")
whole = b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs
two = b"".join(b"\x16\x03\x01" + struct.pack("!H", len(p)) + p for p in (hs[:10], hs[10:]))
out = {}
for what, parts in (("one byte, then the rest", [(0, whole[:1]), (0.3, whole[1:])]), ("two TLS records", [(0, two)]),
                    ("after 2 s of silence", [(2.0, whole)])):
    s = socket.create_connection((sys.argv[1], 443), timeout=15)
    for pause, part in parts:
        time.sleep(pause); s.sendall(part)
    try:
        out[what] = s.recv(100).decode(errors="replace").strip() or "closed"
    except OSError as e:
        out[what] = str(e)
    s.close()
print(json.dumps(out))
"""


@pytest.mark.same_everywhere
def test_allowlist_a_split_or_late_client_hello_is_read_whole(box: Sandbox, net: FakeNet) -> None:
    set_policy(box, net, "allowlist", ["public.test"])
    try:
        assert box.exec(["getent", "hosts", "public.test"]).returncode == 0  # the gateway now knows the address as public.test's
        since = len(list(box.egress_log()))
        r = box.exec(["sudo", "sh", "-c", 'nft flush ruleset; exec python3 -c "$0" "$1"', SPLIT, PUBLIC], capture=True, timeout=120)
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout.strip().splitlines()[-1])
        assert not [what for what, got in results.items() if got == "reached"], results  # the server never heard the hello
        tcp = [rec for rec in egress(box, since) if rec["kind"] == "tcp" and rec["port"] == 443]
        assert [(rec["decision"], rec["name"], rec["rule"]) for rec in tcp] == [("deny", "evil.test", "deny allowlist: evil.test is not listed")] * 3
    finally:
        set_policy(box, net, "lan-block")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.same_everywhere
@pytest.mark.parametrize("victims", ["supervisor", "supervisor and child"])
def test_up_brings_back_a_killed_gateway(box: Sandbox, victims: str) -> None:
    d = box.dir.path
    supervisor, child = control.pid(d), control.child_pid(d)
    assert supervisor is not None and child is not None
    os.kill(supervisor, signal.SIGKILL)
    if victims == "supervisor and child":
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "gateway  down" in vv("status", box.name).stdout
    r = vv("up", box.name)
    assert "its egress gateway was down and is restarted" in r.stderr, r.stderr
    assert control.pid(d) not in (None, supervisor)
    assert not _alive(child)  # a serving process left without its supervisor is not left serving
    assert curl(box, "http://public.test/") == (0, f"hello from {PUBLIC}")
    assert f"gateway  up (pid {control.pid(d)})" in vv("status", box.name).stdout


# ---------------------------------------------------------------- issue 12: keep-alive, the host's addresses now, floods, records

KEEPALIVE = r"""
import json, socket, sys
def ask(s, host):
    s.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
    data = b""
    try:
        while not (b"\r\n\r\n" in data and data.endswith(b"\n") and not data.endswith(b"\r\n\r\n")):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        return str(e)
    return data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip() or "closed"
out = {}
s = socket.create_connection((sys.argv[1], 8080), timeout=10)
out["first"] = ask(s, "public.test")
out["keep-alive second"] = ask(s, "evil.test")
s.close()
s = socket.create_connection((sys.argv[1], 8080), timeout=10)
s.sendall(b"GET / HTTP/1.1\r\nHost: public.test\r\n\r\nGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
data = b""
try:
    while chunk := s.recv(4096):
        data += chunk
except OSError:
    pass
out["pipelined"] = data.decode(errors="replace")
print(json.dumps(out))
"""


@pytest.mark.same_everywhere
def test_allowlist_every_request_on_a_keep_alive_connection_is_checked(box: Sandbox, net: FakeNet) -> None:
    set_policy(box, net, "allowlist", ["public.test"])
    try:
        assert box.exec(["getent", "hosts", "public.test"]).returncode == 0  # the gateway knows the address as public.test's
        since = len(list(box.egress_log()))
        r = box.exec(["python3", "-c", KEEPALIVE, PUBLIC], capture=True, timeout=120)
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout.strip().splitlines()[-1])
        assert results["first"] == "host=public.test", results
        assert "host=evil.test" not in results["keep-alive second"] and "host=evil.test" not in results["pipelined"], results
        assert "host=public.test" in results["pipelined"], results  # the allowed request before it was answered
        denied = [rec for rec in egress(box, since) if rec["kind"] == "tcp" and rec["port"] == 8080 and rec["decision"] == "deny"]
        assert [(rec["name"], rec["rule"]) for rec in denied] == [
            ("evil.test", "deny allowlist: evil.test is not listed (request 2 on the connection)")
        ] * 2
    finally:
        set_policy(box, net, "lan-block")


@pytest.mark.same_everywhere
@pytest.mark.needs_root  # adds an address to the host's loopback
def test_an_address_the_host_gains_after_the_start_is_still_the_hosts(box: Sandbox, net: FakeNet) -> None:
    # the user opened a range (say, their office's); the host itself joins it later (a VPN comes up)
    set_policy(box, net, "lan-block", cidrs=(f"{PUBLIC}/32", "203.0.113.0/24"))
    subprocess.run(["ip", "addr", "add", "203.0.113.77/32", "dev", "lo"], check=True)
    server = None
    try:
        server = LoopbackServer(lambda conn: conn.sendall(b"host-secret\n"), address="203.0.113.77")
        since = len(list(box.egress_log()))
        r = box.exec(["python3", "-c", f"import socket; print(socket.create_connection(('203.0.113.77', {server.port}), timeout=10).recv(64))"],
                     capture=True, timeout=60)  # fmt: skip
        assert "host-secret" not in r.stdout
        assert server.hits == 0
        (rec,) = [rec for rec in egress(box, since) if rec["kind"] == "tcp"]
        assert rec["decision"] == "deny" and rec["rule"].startswith("deny the host's own address (203.0.113.77 is an address of the host's"), rec
    finally:
        if server is not None:
            server.close()
        subprocess.run(["ip", "addr", "del", "203.0.113.77/32", "dev", "lo"], check=False)
        set_policy(box, net, "lan-block")


FLOOD = r"""
import asyncio, json, sys
N, HOLD = int(sys.argv[2]), float(sys.argv[3])

async def main():
    held, failed = [], []
    async def one():
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(sys.argv[1], 9999), 60)
            held.append(w)
        except (OSError, asyncio.TimeoutError) as e:
            failed.append(type(e).__name__)
    await asyncio.gather(*(one() for _ in range(N)))
    print(json.dumps({"held": len(held), "failed": failed[:5]}), flush=True)
    await asyncio.sleep(HOLD)  # while the others are measured and the host counts its processes
    for w in held:
        w.close()

asyncio.run(main())
"""

# Meanwhile, in another process of the same guest: a DNS lookup, and an HTTPS request (the server answers its hello).
MEANWHILE = r"""
import json, socket, ssl, time
def client_hello(name):
    out = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()
hello = client_hello("public.test")
t = time.monotonic()
socket.getaddrinfo("www.public.test", 443, socket.AF_INET)
dns = time.monotonic() - t
t = time.monotonic()
s = socket.create_connection(("public.test", 443), timeout=30)
s.sendall(hello)
reply = s.recv(64)
https = time.monotonic() - t
print(json.dumps({"dns": dns, "https": https, "reply": reply.decode(errors="replace")}))
"""


def _processes() -> int:
    """How many processes this host runs now."""
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit())


@pytest.mark.same_everywhere
def test_a_flood_of_connections_stalls_neither_dns_nor_other_connections(box: Sandbox) -> None:
    since = len(list(box.egress_log()))
    script = (
        'ulimit -n 4096; python3 -c "$0" "$1" 1000 15 > /tmp/flood.out & '
        "sleep 1; "  # the flood is under way (under TCG, opening 1000 connections takes seconds)
        'python3 -c "$2"; wait; cat /tmp/flood.out'
    )
    result: dict[str, Any] = {}

    def flood() -> None:
        result["r"] = box.exec(["sh", "-c", script, FLOOD, PUBLIC, MEANWHILE], capture=True, timeout=600)

    before = _processes()
    worker = threading.Thread(target=flood)
    worker.start()
    most = 0
    while worker.is_alive():  # while the flood is opened and held: nothing on the host starts a process per connection
        most = max(most, _processes() - before)
        time.sleep(0.2)
    worker.join()
    r = result["r"]
    assert r.returncode == 0, r.stderr
    meanwhile, flooded = (json.loads(line) for line in r.stdout.strip().splitlines()[-2:])
    assert flooded["held"] == 1000, flooded
    assert meanwhile["reply"] == "reached\n", meanwhile
    answered = [rec for rec in egress(box, since) if rec["kind"] == "dns" and rec["name"] == "www.public.test"]
    gateway_part = ", ".join(f"{rec['duration'] * 1000:.1f} ms" for rec in answered)
    print(f"flood of 1000: DNS lookup {meanwhile['dns'] * 1000:.0f} ms (the gateway's part: {gateway_part}), "
          f"HTTPS request {meanwhile['https'] * 1000:.0f} ms, the host's processes at most {most} more than before")  # fmt: skip
    assert meanwhile["dns"] < 2 and meanwhile["https"] < 2, meanwhile
    assert most < 50  # the exec's own ssh and shell, not one per connection
    assert control.pid(box.dir.path) is not None and control.child_pid(box.dir.path) is not None


@pytest.mark.same_everywhere
def test_a_connection_cut_by_the_gateways_death_left_a_record(box: Sandbox) -> None:
    since = len(list(box.egress_log()))
    download = f"setsid curl -s -o /dev/null --limit-rate 2M http://{PUBLIC}/bytes/20000000 </dev/null >/dev/null 2>&1 &"
    assert box.exec(["sh", "-c", download]).returncode == 0
    deadline = time.monotonic() + 30
    opened: list[dict[str, Any]] = []
    while not opened and time.monotonic() < deadline:
        opened = [r for r in egress(box, since) if r["kind"] == "open" and r["dst"] == PUBLIC and r["port"] == 80]
        time.sleep(0.2)
    assert opened, "no record when the download's connection opened"
    child = control.child_pid(box.dir.path)
    assert child is not None
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while control.child_pid(box.dir.path) in (None, child) and time.monotonic() < deadline:
        time.sleep(0.1)
    conn = opened[0]["conn"]
    assert not [r for r in egress(box, since) if r["kind"] == "tcp" and r.get("conn") == conn]  # it never ended: the open record is all
    assert opened[0]["decision"] == "allow" and opened[0]["rule"] == f"allow allow_cidrs {PUBLIC}/32"
    assert [ln for ln in vv("egress", "log", box.name).stdout.splitlines() if " OPEN  tcp " in ln and f"{PUBLIC}:80 " in ln]
    box.exec(["sh", "-c", "pkill curl || true"])

"""A sandbox's own network namespace: where the guest's network ends, with no route anywhere.

A fenced guest's outbound NIC is a TAP device in a network namespace made for
that sandbox alone. Nothing is routed out of it (it has no other interface and
forwards nothing): its kernel takes every TCP connection and DNS query of the
guest, whatever address they were sent to, and hands them to the gateway's
listening sockets (nftables `redirect`); it caps the connections the guest may
hold open and open per second, and drops everything else. The gateway, in the
host's namespace, accepts those connections, reads each one's original
destination from the kernel (SO_ORIGINAL_DST: conntrack's, not anything the
guest wrote), decides, and connects out itself. No process is started per
connection, and nothing inside the guest can undo any of it.

A small holder process makes the namespace (`unshare --net`; with a user
namespace too when not root), the TAP device, its address, the rules and the
listening sockets, then hands their descriptors to whoever asks on its unix
socket (QEMU's launcher: the TAP; the gateway's serving process: the
listeners, again after every restart) until QEMU exits. It reads nothing from
the guest. Started by root itself, it drops to a uid of the sandbox's own once
QEMU runs (`--drop-to`; userns.holder_uid).

Run as `python -m vivarium.net netns --dir INSTANCE_DIR --qemu-pidfile FILE`
(inside the new namespace).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from vivarium import state
from vivarium.errors import VMError
from vivarium.run import find_program
from vivarium.share import userns

# The holder's socket and pid file, in a directory of the holder's own: dropped from root, it still removes them.
HOME = "netns"
SOCKET = f"{HOME}/holder.sock"
PIDFILE = f"{HOME}/holder.pid"
LOG = "netns.err"

# The guest's fenced NIC (found by its MAC in the guest) and the namespace's side of it. That side's MAC is
# fixed too, as slirp's gateway's is: a guest restored from a snapshot or a template remembers it in a fresh ARP
# entry (trusted for 15-45 s), and a new random one at each start had its packets dropped until the entry aged.
GUEST_MAC = "52:54:00:76:69:76"
HOST_MAC = "52:54:00:76:69:01"
HOST_SIDE = "10.0.3.1"
GUEST_SIDE = "10.0.3.15"
PREFIX = 24
TAP = "fence0"
# The guest's Docker and Kind networks (pinned in its daemon.json): their replies go back through the guest.
GUEST_CONTAINERS = "172.20.0.0/14"
TCP_PORT = 15001  # every TCP connection, redirected
DNS_PORT = 15053  # DNS over UDP and TCP, redirected
# Per sandbox, enforced by this namespace's kernel: connections open at once, and new ones per second.
MAX_CONNECTIONS = 4096
NEW_PER_SECOND = 1000
NEW_BURST = 2000

RULES = f"""
table ip fence {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{TAP}" meta l4proto {{ tcp, udp }} th dport 53 redirect to :{DNS_PORT}
        iifname "{TAP}" meta l4proto tcp redirect to :{TCP_PORT}
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
        iifname "{TAP}" meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept
        iifname "{TAP}" tcp dport {TCP_PORT} ct state new ct count over {MAX_CONNECTIONS} reject with tcp reset
        iifname "{TAP}" tcp dport {TCP_PORT} ct state new limit rate over {NEW_PER_SECOND}/second burst {NEW_BURST} packets drop
        iifname "{TAP}" tcp dport {TCP_PORT} accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
    }}
}}
"""

TUN = "/dev/net/tun"
TUN_HINT = f"`sudo chmod 0666 {TUN}` (the mode Debian's udev gives it; TAP devices still need a namespace of one's own)"
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


# ------------------------------------------------------------------ the host's side


def start(directory: Path, qemu_pidfile: Path) -> int:
    """Make the sandbox's namespace (stopping an old one); return the holder's pid once it answers."""
    stop(directory)
    sock = directory / SOCKET
    if len(str(sock)) > 100:
        raise VMError(f"the sandbox's directory {directory} is too long a path for a unix socket",
                      hint="set VIVARIUM_HOME or XDG_STATE_HOME to a shorter path")  # fmt: skip
    find_program("nft")
    if not tun_open():
        raise VMError(f"{TUN} is not open to you: a normal user's sandbox needs it for its network namespace's TAP device",
                      hint=TUN_HINT)  # fmt: skip
    root = os.geteuid() == 0
    ns = ["--net"] if root else ["--user", "--map-root-user", "--net"]
    # run by root itself, the holder drops to a uid of the sandbox's own once QEMU runs (a user's is theirs)
    holder = userns.holder_uid(str(directory)) if root else None
    drop = ["--drop-to", str(holder)] if holder is not None else []
    if holder is not None:
        userns.own_dir(directory / HOME, holder)
    else:
        (directory / HOME).mkdir(mode=0o700, exist_ok=True)
    log = (directory / LOG).open("ab")
    try:
        proc = subprocess.Popen(
            [find_program("unshare"), *ns, sys.executable, "-m", "vivarium.net", "netns",
             "--dir", str(directory), "--qemu-pidfile", str(qemu_pidfile), *drop],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()
    deadline = time.monotonic() + 20
    while pid(directory) != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            tail = (directory / LOG).read_text(errors="replace").strip().splitlines()[-1:]
            raise VMError(f"the sandbox's network namespace could not be made: {tail[0] if tail else 'no output'}",
                          hint=f"see {directory / LOG}")  # fmt: skip
        time.sleep(0.01)
    return proc.pid


def tun_open() -> bool:
    """Can this process open the TAP device's clone file (root always can; a normal user where udev's 0666 is)."""
    return os.geteuid() == 0 or os.access(TUN, os.R_OK | os.W_OK)


def pid(directory: Path) -> int | None:
    """The holder's pid, if it is running (the process its pid file names, by pid and start time)."""
    return state.read_pid(directory / PIDFILE)


def take(directory: Path, what: str) -> list[int]:
    """Descriptors from the holder: "tap" (QEMU's end of the guest's NIC) or "listen" (the
    gateway's sockets: TCP, DNS over TCP, DNS over UDP). The caller closes them."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        try:
            s.connect(str(directory / SOCKET))
            s.sendall(what.encode() + b"\n")
            _, fds, _, _ = socket.recv_fds(s, 16, 8)
        except OSError as e:
            raise VMError(f"the sandbox's network namespace is gone ({e.strerror or e})",
                          hint="restart the sandbox: `vivarium stop` then `vivarium up`") from None  # fmt: skip
    if not fds:
        raise VMError(f"the sandbox's network namespace gave no {what} descriptors", hint=f"see {directory / LOG}")
    return fds


def stop(directory: Path) -> None:
    value = pid(directory)
    if value is not None:
        os.kill(value, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while pid(directory) == value and time.monotonic() < deadline:
            time.sleep(0.01)
        if pid(directory) == value:
            os.kill(value, signal.SIGKILL)
    (directory / PIDFILE).unlink(missing_ok=True)
    (directory / SOCKET).unlink(missing_ok=True)


# ------------------------------------------------------------------ inside the namespace


def _tap() -> int:
    fd = os.open(TUN, os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", TAP.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


def _configure() -> None:
    # No IPv6 at all: the guest's v6 packets die here, and its connect() to a v6 address fails at once.
    for path in ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "/proc/sys/net/ipv6/conf/default/disable_ipv6"):
        with contextlib.suppress(OSError):
            Path(path).write_text("1\n")
    batch = (f"link set lo up\nlink set {TAP} address {HOST_MAC}\nlink set {TAP} up\naddr add {HOST_SIDE}/{PREFIX} dev {TAP}\n"
             f"route add {GUEST_CONTAINERS} via {GUEST_SIDE} dev {TAP}\n")  # fmt: skip
    subprocess.run([find_program("ip"), "-batch", "-"], input=batch, text=True, check=True, capture_output=True)
    r = subprocess.run([find_program("nft"), "-f", "-"], input=RULES, text=True, capture_output=True)
    if r.returncode != 0:
        raise SystemExit(f"nft refused the fence's rules: {r.stderr.strip().splitlines()[-1:] or r.returncode}")


def _listen() -> list[socket.socket]:
    tcp = socket.create_server((HOST_SIDE, TCP_PORT), backlog=4096)
    dns_tcp = socket.create_server((HOST_SIDE, DNS_PORT), backlog=512)
    dns_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns_udp.bind((HOST_SIDE, DNS_PORT))
    return [tcp, dns_tcp, dns_udp]


def hold(directory: Path, qemu_pidfile: Path, drop_to: int | None = None) -> int:
    """Hold the namespace's devices and listeners, handing them out on request, until QEMU is gone (or never
    came). `drop_to`: started by root, once QEMU runs, become this uid (and gid): from then on QEMU is watched by
    its pid and start time (/proc, anyone's to read), not by its pid file (root's), and nothing here is root's."""
    stopping = False

    def stop_(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop_)
    signal.signal(signal.SIGINT, stop_)
    tap = _tap()
    _configure()
    held = _listen()  # kept open for as long as the namespace lives: a restarted gateway takes them again
    listeners = [s.fileno() for s in held]
    path = directory / SOCKET
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(16)
    state.write_pid(directory / PIDFILE)
    # its own directory, reached through an open descriptor: dropped from root, it has no way through the
    # instance directory (root's, 0700) above
    home = os.open(directory / HOME, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    mine = Path(f"/proc/self/fd/{home}")
    qemu: tuple[int, int] | None = None  # QEMU's pid and start time, once it runs
    since = time.monotonic()
    try:
        while not stopping:
            with contextlib.suppress(InterruptedError):
                ready, _, _ = select.select([server], [], [], 0.2)
                if ready:
                    _answer(server, tap, listeners)
            if qemu is None:
                qemu = state.named_by(qemu_pidfile)
                if qemu is not None:
                    if drop_to is not None:
                        userns.drop_to(drop_to, drop_to)
                elif time.monotonic() - since > 600:  # QEMU never came (its launcher died before starting it)
                    break
            elif state.alive(qemu[0]) != qemu[1]:  # QEMU is gone (or exiting)
                break
    finally:
        if state.names_me(mine / Path(PIDFILE).name):
            (mine / Path(SOCKET).name).unlink(missing_ok=True)
            (mine / Path(PIDFILE).name).unlink(missing_ok=True)
    return 0


def _answer(server: socket.socket, tap: int, listeners: list[int]) -> None:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(2)
        try:
            what = conn.recv(16).strip()
            fds = [tap] if what == b"tap" else listeners if what == b"listen" else []
            conn.sendmsg([b"k"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vivarium-netns")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--qemu-pidfile", type=Path, required=True)
    ap.add_argument("--drop-to", type=int)
    args = ap.parse_args(argv)
    return hold(args.dir, args.qemu_pidfile, args.drop_to)

"""What the network fence costs, against the same image on plain QEMU user networking.

    sudo .venv/bin/python -m bench.fence        (root: the made-up network is a namespace)

Both VMs run at once from the same image; the "internet" is tests/fakenet.py's
public host 198.51.100.7 (opened with allow_cidrs for the fenced one).

(a) Download of 200 MB: throughput fenced / plain.             Goal >= 0.8.
(b) Latency of a new connection, median of 200 sequential ones, fenced - plain:
    connect until the server's first byte, and until its EOF (the server
    sends a line and closes).                                      Goal < 5 ms each.
(c) 500 connections at once: all served or cleanly refused, and the gateway's
    file descriptors back to their starting count afterwards.
(d) The same latency while 500 other connections are being opened.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import report
from tests.fakenet import PUBLIC, FakeNet
from vivarium import Sandbox
from vivarium import config as cfg
from vivarium.net import control
from vivarium.ports import free_port

SIZE = 200_000_000
CONNECTIONS = 200
CONCURRENT = 500

DOWNLOAD = ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", f"http://{PUBLIC}/bytes/{SIZE}"]

LATENCY = r"""
import json, socket, sys, time
def one():
    t = time.perf_counter()
    s = socket.create_connection(("198.51.100.7", 7777), timeout=30)
    s.recv(64)
    first = time.perf_counter() - t
    while s.recv(64):
        pass
    eof = time.perf_counter() - t
    s.close()
    return first, eof
if len(sys.argv) > 2:  # meanwhile, N others being opened at once (and held until they are answered)
    import asyncio, threading
    async def flood(n):
        async def other():
            try:
                r, w = await asyncio.open_connection("198.51.100.7", 7777)
                await r.read(64)
                w.close()
            except OSError:
                pass
        await asyncio.gather(*(other() for _ in range(n)))
    threading.Thread(target=asyncio.run, args=(flood(int(sys.argv[2])),), daemon=True).start()
    time.sleep(0.05)
print(json.dumps([one() for _ in range(int(sys.argv[1]))]))
"""
UNDER_LOAD = 20

CONCURRENCY = r"""
import asyncio, json, sys
async def one():
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("198.51.100.7", 7777), 60)
        data = await asyncio.wait_for(r.read(64), 60)
        w.close()
        return "served" if data.startswith(b"secret") else "refused"
    except (OSError, asyncio.TimeoutError) as e:
        return "refused" if isinstance(e, (ConnectionError, asyncio.IncompleteReadError)) or not isinstance(e, asyncio.TimeoutError) else "timeout"
async def main(n):
    results = await asyncio.gather(*(one() for _ in range(n)))
    print(json.dumps({k: results.count(k) for k in set(results)}))
asyncio.run(main(int(sys.argv[1])))
"""


def boot(name: str, d: Path, fence: bool, net: FakeNet) -> Sandbox:
    assert net.dns is not None
    d.mkdir(parents=True, exist_ok=True)
    (d / "vivarium.toml").write_text(
        f'[vm]\nmemory = "2G"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n'
        f'[[share]]\nhost = "."\nmode = "ro"\n'
        f'[network]\nallow_cidrs = ["{PUBLIC}/32"]\ndns_upstream = "{net.dns.address}"\n'
    )
    box = Sandbox(name, cfg.load(d / "vivarium.toml"), fence=fence)
    box.up()
    if not fence:  # plain user networking: without the guest's half of the fence either
        r = box.exec(["sudo", "sh", "-c", "systemctl stop vivarium-redirector 2>/dev/null; nft flush ruleset || true"], capture=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
    return box


def guest_json(box: Sandbox, script: str, *args: str) -> object:
    r = box.exec(["python3", "-c", script, *args], capture=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def throughput(box: Sandbox) -> float:
    r = box.exec(DOWNLOAD, capture=True, timeout=900)
    size, seconds = r.stdout.split()
    if int(size) != SIZE:
        raise RuntimeError(f"downloaded {size} bytes, not {SIZE}: {r.stderr}")
    return SIZE / float(seconds)


def latency(rows: list[tuple[str, str]], fenced: Sandbox, plain: Sandbox, what: str, *args: str) -> None:
    """Median time to first byte and to EOF, fenced and plain, and what the fence adds."""
    f: list[list[float]] = guest_json(fenced, LATENCY, *args)  # type: ignore[assignment]
    p: list[list[float]] = guest_json(plain, LATENCY, *args)  # type: ignore[assignment]
    for i, label in enumerate(("first byte", "EOF")):
        lf, lp = statistics.median(x[i] for x in f), statistics.median(x[i] for x in p)
        rows.append((f"new connection to {label}, {what}: fenced / plain", f"{lf * 1000:.2f} ms / {lp * 1000:.2f} ms"))
        rows.append(("  added (goal < 5 ms)", f"{(lf - lp) * 1000:.2f} ms  (ratio {lf / lp:.2f}x)"))


def fds(pid: int | None) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir())) if pid else -1


def main() -> int:
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="vivarium-bench-") as tmp, FakeNet() as net:
        work = Path(tmp)
        fenced = boot("bench-fenced", work / "fenced", True, net)
        plain = boot("bench-plain", work / "plain", False, net)
        try:
            # (a) alternate, two rounds each, best of each (the machine is noisy, the fence is not)
            rates: dict[str, list[float]] = {"fenced": [], "plain": []}
            for _ in range(2):
                rates["plain"].append(throughput(plain))
                rates["fenced"].append(throughput(fenced))
            f, p = max(rates["fenced"]), max(rates["plain"])
            rows.append(("download 200 MB, fenced", f"{f / 1e6:.1f} MB/s"))
            rows.append(("download 200 MB, plain user net", f"{p / 1e6:.1f} MB/s"))
            rows.append(("throughput ratio (goal >= 0.8)", f"{f / p:.2f}x"))

            # (b)
            latency(rows, fenced, plain, f"median of {CONNECTIONS}", str(CONNECTIONS))

            # (c)
            child = control.child_pid(fenced.dir.path)
            before = fds(child)
            started = time.monotonic()
            counts = guest_json(fenced, CONCURRENCY, str(CONCURRENT))
            took = time.monotonic() - started
            deadline = time.monotonic() + 30
            while fds(child) != before and time.monotonic() < deadline:
                time.sleep(0.2)
            rows.append((f"{CONCURRENT} at once through the fence", f"{counts} in {took:.1f}s"))
            rows.append(("gateway fds before / after", f"{before} / {fds(child)}"))
            plain_counts = guest_json(plain, CONCURRENCY, str(CONCURRENT))
            rows.append((f"{CONCURRENT} at once, plain", f"{plain_counts}"))

            # (d)
            latency(rows, fenced, plain, f"median of {UNDER_LOAD}, {CONCURRENT} others opening", str(UNDER_LOAD), str(CONCURRENT))
        finally:
            fenced.destroy()
            plain.destroy()
    report("network fence (fenced vs plain user networking, same run)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shared directory against the guest's own disk, in the same VM and run.

    sudo .venv/bin/python -m bench.share     (root: virtiofsd needs it)

(a) sequential write then read of 200 MB (dd, fsync on write, caches dropped before the read)
(b) 5,000 small files created, then read back
each on the share (virtiofs; 9p is not in Debian's cloud kernel) and on the
guest's disk, printed as share / disk time ratios (1.0 = as fast as the disk).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bench.common import report
from vivarium import Sandbox
from vivarium import config as cfg
from vivarium.ports import free_port

SCRIPT = r"""
import json, os, subprocess, sys, time
d = os.path.expanduser(sys.argv[1])
os.makedirs(d, exist_ok=True)
def drop():
    subprocess.run(["sudo", "sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
def t(fn):
    s = time.perf_counter(); fn(); return time.perf_counter() - s
big = os.path.join(d, "big")
w = t(lambda: subprocess.run(["dd", "if=/dev/zero", f"of={big}", "bs=1M", "count=200", "conv=fsync", "status=none"], check=True))
drop()
r = t(lambda: subprocess.run(["dd", f"if={big}", "of=/dev/null", "bs=1M", "status=none"], check=True))
os.unlink(big)
small = os.path.join(d, "small"); os.makedirs(small, exist_ok=True)
def create():
    for i in range(5000):
        with open(os.path.join(small, f"f{i}"), "w") as f:
            f.write("x" * 100)
    os.sync()
def read():
    for i in range(5000):
        with open(os.path.join(small, f"f{i}")) as f:
            f.read()
c = t(create)
drop()
rd = t(read)
subprocess.run(["rm", "-rf", small], check=True)
print(json.dumps({"write": w, "read": r, "create": c, "readsmall": rd}))
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vivarium-bench-share-") as tmp:
        d = Path(tmp)
        (d / "data").mkdir()
        (d / "vivarium.toml").write_text(
            f'[vm]\nmemory = "2G"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n'
            f'[[share]]\nhost = "data"\nmode = "rw"\n'
        )
        config = cfg.load(d / "vivarium.toml")
        os.chown(d / "data", config.uid, config.uid)  # the project belongs to the user the agent runs as
        box = Sandbox("bench-share", config)
        box.up()
        try:
            if not box.status().shares:
                print("no share could be served here (virtiofsd needs root)", file=sys.stderr)
                return 1
            results = {}
            for where, path in (("share (virtiofs)", str((d / "data").resolve())), ("guest disk", "~/bench-disk")):
                r = box.exec(["python3", "-c", SCRIPT, path], capture=True, timeout=1800)
                if r.returncode != 0:
                    raise RuntimeError(r.stderr)
                results[where] = json.loads(r.stdout.strip().splitlines()[-1])
        finally:
            box.destroy()
    share, disk = results["share (virtiofs)"], results["guest disk"]
    rows = []
    for key, what in (("write", "200 MB sequential write"), ("read", "200 MB sequential read"),
                      ("create", "5,000 small files created"), ("readsmall", "5,000 small files read")):  # fmt: skip
        rows.append((what, f"share {share[key]:.2f}s, disk {disk[key]:.2f}s, share/disk {share[key] / disk[key]:.2f}x"))
    report("shared directory vs the guest's own disk (same VM, same run)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

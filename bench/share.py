"""The shared directory against the guest's own disk, in the same VM and run; and the share server as
vivarium runs it (in a user namespace, share/userns.py) against the root virtiofsd of before (0e6701b),
and against other settings of it (cache mode, writeback), each a share of its own in the same VM.

    sudo .venv/bin/python -m bench.share     (root: to run the root virtiofsd of before as the baseline)

(a) sequential write then read of 200 MB (dd, fsync on write, caches dropped before the read)
(b) 5,000 small files created, then read back
each on every share (virtiofs; 9p is not in Debian's cloud kernel) and on the guest's disk, printed
as time ratios: against the disk (1.0 = as fast as the disk) and against the root server.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import report
from vivarium import Sandbox
from vivarium import config as cfg
from vivarium.ports import free_port
from vivarium.share import virtiofs

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


# share directory: (what it is, how its server's command line differs from vivarium's)
VARIANTS = {
    "root": ("root virtiofsd, no namespace (0e6701b)", "root"),
    "ns": ("vivarium: user namespace, cache=auto", ""),
    "always": ("user namespace, cache=always", "cache=always"),
    "writeback": ("user namespace, cache=auto, writeback", "writeback"),
}
# Not measured: a thread pool (--thread-pool-size). QEMU 7.2's virtiofsd dies of its own seccomp filter as soon as
# its pool starts a thread (sched_getaffinity, SIGSYS: seen here), and the guest's file operations hang.


def _variant_argv(original: Callable[..., list[str]], tags: dict[str, str]) -> Callable[..., list[str]]:
    def argv(binary: str, share: virtiofs.ShareSpec, fd: int, ids: Any) -> list[str]:
        out = original(binary, share, fd, ids)
        how = VARIANTS[tags[share.tag]][1]
        if how == "root":  # confine.py without a user namespace: the server as root, as before
            at = out.index("--uid-map")
            out[at : at + 4] = []
        elif how == "cache=always":
            out = [a.replace("cache=auto", "cache=always") for a in out]
        elif how == "writeback":
            out.insert(out.index("--fd=" + str(fd)) + 1, "--writeback" if not virtiofs.is_c_daemon(binary) else "-owriteback")
        return out

    return argv


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vivarium-bench-share-") as tmp:
        d = Path(tmp)
        shares = "".join(f'[[share]]\nhost = "{name}"\nmode = "rw"\n' for name in VARIANTS)
        (d / "vivarium.toml").write_text(
            f'[vm]\nmemory = "2G"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n{shares}'
        )
        d.chmod(0o711)  # the shares' owner (below) passes through, as into a home
        for name in VARIANTS:
            (d / name).mkdir()
        config = cfg.load(d / "vivarium.toml")
        for name in VARIANTS:
            os.chown(d / name, config.uid, config.uid)  # the project belongs to the user the agent runs as
        virtiofs.virtiofsd_argv = _variant_argv(virtiofs.virtiofsd_argv, {f"share{i}": name for i, name in enumerate(VARIANTS)})
        box = Sandbox("bench-share", config)
        box.up()
        try:
            if len(box.status().shares) != len(VARIANTS):
                print("the shares could not be served here (see `vivarium doctor`)", file=sys.stderr)
                return 1
            results = {}
            for where, path in [*((name, str((d / name).resolve())) for name in VARIANTS), ("disk", "~/bench-disk")]:
                r = box.exec(["python3", "-c", SCRIPT, path], capture=True, timeout=1800)
                if r.returncode != 0:
                    raise RuntimeError(r.stderr)
                results[where] = json.loads(r.stdout.strip().splitlines()[-1])
        finally:
            box.destroy()
    rows = []
    for key, what in (("write", "200 MB sequential write"), ("read", "200 MB sequential read"),
                      ("create", "5,000 small files created"), ("readsmall", "5,000 small files read")):  # fmt: skip
        disk, root = results["disk"][key], results["root"][key]
        rows.append((what, f"disk {disk:.2f}s"))
        for name, (label, _) in VARIANTS.items():
            t = results[name][key]
            rows.append((f"  {label}", f"{t:.2f}s, /disk {t / disk:.2f}x, /root server {t / root:.2f}x"))
    report("shared directories vs the guest's own disk and the root server of before (same VM, same run)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

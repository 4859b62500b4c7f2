"""The shared directory against the guest's own disk, in the same VM and run; and the share server as
vivarium runs it (in a user namespace, share/userns.py) against the root virtiofsd of before (0e6701b),
and against other settings of it (cache mode, writeback), each a share of its own in the same VM.

    sudo .venv/bin/python -m bench.share [--runs N] [--only NAME,...] [--files N]    (root: to run the root virtiofsd of before as the baseline)

(a) sequential write then read of 200 MB (dd, fsync on write, caches dropped before the read)
(b) 5,000 small files (--files N) created, then read back
each on every share (virtiofs; 9p is not in Debian's cloud kernel) and on the guest's disk, printed
as time ratios: against the disk (1.0 = as fast as the disk) and against the root server, each taken within
a round (this machine's speed drifts) and the median of the rounds' shown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
files = int(sys.argv[2])
if not files:
    print(json.dumps({"write": w, "read": r}))
    sys.exit()
small = os.path.join(d, "small"); os.makedirs(small, exist_ok=True)
def create():
    for i in range(files):
        with open(os.path.join(small, f"f{i}"), "w") as f:
            f.write("x" * 100)
    os.sync()
def read():
    for i in range(files):
        with open(os.path.join(small, f"f{i}")) as f:
            f.read()
c = t(create)
drop()
rd = t(read)
subprocess.run(["rm", "-rf", small], check=True)
print(json.dumps({"write": w, "read": r, "create": c, "readsmall": rd}))
"""


# share directory: (what it is, how its server's command line differs from vivarium's, the share's mode)
VARIANTS = {
    "root": ("root virtiofsd, no namespace (0e6701b)", "root", "rw"),
    "ns": ("vivarium: user namespace, cache=auto", "", "rw"),
    "always": ("user namespace, cache=always", "cache=always", "rw"),
    "writeback": ("user namespace, cache=auto, writeback", "writeback", "rw"),
    "review": ("vivarium, mode=review (the guest's writes on its disk)", "", "review"),
}
# The Rust daemon's (Debian 13) own settings. The C one (Debian 12) cannot run a thread pool: QEMU 7.2's
# virtiofsd dies of its own seccomp filter as soon as its pool starts a thread (sched_getaffinity, SIGSYS:
# seen here), and the guest's file operations hang.
RUST_VARIANTS = {
    "pool": ("user namespace, cache=auto, --thread-pool-size=4", "pool", "rw"),
    "metadata": ("user namespace, cache=metadata", "cache=metadata", "rw"),
}


def _variant_argv(original: Callable[..., list[str]], tags: dict[str, str], variants: dict[str, tuple[str, str, str]]) -> Callable[..., list[str]]:
    def argv(binary: str, share: virtiofs.ShareSpec, fd: int, ids: Any) -> list[str]:
        out = original(binary, share, fd, ids)
        how = variants[tags[share.tag]][1]
        if how == "root":  # confine.py without a user namespace: the server as root, as before
            at = out.index("--uid-map")
            out[at : at + 4] = []
        elif how.startswith("cache="):
            out = [a.replace("cache=auto", how) for a in out]
        elif how == "writeback":
            out.insert(out.index("--fd=" + str(fd)) + 1, "--writeback" if not virtiofs.is_c_daemon(binary) else "-owriteback")
        elif how == "pool":
            out.insert(out.index("--fd=" + str(fd)) + 1, "--thread-pool-size=4")
        return out

    return argv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="rounds over every place (the median is shown); default 1")
    parser.add_argument("--only", metavar="NAME,...", help="these settings only (the root server is always measured): "
                        + ", ".join([*VARIANTS, *RUST_VARIANTS]))  # fmt: skip
    parser.add_argument("--files", type=int, default=5000, help="small files created and read; 0: the sequential rows only")
    args = parser.parse_args()
    runs = args.runs
    if runs < 1:
        parser.error("--runs: at least 1")
    if args.files < 0:
        parser.error("--files: 0 or more")
    c_daemon = virtiofs.is_c_daemon(virtiofs.find_virtiofsd())
    variants = dict(VARIANTS)
    if not c_daemon:
        variants.update(RUST_VARIANTS)
    if args.only:
        wanted = {"root", *args.only.split(",")}
        if unknown := wanted - set(variants):
            parser.error(f"no such setting here: {', '.join(sorted(unknown))}")
        variants = {name: v for name, v in variants.items() if name in wanted}
    with tempfile.TemporaryDirectory(prefix="vivarium-bench-share-") as tmp:
        d = Path(tmp)
        shares = "".join(f'[[share]]\nhost = "{name}"\nmode = "{v[2]}"\n' for name, v in variants.items())
        (d / "vivarium.toml").write_text(
            f'[vm]\nmemory = "2G"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n{shares}'
        )
        d.chmod(0o711)  # the shares' owner (below) passes through, as into a home
        for name in variants:
            (d / name).mkdir()
        config = cfg.load(d / "vivarium.toml")
        for name in variants:
            os.chown(d / name, config.uid, config.uid)  # the project belongs to the user the agent runs as
        tags = {f"share{i}": name for i, name in enumerate(variants)}
        virtiofs.virtiofsd_argv = _variant_argv(virtiofs.virtiofsd_argv, tags, variants)
        box = Sandbox("bench-share", config)
        box.up()
        try:
            if len(box.status().shares) != len(variants):
                print("the shares could not be served here (see `vivarium doctor`)", file=sys.stderr)
                return 1
            places = [*((name, str((d / name).resolve())) for name in variants), ("disk", "~/bench-disk")]
            results: dict[str, list[dict[str, float]]] = {where: [] for where, _ in places}
            for round_ in range(runs):  # round by round, each round's order turned by one: drift reaches all alike
                turn = round_ % len(places)
                for where, path in places[turn:] + places[:turn]:
                    print(f"round {round_ + 1}/{runs}: {where}", file=sys.stderr, flush=True)
                    r = box.exec(["python3", "-c", SCRIPT, path, str(args.files)], capture=True, timeout=1800)
                    if r.returncode != 0:
                        raise RuntimeError(r.stderr)
                    results[where].append(json.loads(r.stdout.strip().splitlines()[-1]))
        finally:
            box.destroy()
    median = {where: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for where, rs in results.items()}

    def spread(where: str, key: str) -> str:  # each run's time, where there were several
        times = sorted(r[key] for r in results[where])
        return f" ({'-'.join(f'{t:.1f}' for t in times)})" if len(times) > 1 else ""

    def ratio(where: str, base: str, key: str) -> float:  # a ratio to a baseline of the same round: the median of them
        return statistics.median(a[key] / b[key] for a, b in zip(results[where], results[base], strict=True))

    rows = []
    keys = [("write", "200 MB sequential write"), ("read", "200 MB sequential read")]
    if args.files:
        keys += [("create", f"{args.files:,} small files created"), ("readsmall", f"{args.files:,} small files read")]
    for key, what in keys:
        rows.append((what, f"disk {median['disk'][key]:.2f}s{spread('disk', key)}"))
        for name, (label, _, _) in variants.items():
            t = median[name][key]
            against = f"/disk {ratio(name, 'disk', key):.2f}x, /root server {ratio(name, 'root', key):.2f}x"
            rows.append((f"  {label}", f"{t:.2f}s{spread(name, key)}, {against}"))
    daemon = "the C virtiofsd" if c_daemon else "the Rust virtiofsd"
    report(f"shared directories ({daemon}) vs the guest's own disk and the root server of before (same VM, median of {runs})", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

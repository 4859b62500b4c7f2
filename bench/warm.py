"""Warm start: a new sandbox restored from the ready template against one booted cold, same run.

    .venv/bin/python -m bench.warm

(a) `up` of a new sandbox (cached image) to SSH-ready: from the template vs
    `--cold`, alternating, median of ROUNDS.   Goal <= 0.25x.
(b) the same warm `up` with one shared directory (plugged in after the restore).
(c) the template's save time, and what it keeps against guest RAM.
(d) `snapshot save` of a sandbox of the default shape (16G, clamped to the host), warm-started:
    its time and its size on disk (compare hosts: run it on Debian 12 and, via scripts/debian13, 13).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import report, timed
from vivarium import Sandbox, values
from vivarium import config as cfg
from vivarium.ports import free_port
from vivarium.template import templates_dir
from vivarium.vm import caps

MEMORY = "1G"
ROUNDS = 3


def write_config(d: Path, share: bool = False) -> cfg.Config:
    d.mkdir(exist_ok=True)
    shares = '[[share]]\nhost = "."\n' if share else "share = []\n"
    (d / "vivarium.toml").write_text(
        f'{shares}[vm]\nmemory = "{MEMORY}"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n'
    )
    return cfg.load(d / "vivarium.toml")


def up_time(name: str, config: cfg.Config, cold: bool) -> float:
    box = Sandbox(name, config)
    try:
        took = timed(lambda: box.up(cold=cold))
        assert box.exec(["true"]).returncode == 0
        return took
    finally:
        box.destroy()


def default_snapshot(d: Path) -> tuple[float, int, int]:
    """(seconds, bytes on disk, guest RAM) of one snapshot of a default-shape sandbox."""
    d.mkdir(exist_ok=True)
    (d / "vivarium.toml").write_text(f"share = []\n[[forward]]\nhost = {free_port()}\nguest = 22\n")
    config = cfg.load(d / "vivarium.toml")
    box = Sandbox("bench-snapshot", config)
    try:
        box.up()  # from the default shape's template (made first if missing: not timed)
        info = box.snapshot_save("s")
        on_disk = sum(p.stat().st_blocks * 512 for p in (box.dir.path / "snapshots" / "s").iterdir())
        return float(info["seconds"]), on_disk, config.vm.memory
    finally:
        box.destroy()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vivarium-bench-warm-") as tmp:
        d = Path(tmp)
        config = write_config(d / "plain")
        shared = write_config(d / "shared", share=True)
        prime = Sandbox("bench-warm-prime", config)  # makes the template if there is none (not timed)
        prime.up()
        tpl = prime.record().instance.template
        assert tpl is not None, "a fenced sandbox of the default shape starts from a template"
        prime.destroy()
        colds: list[float] = []
        warms: list[float] = []
        shares: list[float] = []
        for i in range(ROUNDS):
            colds.append(up_time(f"bench-cold{i}", config, True))
            warms.append(up_time(f"bench-warm{i}", config, False))
            shares.append(up_time(f"bench-share{i}", shared, False))
        t = templates_dir() / tpl
        meta = json.loads((t / "meta.json").read_text())
        ram_on_disk = (t / "ram").stat().st_blocks * 512
        state = (t / "state").stat().st_size
        snap_s, snap_bytes, snap_ram = default_snapshot(d / "default")
    cold, warm, share = statistics.median(colds), statistics.median(warms), statistics.median(shares)
    ram = values.parse_size(MEMORY, "memory")
    host = f"Debian {Path('/etc/debian_version').read_text().strip()}, QEMU {caps.ask().version}"
    report(f"warm start (median of {ROUNDS}, {MEMORY} guest, same run; {host})", [
        ("cold up to SSH-ready", f"{cold:.2f}s  ({', '.join(f'{x:.2f}' for x in colds)})"),
        ("up from the template to SSH-ready", f"{warm:.2f}s  ({', '.join(f'{x:.2f}' for x in warms)})"),
        ("warm / cold (goal <= 0.25x)", f"{warm / cold:.2f}x"),
        ("the same with one share plugged in", f"{share:.2f}s  ({', '.join(f'{x:.2f}' for x in shares)})  = {share / cold:.2f}x"),
        ("template save (device state + RAM + disks)", f"{meta['seconds']:.2f}s"),
        ("template RAM kept / guest RAM", f"{ram_on_disk / 2**20:.0f} MiB / {ram >> 20} MiB = {ram_on_disk / ram:.2f}"),
        ("template device state", f"{state / 2**10:.0f} KiB"),
        (f"snapshot save, default shape ({snap_ram >> 30}G guest)", f"{snap_s:.2f}s, {snap_bytes / 2**20:.0f} MiB on disk"),
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

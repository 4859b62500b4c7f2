"""Warm start: restoring a saved sandbox against booting it, in the same run.

    .venv/bin/python -m bench.warm

(a) cold `up` of a new sandbox (cached image) to SSH-ready, against
    `snapshot restore` of the same sandbox to SSH-ready.   Goal <= 0.25x.
(b) save time, and the snapshot's size against the guest's RAM.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import report, timed
from vivarium import Sandbox
from vivarium import config as cfg
from vivarium.sandbox import free_port

MEMORY = "1G"
ROUNDS = 3


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vivarium-bench-warm-") as tmp:
        d = Path(tmp)
        (d / "vivarium.toml").write_text(
            f'share = []\n[vm]\nmemory = "{MEMORY}"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n'
        )
        config = cfg.load(d / "vivarium.toml")
        colds, warms, saves, sizes = [], [], [], []
        for i in range(ROUNDS):
            box = Sandbox(f"bench-warm{i}", config)
            try:
                colds.append(timed(box.up))
                saves.append(timed(lambda b=box: b.snapshot_save("ready")))  # type: ignore[misc]
                sizes.append(sum(f.stat().st_size for f in (box.dir.path / "snapshots" / "ready").iterdir()))
                box.stop(timeout=0)
                warms.append(timed(lambda b=box: b.snapshot_restore("ready")))  # type: ignore[misc]
                assert box.exec(["true"]).returncode == 0
            finally:
                box.destroy()
    cold, warm = statistics.median(colds), statistics.median(warms)
    ram = cfg.parse_size(MEMORY, "memory")
    report(f"warm start (median of {ROUNDS}, {MEMORY} guest, same run)", [
        ("cold up to SSH-ready", f"{cold:.2f}s  ({', '.join(f'{x:.1f}' for x in colds)})"),
        ("snapshot restore to SSH-ready", f"{warm:.2f}s  ({', '.join(f'{x:.1f}' for x in warms)})"),
        ("warm / cold (goal <= 0.25x)", f"{warm / cold:.2f}x"),
        ("save", f"{statistics.median(saves):.2f}s"),
        ("snapshot size / guest RAM", f"{statistics.median(sizes) / 2**20:.0f} MiB / {ram >> 20} MiB = {statistics.median(sizes) / ram:.2f}"),
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

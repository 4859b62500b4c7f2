"""Warm start: a new sandbox restored from the ready template against one booted cold, same run.

    .venv/bin/python -m bench.warm

(a) `up` of a new sandbox (cached image) to SSH-ready: from the template vs
    `--cold`, alternating, median of ROUNDS.   Goal <= 0.25x.
(b) the template's save time, and its memory file's size against guest RAM.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import report, timed
from vivarium import Sandbox
from vivarium import config as cfg
from vivarium.sandbox import free_port
from vivarium.template import templates_dir

MEMORY = "1G"
ROUNDS = 3


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vivarium-bench-warm-") as tmp:
        d = Path(tmp)
        (d / "vivarium.toml").write_text(
            f'share = []\n[vm]\nmemory = "{MEMORY}"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n'
        )
        config = cfg.load(d / "vivarium.toml")
        prime = Sandbox("bench-warm-prime", config)  # makes the template if there is none (not timed)
        prime.up()
        tpl = prime.meta()["template"]
        prime.destroy()
        colds: list[float] = []
        warms: list[float] = []
        for i in range(ROUNDS):
            for kind, times in (("cold", colds), ("warm", warms)):
                box = Sandbox(f"bench-{kind}{i}", config)
                try:
                    times.append(timed(lambda b=box, c=kind == "cold": b.up(cold=c)))  # type: ignore[misc]
                    assert box.exec(["true"]).returncode == 0
                finally:
                    box.destroy()
        meta = json.loads((templates_dir() / tpl / "meta.json").read_text())
        size = (templates_dir() / tpl / "memory").stat().st_size
    cold, warm = statistics.median(colds), statistics.median(warms)
    ram = cfg.parse_size(MEMORY, "memory")
    report(f"warm start (median of {ROUNDS}, {MEMORY} guest, same run)", [
        ("cold up to SSH-ready", f"{cold:.2f}s  ({', '.join(f'{x:.1f}' for x in colds)})"),
        ("up from the template to SSH-ready", f"{warm:.2f}s  ({', '.join(f'{x:.1f}' for x in warms)})"),
        ("warm / cold (goal <= 0.25x)", f"{warm / cold:.2f}x"),
        ("template save", f"{meta['seconds']:.2f}s"),
        ("saved memory / guest RAM", f"{size / 2**20:.0f} MiB / {ram >> 20} MiB = {size / ram:.2f}"),
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

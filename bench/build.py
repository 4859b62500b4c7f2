"""Cold `vivarium build` vs plain mmdebstrap of the same package list, same run.

    .venv/bin/python -m bench.build

Both start from nothing (mmdebstrap downloads every package each time). The
vivarium side builds with no agents so that the package work is the same; its
extra work is the customisation, ext4 and the qcow2 base. Goal: ratio <= 1.15.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.common import env, report, timed
from vivarium import config as cfg
from vivarium.image.build import build_image
from vivarium.image.recipe import Recipe


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vivarium-bench-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        conf = cfg.load(None, {"image.agents": []}, cwd=root)
        recipe = Recipe.from_config(conf)
        baseline_argv = [
            "mmdebstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}",
            recipe.suite, str(root / "baseline.tar"), recipe.mirror,
        ]  # fmt: skip
        base = timed(lambda: subprocess.run(baseline_argv, check=True, capture_output=True))
        (root / "baseline.tar").unlink()
        with env(VIVARIUM_HOME=str(root / "home")):
            ours = timed(lambda: build_image(recipe, force=True))
            manifest = next((root / "home/cache/images").glob("*/manifest.json")).read_text()
        shutil.rmtree(root / "home")
    report(
        "cold build",
        [
            ("plain mmdebstrap (tar)", f"{base:.1f} s"),
            ("vivarium build (qcow2 + kernel + initrd)", f"{ours:.1f} s"),
            ("ratio", f"{ours / base:.2f}x  (goal <= 1.15x)"),
        ],
    )
    print(f"  manifest: {len(manifest)} bytes")


if __name__ == "__main__":
    main()

"""Template keys and pruning (no VM; the warm start itself is in tests/integration/test_template.py)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vivarium import config as cfg
from vivarium import template
from vivarium.vm import caps

from . import records

Q72 = caps.Qemu("7.2.22", "pc-q35-7.2")


class FakeImage:
    def __init__(self, build_id: str) -> None:
        self.build_id = build_id


def test_the_key_is_the_shape(tmp_path: Path) -> None:
    c = cfg.load(None)
    img: Any = FakeImage("b1")
    k = template.key_of(img, c, "tcg", Q72)
    assert k == template.key_of(img, c, "tcg", Q72)
    assert k != template.key_of(img, c, "kvm", Q72)
    assert k != template.key_of(FakeImage("b2"), c, "tcg", Q72)  # type: ignore[arg-type]
    assert k != template.key_of(img, replace(c, vm=replace(c.vm, memory=c.vm.memory // 2)), "tcg", Q72)
    # its agent user is made in it: another name, or the same name with another uid (a user whose uid changed), is another template
    assert k != template.key_of(img, replace(c, vm=replace(c.vm, user="someone")), "tcg", Q72)
    assert k != template.key_of(img, replace(c, uid=c.uid + 1), "tcg", Q72)
    # what a clone gets after the restore does not change the shape
    assert k == template.key_of(img, replace(c, share=(), forward=()), "tcg", Q72)
    # a state saved by one QEMU (or machine type) never loads into another: an upgraded host makes a new template
    assert k != template.key_of(img, c, "tcg", caps.Qemu("10.0.3", "pc-q35-10.0"))
    assert k != template.key_of(img, c, "tcg", caps.Qemu("7.2.22", "pc-q35-7.1"))


def test_prune_keeps_only_templates_whose_image_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIVARIUM_HOME", str(tmp_path))
    images = tmp_path / "cache" / "images"
    (images / "k1").mkdir(parents=True)
    (images / "k1" / "manifest.json").write_text(json.dumps({"build_id": "live"}))
    for key, build_id, version in (("t-live", "live", template.TEMPLATE_VERSION), ("t-gone", "gone", template.TEMPLATE_VERSION),
                                   ("t-old", "live", template.TEMPLATE_VERSION - 1)):  # fmt: skip
        d = template.templates_dir() / key
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"build_id": build_id, "version": version}))
    inst = tmp_path / "state" / "instances" / "copy"  # a sandbox still on an old template keeps it
    inst.mkdir(parents=True)
    (inst / "instance.json").write_text(records.made("copy", template="t-old").to_json())
    assert template.prune() == ["t-gone"]
    (inst / "instance.json").unlink()
    assert template.prune() == ["t-old"]
    assert [p.name for p in template.templates_dir().iterdir()] == ["t-live"]


def test_a_template_moves_into_the_cache_across_filesystems_and_stays_sparse(tmp_path: Path) -> None:
    """State on tmpfs, the cache on disk (as in a chroot with /tmp on tmpfs): a rename cannot do it."""
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        src = shm / "template"
        src.mkdir()
        with open(src / "ram", "wb") as f:  # 64 MiB of which one page is data
            f.truncate(64 << 20)
            f.seek(32 << 20)
            f.write(b"x" * 4096)
        (src / "meta.json").write_text("{}")
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev
        template.move_tree(src, tmp_path / "moved")
        assert not src.exists()
        ram = tmp_path / "moved" / "ram"
        assert ram.stat().st_size == 64 << 20 and ram.stat().st_blocks * 512 < 1 << 20
        assert (tmp_path / "moved" / "meta.json").read_text() == "{}"
    finally:
        shutil.rmtree(shm, ignore_errors=True)

"""Template keys and pruning (no VM; the warm start itself is in tests/integration/test_template.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vivarium import config as cfg
from vivarium import template

from . import records


class FakeImage:
    def __init__(self, build_id: str) -> None:
        self.build_id = build_id


def test_the_key_is_the_shape(tmp_path: Path) -> None:
    c = cfg.load(None)
    img: Any = FakeImage("b1")
    k = template.key_of(img, c, "tcg")
    assert k == template.key_of(img, c, "tcg")
    assert k != template.key_of(img, c, "kvm")
    assert k != template.key_of(FakeImage("b2"), c, "tcg")  # type: ignore[arg-type]
    assert k != template.key_of(img, replace(c, vm=replace(c.vm, memory=c.vm.memory // 2)), "tcg")
    # what a clone gets after the restore does not change the shape
    assert k == template.key_of(img, replace(c, share=(), forward=()), "tcg")


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

"""Review mode's host side: classifying the guest's overlay layer and applying it (no VM)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from vivarium.share import review


def entry(path: str, kind: str, data: bytes = b"", **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"path": path, "type": kind, "mode": 0o644, **kw}
    if kind == "file":
        e.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    return e


def host_tree(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    (root / "src/main.py").write_text("print('hi')\n")
    (root / "README").write_text("read me\n")
    (root / "old").mkdir()
    (root / "old/a.txt").write_text("a\n")
    (root / "same.txt").write_text("same\n")


def test_changes_classifies_the_upper_layer(tmp_path: Path) -> None:
    host_tree(tmp_path)
    upper = {"src/main.py": b"print('bye')\n", "new.txt": b"new\n", "same.txt": b"same\n"}
    entries = [
        entry("src", "dir"), entry("src/main.py", "file", upper["src/main.py"]),
        entry("new.txt", "file", upper["new.txt"]), entry("same.txt", "file", upper["same.txt"]),  # copied up, unchanged
        entry("README", "whiteout"), entry("old", "whiteout"), entry("gone-anyway", "whiteout"),
        entry("link", "symlink", target="src/main.py"),
    ]  # fmt: skip
    found = [(c.kind, c.path, c.what) for c in review.changes(tmp_path, entries)]
    assert found == [
        ("deleted", "README", "file"), ("added", "link", "symlink"), ("added", "new.txt", "file"),
        ("deleted", "old", "dir"), ("deleted", "old/a.txt", "file"), ("modified", "src/main.py", "file"),
    ]  # fmt: skip


def test_an_opaque_directory_deletes_what_it_hides(tmp_path: Path) -> None:
    host_tree(tmp_path)
    entries = [entry("old", "dir", opaque=True), entry("old/b.txt", "file", b"b\n")]
    found = [(c.kind, c.path) for c in review.changes(tmp_path, entries)]
    assert found == [("deleted", "old/a.txt"), ("added", "old/b.txt")]


def test_apply_brings_changes_home_and_then_they_are_gone_from_diff(tmp_path: Path) -> None:
    host_tree(tmp_path)
    snap = review.snapshot(tmp_path)
    upper = {"src/main.py": b"print('bye')\n", "new/deep.txt": b"deep\n"}
    entries = [entry("src/main.py", "file", upper["src/main.py"]), entry("new", "dir"), entry("new/deep.txt", "file", upper["new/deep.txt"]),
               entry("old", "whiteout")]  # fmt: skip
    found = review.changes(tmp_path, entries)
    result = review.apply(tmp_path, found, entries, snap, lambda rel: upper[rel], None)
    assert sorted(result.applied) == ["new", "new/deep.txt", "old", "old/a.txt", "src/main.py"] and result.conflicts == []
    assert (tmp_path / "src/main.py").read_bytes() == upper["src/main.py"]
    assert (tmp_path / "new/deep.txt").read_text() == "deep\n"
    assert not (tmp_path / "old").exists()
    assert review.changes(tmp_path, entries) == []


def test_apply_never_overwrites_what_the_host_changed_meanwhile(tmp_path: Path) -> None:
    host_tree(tmp_path)
    snap = review.snapshot(tmp_path)
    time.sleep(0.01)
    (tmp_path / "src/main.py").write_text("the host's own edit\n")
    (tmp_path / "new.txt").write_text("the host made this too\n")
    upper = {"src/main.py": b"guest\n", "new.txt": b"guest new\n", "README": b"guest readme\n"}
    entries = [entry(k, "file", v) for k, v in upper.items()]
    result = review.apply(tmp_path, review.changes(tmp_path, entries), entries, snap, lambda rel: upper[rel], None)
    assert sorted(result.conflicts) == ["new.txt", "src/main.py"] and result.applied == ["README"]
    assert (tmp_path / "src/main.py").read_text() == "the host's own edit\n"
    assert (tmp_path / "new.txt").read_text() == "the host made this too\n"
    # the guest's versions are still there to see
    assert {c.path for c in review.changes(tmp_path, entries)} == {"new.txt", "src/main.py"}


def test_unified_diff(tmp_path: Path) -> None:
    text = review.unified("a.txt", b"one\ntwo\n", b"one\nthree\n")
    assert "--- a/a.txt" in text and "-two" in text and "+three" in text
    assert review.unified("new.txt", None, b"x\n").startswith("--- /dev/null")
    assert review.unified("bin", b"\0\1", b"\0\2") == "Binary files a/bin and b/bin differ\n"
    assert os.path.exists(tmp_path)

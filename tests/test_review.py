"""Review mode's host side: classifying the guest's overlay layer and applying it (no VM)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from vivarium.share import review, writeback


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
    found = [(c.kind, c.path, c.what) for c in review.changes(tmp_path, entries).changes]
    assert found == [
        ("deleted", "README", "file"), ("added", "link", "symlink"), ("added", "new.txt", "file"),
        ("deleted", "old", "dir"), ("deleted", "old/a.txt", "file"), ("modified", "src/main.py", "file"),
    ]  # fmt: skip


def test_an_opaque_directory_deletes_what_it_hides(tmp_path: Path) -> None:
    host_tree(tmp_path)
    entries = [entry("old", "dir", opaque=True), entry("old/b.txt", "file", b"b\n")]
    found = [(c.kind, c.path) for c in review.changes(tmp_path, entries).changes]
    assert found == [("deleted", "old/a.txt"), ("added", "old/b.txt")]


def test_apply_brings_changes_home_and_then_they_are_gone_from_diff(tmp_path: Path) -> None:
    host_tree(tmp_path)
    snap = writeback.snapshot(tmp_path)
    upper = {"src/main.py": b"print('bye')\n", "new/deep.txt": b"deep\n"}
    entries = [entry("src/main.py", "file", upper["src/main.py"]), entry("new", "dir"), entry("new/deep.txt", "file", upper["new/deep.txt"]),
               entry("old", "whiteout")]  # fmt: skip
    found = review.changes(tmp_path, entries).changes
    result = writeback.apply(tmp_path, found, snap, upper, None)
    assert sorted(result.applied) == ["new", "new/deep.txt", "old", "old/a.txt", "src/main.py"] and result.conflicts == []
    assert (tmp_path / "src/main.py").read_bytes() == upper["src/main.py"]
    assert (tmp_path / "new/deep.txt").read_text() == "deep\n"
    assert not (tmp_path / "old").exists()
    assert review.changes(tmp_path, entries).changes == []


def test_apply_never_overwrites_what_the_host_changed_meanwhile(tmp_path: Path) -> None:
    host_tree(tmp_path)
    snap = writeback.snapshot(tmp_path)
    time.sleep(0.01)
    (tmp_path / "src/main.py").write_text("the host's own edit\n")
    (tmp_path / "new.txt").write_text("the host made this too\n")
    upper = {"src/main.py": b"guest\n", "new.txt": b"guest new\n", "README": b"guest readme\n"}
    entries = [entry(k, "file", v) for k, v in upper.items()]
    result = writeback.apply(tmp_path, review.changes(tmp_path, entries).changes, snap, upper, None)
    assert sorted(result.conflicts) == ["new.txt", "src/main.py"] and result.applied == ["README"]
    assert (tmp_path / "src/main.py").read_text() == "the host's own edit\n"
    assert (tmp_path / "new.txt").read_text() == "the host made this too\n"
    # the guest's versions are still there to see
    assert {c.path for c in review.changes(tmp_path, entries).changes} == {"new.txt", "src/main.py"}


def test_unified_diff(tmp_path: Path) -> None:
    text = review.unified("a.txt", b"one\ntwo\n", b"one\nthree\n")
    assert "--- a/a.txt" in text and "-two" in text and "+three" in text
    assert review.unified("new.txt", None, b"x\n").startswith("--- /dev/null")
    assert review.unified("bin", b"\0\1", b"\0\2") == "Binary files a/bin and b/bin differ\n"
    assert os.path.exists(tmp_path)


# ------------------------------------------------------------ what a lying guest can say


def test_unsafe_paths_are_skipped_with_the_reason(tmp_path: Path) -> None:
    host_tree(tmp_path)
    entries = [entry(p, "file", b"x") for p in ("../x", "/etc/passwd", "src/../../x", "a//b", "./a", "", "bad\udcff", "n\0ul")]
    entries += [entry("pipe", "fifo"), entry("dev", "block device"), {"path": "nosha", "type": "file", "mode": 0o644}]
    found = review.changes(tmp_path, entries)
    assert found.changes == []
    whys = {s["path"]: s["why"] for s in found.skipped}
    assert whys["../x"] == whys["src/../../x"] == whys["a//b"] == whys["./a"] == "'..', '.' or an empty component"
    assert whys["/etc/passwd"] == "an absolute path" and whys["bad\udcff"] == "not UTF-8" and whys["pipe"] == "fifo"
    assert whys["dev"] == "block device" and whys["nosha"] == "no sha256" and whys[""] == "not a path"
    assert review.changes(tmp_path, {"not": "a list"}).changes == []
    assert review.changes(tmp_path, ["junk"]).skipped == [{"path": "", "why": "not an entry"}]


def test_apply_never_writes_through_a_symlink_on_the_host(tmp_path: Path) -> None:
    share, victim = tmp_path / "share", tmp_path / "victim"
    share.mkdir()
    victim.mkdir()
    (share / "hostlink").symlink_to("../victim")
    (share / "abs").symlink_to(victim)
    snap = writeback.snapshot(share)
    data = {"hostlink/f": b"x\n", "abs/g": b"y\n", "plain/h": b"z\n"}
    # the guest says hostlink/f and abs/g are files, but not that it replaced the symlinks with directories
    chosen = [review.Change(p, "added", "file", hashlib.sha256(d).hexdigest(), 0o644) for p, d in data.items()]
    chosen.append(review.Change("plain", "added", "dir", mode=0o755))
    result = writeback.apply(share, chosen, snap, data, None)
    assert list(victim.iterdir()) == []
    assert sorted(p for p, _ in result.refused) == ["abs/g", "hostlink/f"] and sorted(result.applied) == ["plain", "plain/h"]
    # when it does say so, the symlink itself is replaced by a directory: nothing lands beyond it
    chosen = [review.Change("hostlink", "modified", "dir", mode=0o755), review.Change("hostlink/f", "added", "file",
              hashlib.sha256(b"x\n").hexdigest(), 0o644)]  # fmt: skip
    result = writeback.apply(share, chosen, snap, data, None)
    assert list(victim.iterdir()) == [] and (share / "hostlink").is_dir() and not (share / "hostlink").is_symlink()
    assert (share / "hostlink" / "f").read_text() == "x\n"


def test_apply_keeps_only_permission_bits(tmp_path: Path) -> None:
    snap = writeback.snapshot(tmp_path)
    chosen = [review.Change("suid", "added", "file", hashlib.sha256(b"s").hexdigest(), 0o6755), review.Change("sticky", "added", "dir", mode=0o1777)]
    writeback.apply(tmp_path, chosen, snap, {"suid": b"s"}, None)
    assert (tmp_path / "suid").stat().st_mode & 0o7777 == 0o755 and (tmp_path / "sticky").stat().st_mode & 0o7777 == 0o777


def test_a_host_edit_with_its_mtime_put_back_is_a_conflict(tmp_path: Path) -> None:
    (tmp_path / "same.txt").write_text("aaaa\n")
    snap = writeback.snapshot(tmp_path)
    st = (tmp_path / "same.txt").stat()
    time.sleep(0.01)
    (tmp_path / "same.txt").write_text("hhhh\n")  # same size
    os.utime(tmp_path / "same.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    c = review.Change("same.txt", "modified", "file", hashlib.sha256(b"gggg\n").hexdigest(), 0o644)
    result = writeback.apply(tmp_path, [c], snap, {"same.txt": b"gggg\n"}, None)
    assert result.conflicts == ["same.txt"] and (tmp_path / "same.txt").read_text() == "hhhh\n"


def test_select_matches_whole_components(tmp_path: Path) -> None:
    chosen = [review.Change(p, "added", "file") for p in ("src/a", "srcx/b", "src", "other")]
    assert [c.path for c in review.select(chosen, ["src"])] == ["src/a", "src"]
    assert len(review.select(chosen, ["."])) == 4 and review.select(chosen, None) == chosen

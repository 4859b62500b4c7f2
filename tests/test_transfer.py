"""`vivarium cp`'s host side: which side is a sandbox, and what a hostile guest's archive comes to."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest

from vivarium import transfer
from vivarium.errors import UsageError

# tarfile's own data filter where this Python has one (3.11.4+), and always vivarium's (Debian 12's 3.11.2 has none)
FILTERS = [False, True] if hasattr(tarfile, "data_filter") else [False]
FILTER_IDS = ["vivarium's filter", "tarfile's filter"]


def test_which_side_is_a_sandbox() -> None:
    assert transfer.split("box:/tmp/x") == ("box", "/tmp/x")
    assert transfer.split("default:/a:b") == ("default", "/a:b")
    assert transfer.split("./a:b") == (None, "./a:b") and transfer.split("/a:b") == (None, "/a:b")
    assert transfer.split("notes.txt") == (None, "notes.txt")


def archive(*entries: tarfile.TarInfo, data: bytes = b"x") -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for ti in entries:
            if ti.type == tarfile.REGTYPE:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    buf.seek(0)
    return buf


def entry(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


@pytest.mark.parametrize(("bad", "said"), [
    (entry("loot/../../escape"), "outside the destination"),
    (entry("loot/passwd", tarfile.SYMTYPE, linkname="/etc/passwd"), "absolute path"),
    (entry("loot/up", tarfile.SYMTYPE, linkname="../../etc"), "outside the destination"),
    (entry("loot/dev", tarfile.CHRTYPE, devmajor=1, devminor=3), "special file"),
    (entry("/etc/cron.d/x"), "is not under 'loot'"),
    (entry("other"), "is not under 'loot'"),
])  # fmt: skip
@pytest.mark.parametrize("stdlib", FILTERS, ids=FILTER_IDS[: len(FILTERS)])
def test_a_hostile_entry_is_refused_and_nothing_lands_outside(tmp_path: Path, bad: tarfile.TarInfo, said: str, stdlib: bool) -> None:
    into = tmp_path / "tmp"
    into.mkdir()
    with pytest.raises(UsageError, match="refused what sandbox 'box' sent") as e:
        transfer._unpack(archive(entry("loot", tarfile.DIRTYPE, mode=0o755), entry("loot/fine.txt"), bad), into, "loot", "box", stdlib=stdlib)
    assert said in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and not (tmp_path / "escape").exists()


@pytest.mark.parametrize("stdlib", FILTERS, ids=FILTER_IDS[: len(FILTERS)])
def test_modes_are_kept_but_setuid_and_owners_are_not(tmp_path: Path, stdlib: bool) -> None:
    sent = archive(entry("loot", tarfile.DIRTYPE, mode=0o755), entry("loot/sh", mode=0o4755, uid=0, uname="root"),
                   entry("loot/key", mode=0o600), entry("loot/link", tarfile.SYMTYPE, linkname="key"))  # fmt: skip
    transfer._unpack(sent, tmp_path, "loot", "box", stdlib=stdlib)
    assert stat.S_IMODE((tmp_path / "loot" / "sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "loot" / "key").stat().st_mode) == 0o600
    assert (tmp_path / "loot" / "link").readlink() == Path("key")

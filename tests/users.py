"""Users the tests make (and remove) to run vivarium as a normal user would: with subordinate ids, as
useradd gives a new user where /etc/subuid exists and `scripts/setup` gives the user who runs it."""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import subprocess
from collections.abc import Container
from pathlib import Path

from vivarium.share import userns

LOGIN_NOFILE = 1024  # the open-file limit systemd gives a login session (soft; the hard one is 524288 there)


def login_limits() -> None:
    """A login session's open-file limits, whatever the tests' own are (this machine's are 20000 both): systemd's
    soft 1024, the hard one kept. For a child's preexec_fn."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOGIN_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def make(name: str, home: Path | None = None) -> pwd.struct_passwd:
    """A fresh user `name` (one left by a killed run is removed first), with subordinate uids and gids."""
    remove(name)
    where = ["--create-home", "--home-dir", str(home)] if home else ["--no-create-home"]
    subprocess.run(["useradd", *where, "--shell", "/bin/sh", name], check=True)
    pw = pwd.getpwnam(name)
    for kind in ("uid", "gid"):
        table = Path(f"/etc/sub{kind}")
        if userns.subordinate(table, name, pw.pw_uid) is None:  # useradd gives none where the file is missing
            lines = table.read_text().splitlines() if table.exists() else []
            start = max([100000, *(int(f[1]) + int(f[2]) for f in (line.split(":") for line in lines) if len(f) == 3)])
            subprocess.run(["usermod", f"--add-sub{kind}s", f"{start}-{start + 65535}", name], check=True)
    return pw


def remove(name: str) -> None:
    subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)


def processes(uids: Container[int]) -> dict[int, tuple[list[str], str]]:
    """pid: (real, effective, saved and filesystem uids; command line) of the processes with any of these uids."""
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ids = (p / "status").read_text().split("\nUid:")[1].split("\n")[0].split()
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            if any(int(i) in uids for i in ids):
                out[int(p.name)] = (ids, cmd)
    return out


def link_tree(src: Path, dst: Path) -> None:
    """`dst` as a copy of `src` made of hard links where they can be made (the same filesystem), else copies."""
    try:
        shutil.copytree(src, dst, copy_function=os.link, symlinks=True)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, symlinks=True)


def give_images(cache: Path, to: Path, pw: pwd.struct_passwd) -> None:
    """The images built in `cache` (a vivarium cache directory), and only those, in the user's cache directory `to`
    as well: the recipe is the same, so the user's `build` finds them (hard links, the user's: the files are theirs
    then too). What else `to` holds (templates) is kept, and made the user's."""
    images = cache / "images"
    built = {i.name for i in images.iterdir() if i.is_dir() and not i.name.startswith(".")} if images.is_dir() else set()
    given = to / "images"
    if given.is_dir():
        for old in given.iterdir():
            if old.is_dir() and not old.name.startswith(".") and old.name not in built:
                shutil.rmtree(old)  # gone from `cache`: a recipe since changed
    for name in built:
        if not (given / name / "manifest.json").exists():
            shutil.rmtree(given / name, ignore_errors=True)
            link_tree(images / name, given / name)
    to.mkdir(parents=True, exist_ok=True)
    for p in [to, *to.rglob("*")]:
        os.lchown(p, pw.pw_uid, pw.pw_gid)

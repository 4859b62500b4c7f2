"""Shared directories on a real guest: rw both ways with the right owner, ro enforced on the host."""

from __future__ import annotations

import json
import os
import pwd
import time
from pathlib import Path
from typing import Any

import pytest

from vivarium import Sandbox
from vivarium.share import userns

from .. import users
from .conftest import vv

pytestmark = pytest.mark.integration


def review_diff(review: Path) -> dict[str, Any]:
    shares = json.loads(vv("diff", "sharebox", "--json").stdout)
    (d,) = [sh for sh in shares if sh["share"] == str(review)]
    return d  # type: ignore[no-any-return]


def test_rw_share_round_trip_with_the_right_owner(shared: tuple[Sandbox, Path, Path]) -> None:
    box, rw, _ = shared
    (rw / "from-host.txt").write_text("hello guest\n")
    r = box.exec(["cat", str(rw / "from-host.txt")], capture=True)
    assert r.returncode == 0 and r.stdout == "hello guest\n", r.stderr
    assert box.exec(["sh", "-c", f"echo hello host > {rw}/from-guest.txt"]).returncode == 0
    made = rw / "from-guest.txt"
    assert made.read_text() == "hello host\n"
    assert int(box.exec(["id", "-u"], capture=True).stdout) == 1000  # the agent (conftest.AGENT)
    assert made.stat().st_uid == rw.stat().st_uid != 0  # on the host: the share's owner's (the user running vivarium, or 1000 under root)


def test_ro_share_refuses_root_even_after_remount(shared: tuple[Sandbox, Path, Path]) -> None:
    box, _, ro = shared
    assert box.exec(["cat", "/mnt/ro/readme.txt"], capture=True).stdout == "from the host\n"
    r = box.exec(["sudo", "sh", "-c", "echo x > /mnt/ro/new.txt"], capture=True)
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    # Root in the guest remounts it read-write: the host still says no.
    r = box.exec(["sudo", "sh", "-c", "mount -o remount,rw /mnt/ro && echo x > /mnt/ro/new.txt"], capture=True)
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    assert not (ro / "new.txt").exists()
    assert os.listdir(ro) == ["readme.txt"]


def test_status_says_how_each_share_is_served(shared: tuple[Sandbox, Path, Path]) -> None:
    box, rw, ro = shared
    shares = box.status().shares
    assert [(s["host"], s["mode"], s["via"]) for s in shares] == [
        (str(rw), "rw", "virtiofs"),
        (str(ro), "ro", "virtiofs"),
        (str(rw.parent / "review"), "review", "virtiofs"),
        (str(rw.parent / "attack"), "review", "virtiofs"),
    ]


def test_review_share_keeps_the_host_untouched_until_apply(shared: tuple[Sandbox, Path, Path]) -> None:
    box, rw, _ = shared
    review = rw.parent / "review"
    script = f"cd {review} && printf 'one\\nthree\\n' > edit.txt && echo new > added.txt && rm gone.txt && echo guest > src/both.txt"
    r = box.exec(["sh", "-c", script], capture=True)
    assert r.returncode == 0, r.stderr + box.dir.serial.read_text(errors="replace")[-3000:]
    assert box.exec(["cat", f"{review}/added.txt"], capture=True).stdout == "new\n"  # the guest sees its own writes
    # ... and the host has none of them
    assert (review / "edit.txt").read_text() == "one\ntwo\n" and (review / "gone.txt").exists() and not (review / "added.txt").exists()
    d = review_diff(review)
    assert {(c["kind"], c["path"]) for c in d["changes"]} == {
        ("modified", "edit.txt"),
        ("added", "added.txt"),
        ("deleted", "gone.txt"),
        ("modified", "src/both.txt"),
    }
    patch = vv("diff", "sharebox", "--patch").stdout  # (every review share's; the other one is test_host_trust's)
    assert "--- a/edit.txt" in patch and "-two" in patch and "+three" in patch
    # the host edits one of the files meanwhile: apply must not overwrite it
    time.sleep(0.01)
    (review / "src" / "both.txt").write_text("the host's edit\n")
    vv("diff", "sharebox")  # what apply takes: the change set this diff showed
    r = vv("apply", "sharebox", str(review), check=False)
    assert r.returncode == 1 and f"not applied: {review}/src/both.txt changed on the host" in r.stderr
    assert (review / "src" / "both.txt").read_text() == "the host's edit\n"
    assert (review / "edit.txt").read_text() == "one\nthree\n" and (review / "added.txt").read_text() == "new\n"
    assert not (review / "gone.txt").exists()
    assert (review / "added.txt").stat().st_uid == review.stat().st_uid != 0  # the share's owner, not root
    # what was applied no longer shows; the refused change still does, with the guest's version kept
    d = review_diff(review)
    assert [(c["kind"], c["path"]) for c in d["changes"]] == [("modified", "src/both.txt")]
    assert box.exec(["cat", f"{review}/src/both.txt"], capture=True).stdout == "guest\n"


def test_kube_link_into_share_puts_the_guests_kubeconfig_on_the_host(shared: tuple[Sandbox, Path, Path]) -> None:
    box, rw, _ = shared
    assert box.exec(["sh", "-c", "readlink ~/.kube"], capture=True).stdout.strip() == f"{rw}/.kube"
    assert box.exec(["sh", "-c", "echo 'apiVersion: v1' > ~/.kube/config"]).returncode == 0
    assert (rw / ".kube" / "config").read_text() == "apiVersion: v1\n"


def test_the_share_server_is_not_root_nor_is_what_root_in_the_guest_makes(shared: tuple[Sandbox, Path, Path]) -> None:
    """Run as root or by a normal user, vivarium serves shares from a user namespace (share/userns.py): the server
    is root only there, and what root in the guest makes is owned by the namespace's root, a uid no host user is
    (the first of the user's subordinate ones). On 0e6701b the server ran as root of the host and root in the guest
    made root's files."""
    box, rw, _ = shared
    me = pwd.getpwuid(os.geteuid())
    ns_root = (userns.subordinate(Path("/etc/subuid"), me.pw_name, me.pw_uid) or userns.ROOT_RANGE)[0]
    assert box.exec(["sudo", "sh", "-c", f"echo r > {rw}/by-root.txt && chown 0:0 {rw}/from-guest.txt"]).returncode == 0
    for name in ("by-root.txt", "from-guest.txt"):
        st = (rw / name).stat()
        assert (st.st_uid, st.st_gid) == (ns_root, ns_root), name
    servers = [ids for ids, cmd in users.processes(range(1 << 32)).values() if cmd.split(" ")[0].endswith("virtiofsd") and str(rw) in cmd]
    assert servers and all(ids == [str(ns_root)] * 4 for ids in servers), servers

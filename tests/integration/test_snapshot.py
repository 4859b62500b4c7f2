"""Snapshots: a running sandbox's memory and disks saved together, restored where it left off."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import Sandbox, snapshots
from vivarium import config as cfg
from vivarium.errors import UsageError
from vivarium.ports import free_port
from vivarium.vm import caps

from ..fakenet import PUBLIC, FakeNet
from .conftest import vv, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def snapbox(project: Path, built: object, net: FakeNet) -> Iterator[tuple[Sandbox, Path]]:
    assert net.dns is not None
    d = project.parent / "snapshot-project"
    d.mkdir(exist_ok=True)
    write_config(
        d,
        f'share = []\n[vm]\nmemory = "1G"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n[[forward]]\nhost = {free_port()}\nguest = 22\n'
        f'[network]\nallow_cidrs = ["{PUBLIC}/32"]\ndns_upstream = "{net.dns.address}"\n',
    )
    vv("up", "snapbox", cwd=d)
    box = Sandbox("snapbox")
    yield box, d
    box.destroy()


def test_restore_goes_back_to_where_it_was_saved(snapbox: tuple[Sandbox, Path]) -> None:
    box, d = snapbox
    assert box.exec(["sh", "-c", "echo before > ~/marker && sync"]).returncode == 0
    sleeper = box.exec(["sh", "-c", "nohup sleep 3600 >/dev/null 2>&1 & echo $!"], capture=True).stdout.strip()
    r = vv("snapshot", "snapbox", "save", "one", cwd=d)
    assert "saved snapshot one" in r.stderr
    assert box.exec(["true"]).returncode == 0  # it kept running
    assert box.exec(["sh", "-c", f"rm ~/marker && echo after > ~/other && kill {sleeper} && sync"]).returncode == 0
    r = vv("snapshot", "snapbox", "restore", "one", cwd=d)
    assert "restored to one" in r.stderr
    assert box.exec(["cat", "/home/agent/marker"], capture=True).stdout == "before\n"
    assert box.exec(["test", "-e", "/home/agent/other"]).returncode == 1
    assert box.exec(["kill", "-0", sleeper]).returncode == 0  # the process it had is back, same pid
    # the fence holds and lets through what it did before
    curl = box.exec(["curl", "-sS", "-m", "20", "http://public.test/"], capture=True)
    assert curl.stdout.strip() == f"hello from {PUBLIC}", curl.stderr
    assert box.status().gateway is not None
    # each restore is a machine of its own: the clock is now, and its randomness is not the last restore's
    probe = ["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"]
    first = box.exec(probe, capture=True).stdout.split()
    vv("snapshot", "snapbox", "restore", "one", cwd=d)
    second = box.exec(probe, capture=True).stdout.split()
    assert len(first[0]) == 64 and first[0] != second[0]
    assert abs(int(second[1]) - time.time()) < 30
    (snap,) = json.loads(vv("snapshot", "snapbox", "ls", "--json").stdout)
    assert snap["tag"] == "one" and snap["memory"] == 1 << 30 and snap["size"] > 0


def test_restore_refuses_a_changed_shape(snapbox: tuple[Sandbox, Path]) -> None:
    box, d = snapbox
    other = d / "bigger"
    other.mkdir(exist_ok=True)
    write_config(other, (d / "vivarium.toml").read_text().replace('memory = "1G"', 'memory = "2G"'))
    # the CLI restores with the settings the sandbox was made with, wherever it is typed ...
    r = vv("snapshot", "snapbox", "restore", "one", cwd=other)
    assert "restored to one" in r.stderr
    # ... a program that hands the sandbox other settings is told the snapshot does not fit them
    with pytest.raises(UsageError) as e:
        Sandbox("snapbox", cfg.load(other / "vivarium.toml")).snapshot_restore("one")
    assert "no longer fits" in e.value.message and "memory 1G now 2G" in e.value.message
    assert box.pid() is not None  # left as it was


def test_a_snapshot_keeps_the_shares_where_the_host_can_and_says_so_where_it_cannot(project: Path, built: object) -> None:
    """QEMU 8.2+ with the Rust virtiofsd (Debian 13) saves a sandbox with its shares, a file open in one
    included, and restores it with them mounted; a host that cannot (QEMU 7.2 and its C virtiofsd) refuses in
    one line and saves nothing. CI runs this on both."""
    d = project.parent / "snapshare-project"
    d.mkdir(exist_ok=True)
    write_config(d, f'[[share]]\nhost = "."\n[vm]\nmemory = "1G"\ncpus = 2\ndisk = "10G"\nswap = "256M"\n'
                    f"[[forward]]\nhost = {free_port()}\nguest = 22\n")  # fmt: skip
    (d / "seen.txt").write_text("from the host\n")
    vv("up", "snapshare", cwd=d)
    box = Sandbox("snapshare")
    try:
        # a process holding a file of the share open, across the save and the restore
        holder = box.exec(["sh", "-c", f"cd {d} && (sleep 1000 7<seen.txt >/dev/null 2>&1 &) && sleep 1 && pgrep -n -x sleep"],
                          capture=True).stdout.strip()  # fmt: skip
        r = vv("snapshot", "snapshare", "save", "s", check=False)
        if not snapshots.shares_migrate(caps.probe()):
            assert r.returncode == 2 and "virtiofs device cannot be saved" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert json.loads(vv("snapshot", "snapshare", "ls", "--json").stdout) == []
            return
        assert r.returncode == 0, r.stderr
        (d / "later.txt").write_text("written after the save\n")
        assert "restored to s" in vv("snapshot", "snapshare", "restore", "s", cwd=d).stderr
        r = box.exec(["sh", "-c", f"cat /proc/{holder}/fd/7 {d}/later.txt; mount | grep -c ' {d} type virtiofs'"], capture=True)
        assert r.stdout.split("\n")[:3] == ["from the host", "written after the save", "1"], (r.stdout, r.stderr)
    finally:
        box.destroy()


def test_a_restore_that_qemu_refuses_shows_qemus_own_reason(snapbox: tuple[Sandbox, Path]) -> None:
    box, d = snapbox
    vv("snapshot", "snapbox", "save", "bad", cwd=d)
    (box.dir.path / "snapshots" / "bad" / "state").write_bytes(b"\0" * 4096)  # not a migration stream
    r = vv("snapshot", "snapbox", "restore", "bad", cwd=d, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "error: QEMU exited while starting sandbox 'snapbox': load of migration failed" in r.stderr, r.stderr
    assert f"hint: QEMU's log: {box.dir.log}" in r.stderr
    assert box.pid() is None  # nothing of the failed start runs on; a good snapshot still restores
    assert "restored to one" in vv("snapshot", "snapbox", "restore", "one", cwd=d).stderr
    assert box.exec(["true"]).returncode == 0
    vv("snapshot", "snapbox", "rm", "bad")


def test_rm(snapbox: tuple[Sandbox, Path]) -> None:
    vv("snapshot", "snapbox", "rm", "one")
    assert json.loads(vv("snapshot", "snapbox", "ls", "--json").stdout) == []
    assert vv("snapshot", "snapbox", "restore", "one", check=False).returncode == 2
